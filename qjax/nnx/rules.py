"""``quantize_model`` for Flax NNX: matched layers are replaced in place by their qjax versions,
which share the original ``Param`` variables (nothing is copied or re-initialised)."""

from __future__ import annotations

from flax import nnx

from qjax.nn import common as C
from qjax.nn.common import QuantizationReport, RulesLike
from qjax.nnx.layers import QUANTIZED_CLASSES


def _replacement(module: nnx.Module, recipe, rngs) -> nnx.Module:
    quantized = object.__new__(QUANTIZED_CLASSES[type(module)])
    vars(quantized).update(vars(module))
    quantized._configure(recipe, False, rngs)
    return quantized


def _set_child(parent, name, child):
    if isinstance(name, int) or not hasattr(parent, "__setattr__") or isinstance(parent, list):
        parent[name] = child
    else:
        setattr(parent, name, child)


def _child(parent, name):
    return parent[name] if isinstance(parent, (list, tuple, dict)) or isinstance(name, int) \
        else getattr(parent, name)


_HOOKS = {"Linear": "dot_general", "LinearGeneral": "dot_general", "Einsum": "einsum_op",
          "Conv": "conv_general_dilated"}


def layer_paths(model: nnx.Module, *example_args, **example_kwargs) -> list[tuple]:
    """Paths (tuples) of the quantizable layers of ``model``: in call order when example inputs
    are given (an abstract ``nnx.eval_shape`` trace), else in graph order (attribute names)."""
    found = [(path, node) for path, node in nnx.iter_graph(model)
             if type(node) in QUANTIZED_CLASSES and path]
    if not example_args and not example_kwargs:
        return [path for path, _ in found]
    order: list[tuple] = []
    saved = []
    for path, node in found:
        hook = _HOOKS[type(node).__name__]
        original = getattr(node, hook)
        if original is None:  # LinearGeneral with dot_general_cls
            continue
        saved.append((node, hook, original))
        object.__setattr__(node, hook, _Recorder(original, path, order))
    try:
        nnx.eval_shape(lambda m: m(*example_args, **example_kwargs), model)
    finally:
        for node, hook, original in saved:
            object.__setattr__(node, hook, original)
    return order + [path for path, _ in found if path not in order]


class _Recorder:
    def __init__(self, op, path, order):
        self.op, self.path, self.order = op, path, order

    def __call__(self, *args, **kwargs):
        if self.path not in self.order:
            self.order.append(self.path)
        return self.op(*args, **kwargs)


def quantize_nnx(model: nnx.Module, rules: RulesLike, *example_args,
                 rngs: nnx.Rngs | None = None, **example_kwargs
                 ) -> tuple[nnx.Module, QuantizationReport]:
    """See :func:`qjax.quantize_model`. ``model`` is modified in place and returned."""
    rules = C.canonical_rules(rules)
    if any(r.pattern in (C.FIRST, C.LAST) for r in rules) and not (example_args or example_kwargs):
        raise ValueError("rules with qjax.nn.FIRST / LAST need the call order of the layers: pass "
                         "example inputs, quantize_model(model, rules, x).")
    paths = layer_paths(model, *example_args, **example_kwargs)
    names = ["/".join(map(str, p)) for p in paths]
    mapping = C.assign_recipes(names, rules)
    for path, name in zip(paths, names):
        recipe = mapping.get(name)
        if recipe is None:
            continue
        parent = model
        for part in path[:-1]:
            parent = _child(parent, part)
        _set_child(parent, path[-1], _replacement(_child(parent, path[-1]), recipe, rngs))
    return model, C.make_report(names, mapping)

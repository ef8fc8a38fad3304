"""``quantize_model``: quantize the layers of a whole Flax model by module-path rules.

Linen models are wrapped: the returned module shares its scope with the original (same
parameter tree) and runs it under ``flax.linen.intercept_methods``, swapping the matmul of every
matched ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` / ``nn.Conv`` (and ``nn.Embed.attend``).
NNX models have their matched modules replaced in place (:mod:`qjax.nnx.rules`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax

from qjax.nn import common as C
from qjax.nn import layers as L
from qjax.nn.common import QuantizationReport, RulesLike

# method of each Flax layer type that runs its matmul
_LINEN_LAYERS: dict[type, str] = {nn.Dense: "__call__", nn.DenseGeneral: "__call__",
                                  nn.Einsum: "__call__", nn.Conv: "__call__",
                                  nn.Embed: "attend"}


def _is_target(module: nn.Module, method_name: str) -> bool:
    return _LINEN_LAYERS.get(type(module)) == method_name


@contextlib.contextmanager
def _swapped(module: nn.Module, **fields):
    saved = {name: getattr(module, name) for name in fields}
    for name, value in fields.items():
        object.__setattr__(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            object.__setattr__(module, name, value)


def _run_quantized(module: nn.Module, recipe, next_fun, args, kwargs):
    kind = type(module)
    if kind in (nn.Dense, nn.DenseGeneral):
        factory = L._OpFactory(L.QuantDotGeneral, (("collect_stats", False), ("recipe", recipe)))
        with _swapped(module, dot_general_cls=factory):
            return next_fun(*args, **kwargs)
    if kind is nn.Conv:
        factory = L._OpFactory(L.QuantConv, (("collect_stats", False), ("recipe", recipe)))
        with _swapped(module, conv_general_dilated_cls=factory):
            return next_fun(*args, **kwargs)
    if kind is nn.Einsum:
        return L.einsum_forward(module, recipe, False, *args, **kwargs)
    return L.attend_forward(module, recipe, False, *args, **kwargs)


def _relative_path(module: nn.Module, root_path: tuple[str, ...]) -> str:
    return "/".join(module.path[len(root_path):])


class QuantizedModel(nn.Module):
    """A Linen model whose layers at the paths in ``mapping`` run with their recipes; the
    parameter tree is the wrapped model's own (the scopes are shared)."""

    model: nn.Module
    mapping: tuple[tuple[str, Any], ...]

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        recipes = dict(self.mapping)
        root = self.path

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            if not _is_target(module, context.method_name):
                return next_fun(*call_args, **call_kwargs)
            recipe = recipes.get(_relative_path(module, root))
            if recipe is None:
                return next_fun(*call_args, **call_kwargs)
            return _run_quantized(module, recipe, next_fun, call_args, call_kwargs)

        with nn.intercept_methods(interceptor):
            return self.model(*args, **kwargs)


def layer_paths(model: nn.Module, *example_args, rngs=None, **example_kwargs) -> list[str]:
    """The paths of ``model``'s quantizable layers in call order (an abstract trace of
    ``init``; nothing is computed)."""
    paths: list[str] = []

    def recorder(next_fun, call_args, call_kwargs, context):
        module = context.module
        if _is_target(module, context.method_name):
            path = "/".join(module.path)
            if path not in paths:
                paths.append(path)
        return next_fun(*call_args, **call_kwargs)

    rngs = rngs if rngs is not None else {
        name: jax.random.key(0) for name in ("params", "dropout", C.QUANT_STREAM)}

    def init():
        with nn.intercept_methods(recorder):
            return model.init(rngs, *example_args, **example_kwargs)

    jax.eval_shape(init)
    return paths


def quantize_linen(model: nn.Module, rules: RulesLike, *example_args,
                   **example_kwargs) -> tuple[QuantizedModel, QuantizationReport]:
    if not example_args and not example_kwargs:
        raise ValueError("quantize_model on a Linen model needs example inputs (as for init) to "
                         "find its layers: quantize_model(model, rules, x).")
    paths = layer_paths(model, *example_args, **example_kwargs)
    mapping = C.assign_recipes(paths, rules)
    wrapped = QuantizedModel(model, tuple((p, r) for p, r in mapping.items() if r is not None))
    return wrapped, C.make_report(paths, mapping)


def quantize_model(model, rules: RulesLike, *example_args, rngs=None, **example_kwargs):
    """Quantizes the matmul layers of a Flax model by rules on their module paths.

    Args:
      model: a ``flax.linen.Module`` (definition, unbound) or a ``flax.nnx.Module`` (instance).
      rules: a sequence of ``(pattern, recipe)`` pairs (or :class:`Rule`); a layer gets the
        recipe of the first rule whose ``pattern`` matches its ``/``-joined path
        (``re.search``), or whose pattern is ``qjax.nn.FIRST`` / ``qjax.nn.LAST`` (the first /
        last quantizable layer in call order). ``recipe=None`` keeps a layer in its original
        precision; unmatched layers are untouched.
      *example_args, **example_kwargs: example inputs of ``model.__call__``, used in an abstract
        trace to list the layers in call order. Required for Linen; for NNX only when a rule uses
        ``FIRST`` / ``LAST`` (without them NNX layers are listed in graph order).
      rngs: NNX only: an ``nnx.Rngs`` with a ``"quant"`` stream, needed when a chosen recipe is
        stochastic.

    Returns:
      ``(model, report)``: for Linen a :class:`QuantizedModel` wrapping ``model`` (same
      parameter tree: ``init``/``apply`` it as the original); for NNX the same model object with
      matched layers replaced in place. ``report`` is a :class:`QuantizationReport`.

    Example:
      >>> rules = [(qjax.nn.FIRST, None), (qjax.nn.LAST, None), (".*", "mxfp8")]
      >>> qmodel, report = qjax.quantize_model(model, rules, x)
      >>> print(report)
    """
    if isinstance(model, nn.Module):
        if rngs is not None:
            raise ValueError("rngs= is for NNX models; Linen models take the 'quant' stream in "
                             "apply(..., rngs={'quant': key}).")
        return quantize_linen(model, rules, *example_args, **example_kwargs)
    from flax import nnx

    if isinstance(model, nnx.Module):
        from qjax.nnx.rules import quantize_nnx

        return quantize_nnx(model, rules, *example_args, rngs=rngs, **example_kwargs)
    raise TypeError(f"quantize_model takes a flax.linen.Module or a flax.nnx.Module; got "
                    f"{type(model).__name__}.")


# One-line policies (combine by concatenating the lists).
def all_but_first_and_last(recipe: C.RecipeLike) -> list[tuple[str, Any]]:
    """Quantize every matmul layer except the first and last (embedding-side and head)."""
    return [(C.FIRST, None), (C.LAST, None), (".*", recipe)]


def mlp_only(recipe: C.RecipeLike, mlp_pattern: str = r"(^|/)(mlp|MLP|ffn|FFN|feed_forward)"
             ) -> list[tuple[str, Any]]:
    """Quantize only the MLP projections (layers under a module whose name matches
    ``mlp_pattern``)."""
    return [(mlp_pattern, recipe)]


def attention_in_bf16(recipe: C.RecipeLike,
                      attention_pattern: str = r"(^|/)(attn|attention|self_attn|Attention|"
                                               r"MultiHeadDotProductAttention_\d+)(/|$)"
                      ) -> list[tuple[str, Any]]:
    """Quantize everything but the attention layers (their projections stay in bf16/fp32)."""
    return [(attention_pattern, None), (".*", recipe)]


__all__ = ["QuantizedModel", "all_but_first_and_last", "attention_in_bf16", "layer_paths",
           "mlp_only", "quantize_model"]

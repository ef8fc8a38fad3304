"""What the Linen and NNX layers share: recipe lookup, collection names, delayed scaling math,
statistics of GEMM operands and whole-model rules. Pure functions and frozen dataclasses only."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from qjax import formats as F
from qjax.quantize import fake_quant
from qjax import stats as S

QUANT_STREAM = "quant"
STATS_COLLECTION = S.STATS_COLLECTION
SCALING_COLLECTION = "qjax_scaling"
FIRST = "<first>"
LAST = "<last>"

RecipeLike = Union[str, Any, None]  # a recipe name, a qjax.recipes.Recipe, or None (unquantized)


def _recipes():
    from qjax import recipes  # the recipes room sits left of the layers

    return recipes


def _ops():
    from qjax import ops

    return ops


def conv_op():
    """``qjax.ops.conv_general_dilated``, or a clear error while the ops room lacks it."""
    ops = _ops()
    if not hasattr(ops, "conv_general_dilated"):
        raise NotImplementedError("quantized convolutions need qjax.ops.conv_general_dilated, "
                                  "which this qjax version does not have yet.")
    return ops.conv_general_dilated


def resolve_recipe(recipe: RecipeLike):
    """A recipe name or ``Recipe`` -> the ``Recipe`` (None stays None)."""
    if recipe is None:
        return None
    if isinstance(recipe, str):
        return _recipes().get(recipe)
    return recipe


def recipe_name(recipe: RecipeLike) -> str | None:
    recipe = resolve_recipe(recipe)
    return None if recipe is None else getattr(recipe, "name", repr(recipe))


def recipe_from(fmt: str | None, recipe: RecipeLike) -> RecipeLike:
    """``fmt="mxfp4"`` is shorthand for ``recipe="mxfp4"``; giving both is an error."""
    if fmt is not None and recipe is not None:
        raise ValueError(f"give either fmt= or recipe=, not both (got fmt={fmt!r}, "
                         f"recipe={recipe!r}).")
    return resolve_recipe(fmt if fmt is not None else recipe)


def needs_key(recipe) -> bool:
    """Whether a recipe draws random numbers (stochastic rounding, random Hadamard signs)."""
    return bool(recipe is not None and getattr(recipe, "needs_key", False))


def missing_stream_error(recipe, where: str) -> ValueError:
    return ValueError(
        f"recipe {recipe_name(recipe)!r} is stochastic and needs a PRNG stream named "
        f"{QUANT_STREAM!r}: {where}.")


def operand_specs(recipe) -> tuple[Any, Any]:
    """The forward GEMM's (lhs, rhs) ``OperandSpec``s of a recipe (None for no recipe)."""
    if recipe is None:
        return None, None
    return recipe.forward.lhs, recipe.forward.rhs


def operand_stats(lhs, rhs, lhs_axis: int, rhs_axis: int, recipe) -> dict[str, dict[str, Array]]:
    """Quantization statistics of both GEMM operands along their contraction axes."""
    out = {}
    for name, x, axis, spec in zip(("lhs", "rhs"), (lhs, rhs), (lhs_axis, rhs_axis),
                                   operand_specs(recipe)):
        if spec is not None and spec.quantizes and jnp.issubdtype(x.dtype, jnp.floating):
            out[name] = S.quantization_stats(x, spec.fmt, axis=axis, scale_mode=spec.scale_mode)
    return out


# --------------------------------------------------------------------------- delayed scaling


E4M3_CAST = F.Format("e4m3_cast", F.E4M3_ELEM)


@dataclasses.dataclass(frozen=True)
class DelayedScaling:
    """TransformerEngine-style delayed scaling for FP8 GEMMs (Micikevicius et al., "FP8 Formats
    for Deep Learning", arXiv:2209.05433; NVIDIA TransformerEngine ``DelayedScaling``).

    Each GEMM operand keeps an amax history of ``history_length`` steps in the
    ``"qjax_scaling"`` collection; its per-tensor scale is ``max(history) / (E4M3 max * 2^margin)``
    (the amax of the current tensor on the first step, when the history is still zero); the
    history is rolled and the current amax written in front whenever the collection is mutable.
    The output cotangent is quantized to ``backward_format`` with current scaling, so both
    backward GEMMs see FP8 operands.

    Attributes:
      history_length: steps of amax history.
      margin: extra power-of-two headroom (``scale *= 2^margin``).
      backward_format: format of the output gradient (per-tensor current scaling).
    """

    history_length: int = 16
    margin: int = 0
    backward_format: str = "fp8_e5m2"

    def __post_init__(self):
        if self.history_length < 1:
            raise ValueError(f"history_length must be >= 1, got {self.history_length}.")


def delayed_scale(history: Float[Array, " n"], current_amax: Float[Array, ""],
                  config: DelayedScaling) -> Float[Array, ""]:
    """The per-tensor scale from an amax history (the current amax while the history is empty)."""
    amax = jnp.max(history)
    amax = jnp.where(amax > 0, amax, current_amax)
    scale = amax * np.float32(2.0**config.margin / F.E4M3_ELEM.max)
    return jnp.where((scale > 0) & jnp.isfinite(scale), scale, np.float32(1.0))


def roll_history(history: Float[Array, " n"], amax: Float[Array, ""]) -> Float[Array, " n"]:
    """Newest amax first, oldest dropped."""
    return jnp.roll(history, 1).at[0].set(amax.astype(history.dtype))


def fake_quant_scaled(x: Float[Array, "..."], scale: Float[Array, ""]) -> Float[Array, "..."]:
    """E4M3 quantize-dequantize of ``x`` with a given per-tensor scale (saturating); gradient
    straight through."""
    xf = x.astype(jnp.float32)
    q = fake_quant(xf * (np.float32(1.0) / scale), E4M3_CAST) * scale
    q = q.astype(x.dtype)
    return x + jax.lax.stop_gradient(q - x)


def delayed_quantize(x: Float[Array, "..."], history: Float[Array, " n"],
                     config: DelayedScaling) -> tuple[Float[Array, "..."], Float[Array, " n"]]:
    """E4M3 fake-quantization of ``x`` with the scale from ``history``, and the history with
    ``x``'s amax written in front (the caller decides whether to keep it)."""
    amax = jnp.max(jnp.abs(jax.lax.stop_gradient(x))).astype(jnp.float32)
    scale = delayed_scale(history, amax, config)
    return fake_quant_scaled(x, scale), roll_history(history, amax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def cotangent_quantized(y: Array, fmt: str) -> Array:
    """Identity whose backward pass quantizes the cotangent of ``y`` to ``fmt`` (a format name;
    current per-tensor scaling for the fp8 formats)."""
    return y


def _cotangent_fwd(y, fmt):
    return y, None


def _cotangent_bwd(fmt, _, g):
    return (fake_quant(g, fmt),)


cotangent_quantized.defvjp(_cotangent_fwd, _cotangent_bwd)


# --------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """One whole-model rule: layers whose ``/``-joined path matches ``pattern`` (``re.search``;
    or the tokens ``"<first>"`` / ``"<last>"`` for the first / last quantizable layer in call
    order) get ``recipe`` (``None`` keeps them in high precision)."""

    pattern: str
    recipe: RecipeLike

    def __post_init__(self):
        if self.pattern not in (FIRST, LAST):
            re.compile(self.pattern)


RulesLike = Sequence[Union[Rule, tuple]]


def canonical_rules(rules: RulesLike) -> tuple[Rule, ...]:
    if isinstance(rules, (Rule, str)) or (isinstance(rules, tuple) and len(rules) == 2
                                          and isinstance(rules[0], str)
                                          and not isinstance(rules[1], tuple)):
        rules = [rules]
    out = []
    for rule in rules:
        if isinstance(rule, Rule):
            out.append(rule)
        elif isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str):
            out.append(Rule(rule[0], rule[1]))
        else:
            raise ValueError(f"a rule is (module-path regex, recipe or None) or a qjax.nn.Rule; "
                             f"got {rule!r}.")
    return tuple(out)


def assign_recipes(paths: Sequence[str], rules: RulesLike) -> dict[str, Any]:
    """Maps each quantizable layer path (in call order) to the recipe of the first matching rule;
    unmatched paths are left out (they stay untouched)."""
    rules = canonical_rules(rules)
    first, last = (paths[0], paths[-1]) if paths else (None, None)
    mapping = {}
    for path in paths:
        for rule in rules:
            hit = (path == first if rule.pattern == FIRST else path == last
                   if rule.pattern == LAST else re.search(rule.pattern, path) is not None)
            if hit:
                mapping[path] = resolve_recipe(rule.recipe)
                break
    return mapping


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """Which layer got which recipe. ``layers`` maps every quantizable layer path (call order) to
    its recipe name, or None where it stays in its original precision (no rule matched, or the
    matching rule's recipe is None)."""

    layers: dict[str, str | None]

    @property
    def quantized(self) -> dict[str, str]:
        return {p: r for p, r in self.layers.items() if r is not None}

    @property
    def kept(self) -> tuple[str, ...]:
        return tuple(p for p, r in self.layers.items() if r is None)

    def __str__(self) -> str:
        width = max([len(p) for p in self.layers] + [5])
        lines = [f"{'layer':<{width}}  recipe"]
        lines += [f"{p:<{width}}  {r if r is not None else '(unchanged)'}"
                  for p, r in self.layers.items()]
        return "\n".join(lines)


def make_report(paths: Sequence[str], mapping: dict[str, Any]) -> QuantizationReport:
    return QuantizationReport({p: recipe_name(mapping.get(p)) for p in paths})

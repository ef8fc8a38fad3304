"""Flax Linen layers whose GEMMs run through :mod:`qjax.ops` with a recipe.

Each layer subclasses its Flax counterpart and only swaps the matmul (Flax's own
``dot_general_cls`` / ``conv_general_dilated_cls`` hooks where they exist), so parameter names,
shapes, dtypes and initialisers are Flax's and a checkpoint of the Flax layer loads unchanged.
The quantized matmul is a parameter-free child module named ``"qjax"``; it draws random numbers
from the ``"quant"`` RNG stream (stochastic recipes only), ``sow``s statistics into
``"qjax_stats"`` (``collect_stats=True``) and keeps delayed-scaling amax histories in
``"qjax_scaling"`` (``delayed_scaling=DelayedScaling(...)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import module as linen_module
from jax import lax
from jaxtyping import Array

from qjax.nn import common as C
from qjax.nn.common import DelayedScaling, RecipeLike


def _quant_key(module: nn.Module, recipe):
    if not C.needs_key(recipe):
        return None
    if not module.has_rng(C.QUANT_STREAM):
        if module.is_initializing():  # init(key, x) stays a one-key call; values are unused
            return jax.random.key(0)
        raise C.missing_stream_error(
            recipe, "pass rngs={'params': ..., 'quant': key} to init / apply")
    return module.make_rng(C.QUANT_STREAM)


def _sow_stats(module: nn.Module, stats: dict):
    for operand, values in stats.items():
        module.sow(C.STATS_COLLECTION, operand, values, init_fn=dict,
                   reduce_fn=lambda _, new: new)


def _delayed_operand(module: nn.Module, name: str, x, config: DelayedScaling):
    history = module.variable(C.SCALING_COLLECTION, f"{name}_amax_history", jnp.zeros,
                              (config.history_length,), jnp.float32)
    quantized, new_history = C.delayed_quantize(x, history.value, config)
    if module.is_mutable_collection(C.SCALING_COLLECTION) and not module.is_initializing():
        history.value = new_history
    return quantized


def _check_scaling(recipe, config):
    if config is not None and recipe is not None:
        raise ValueError("delayed_scaling replaces the recipe's forward quantization with "
                         "per-tensor E4M3 (TransformerEngine style); pass recipe=None with it.")


class QuantDotGeneral(nn.Module):
    """``lax.dot_general`` with a recipe (the ``dot_general_cls`` Flax's layers instantiate)."""

    recipe: RecipeLike = None
    collect_stats: bool = False
    delayed_scaling: DelayedScaling | None = None

    @nn.compact
    def __call__(self, lhs: Array, rhs: Array, dimension_numbers, precision=None,
                 preferred_element_type=None) -> Array:
        recipe = C.resolve_recipe(self.recipe)
        (lhs_contract, rhs_contract), _ = dimension_numbers
        if self.collect_stats:
            _sow_stats(self, C.operand_stats(lhs, rhs, lhs_contract[0], rhs_contract[0], recipe))
        if self.delayed_scaling is not None:
            lhs = _delayed_operand(self, "lhs", lhs, self.delayed_scaling)
            rhs = _delayed_operand(self, "rhs", rhs, self.delayed_scaling)
            out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                  preferred_element_type=preferred_element_type)
            return C.cotangent_quantized(out, self.delayed_scaling.backward_format)
        return C._ops().dot_general(lhs, rhs, dimension_numbers, recipe=recipe,
                                    key=_quant_key(self, recipe), precision=precision,
                                    preferred_element_type=preferred_element_type)


class QuantEinsum(nn.Module):
    """``jnp.einsum`` of two operands with a recipe."""

    recipe: RecipeLike = None
    collect_stats: bool = False

    @nn.compact
    def __call__(self, subscripts: str, lhs: Array, rhs: Array, precision=None,
                 preferred_element_type=None) -> Array:
        recipe = C.resolve_recipe(self.recipe)
        if self.collect_stats:
            lhs_axis, rhs_axis = _einsum_contraction_axes(subscripts)
            _sow_stats(self, C.operand_stats(lhs, rhs, lhs_axis, rhs_axis, recipe))
        return C._ops().einsum(subscripts, lhs, rhs, recipe=recipe, key=_quant_key(self, recipe),
                               precision=precision, preferred_element_type=preferred_element_type)


class QuantConv(nn.Module):
    """``lax.conv_general_dilated`` with a recipe (the ``conv_general_dilated_cls`` hook)."""

    recipe: RecipeLike = None
    collect_stats: bool = False

    @nn.compact
    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None,
                 preferred_element_type=None) -> Array:
        recipe = C.resolve_recipe(self.recipe)
        if self.collect_stats and dimension_numbers is not None:
            dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            _sow_stats(self, C.operand_stats(lhs, rhs, dn.lhs_spec[1], dn.rhs_spec[1], recipe))
        return C.conv_op()(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type, recipe=recipe,
            key=_quant_key(self, recipe))


def _einsum_contraction_axes(subscripts: str) -> tuple[int, int]:
    """The axis of each operand that its last contracted index names (negative after ``...``)."""
    inputs, output = subscripts.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    summed = [c for c in lhs if c.isalpha() and c in rhs and c not in output]
    if not summed:
        return -1, -1

    def axis(term: str, index: str) -> int:
        position = term.index(index)
        return position - len(term) if "..." in term[:position] else position

    return axis(lhs, summed[-1]), axis(rhs, summed[-1])


@dataclasses.dataclass(frozen=True)
class _OpFactory:
    """Zero-argument factory Flax calls inside the layer's compact ``__call__``."""

    op: type
    kwargs: tuple

    def __call__(self):
        return self.op(**dict(self.kwargs), name="qjax")


def _install_factory(module: nn.Module, hook: str, op: type, **kwargs):
    current = getattr(module, hook)
    if module.recipe is None and getattr(module, "delayed_scaling", None) is None:
        return
    factory = _OpFactory(op, tuple(sorted(kwargs.items())))
    if current is not None and current != factory:
        raise ValueError(f"{type(module).__name__}: {hook} is set by qjax from recipe=; do not "
                         f"pass both.")
    if getattr(module, hook.removesuffix("_cls"), None) is not None:
        raise ValueError(f"{type(module).__name__}: pass recipe= or "
                         f"{hook.removesuffix('_cls')}=, not both.")
    object.__setattr__(module, hook, factory)


class Dense(nn.Dense):
    """``flax.linen.Dense`` whose matmul runs with ``recipe``: same parameters, same call.

    Attributes (beyond ``nn.Dense``'s):
      recipe: a recipe name (``qjax.recipes.names()``), a ``Recipe``, or None (plain ``nn.Dense``).
      collect_stats: ``sow`` operand statistics into ``"qjax_stats"`` (off by default).
      delayed_scaling: a :class:`DelayedScaling` for TransformerEngine-style FP8 (with
        ``recipe=None``); amax histories live in ``"qjax_scaling"``.

    Example:
      >>> layer = Dense(8, recipe="mxfp8")
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 32)))
      >>> jax.tree.map(jnp.shape, params)
      {'params': {'bias': (8,), 'kernel': (32, 8)}}
    """

    recipe: RecipeLike = None
    collect_stats: bool = False
    delayed_scaling: DelayedScaling | None = None

    def __post_init__(self):
        _check_scaling(self.recipe, self.delayed_scaling)
        _install_factory(self, "dot_general_cls", QuantDotGeneral, recipe=self.recipe,
                         collect_stats=self.collect_stats, delayed_scaling=self.delayed_scaling)
        super().__post_init__()


class DenseGeneral(nn.DenseGeneral):
    """``flax.linen.DenseGeneral`` with a recipe; attributes as :class:`Dense`."""

    recipe: RecipeLike = None
    collect_stats: bool = False
    delayed_scaling: DelayedScaling | None = None

    def __post_init__(self):
        _check_scaling(self.recipe, self.delayed_scaling)
        _install_factory(self, "dot_general_cls", QuantDotGeneral, recipe=self.recipe,
                         collect_stats=self.collect_stats, delayed_scaling=self.delayed_scaling)
        super().__post_init__()


class Conv(nn.Conv):
    """``flax.linen.Conv`` with a recipe (through ``qjax.ops.conv_general_dilated``)."""

    recipe: RecipeLike = None
    collect_stats: bool = False

    def __post_init__(self):
        _install_factory(self, "conv_general_dilated_cls", QuantConv, recipe=self.recipe,
                         collect_stats=self.collect_stats)
        super().__post_init__()


class Einsum(nn.Einsum):
    """``flax.linen.Einsum`` with a recipe: same ``kernel``/``bias`` parameters and call."""

    recipe: RecipeLike = None
    collect_stats: bool = False

    @nn.compact
    def __call__(self, inputs: Array, einsum_str: str | None = None) -> Array:
        return einsum_forward(self, self.recipe, self.collect_stats, inputs, einsum_str)


def einsum_forward(module: nn.Einsum, recipe: RecipeLike, collect_stats: bool, inputs: Array,
                   einsum_str: str | None = None) -> Array:
    """The body of ``nn.Einsum.__call__`` with the einsum run by :class:`QuantEinsum` (called
    inside ``module``'s compact context: by :class:`Einsum` and by ``quantize_model``)."""
    einsum_str = linen_module.merge_param("einsum_str", module.einsum_str, einsum_str)
    einsum_str = einsum_str.replace(" ", "")
    if "->" not in einsum_str or einsum_str.count(",") != 1:
        raise ValueError(f"einsum_str must be explicit ('->') with exactly two operands; "
                         f"got {einsum_str!r}.")
    kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
    bias = None
    if module.use_bias:
        bias_shape, broadcast_shape = module._get_bias_shape(einsum_str, inputs, kernel)
        bias = module.param("bias", module.bias_init, bias_shape, module.param_dtype)
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    einsum = jnp.einsum if recipe is None else QuantEinsum(recipe, collect_stats, name="qjax")
    y = einsum(einsum_str, inputs, kernel, precision=module.precision,
               preferred_element_type=module.preferred_element_type)
    if bias is not None:
        y += jnp.reshape(bias, broadcast_shape)
    return y


class Embed(nn.Embed):
    """``flax.linen.Embed`` whose ``attend`` (tied output projection) runs with ``recipe``; the
    lookup itself is exact (no matmul)."""

    recipe: RecipeLike = None
    collect_stats: bool = False

    def attend(self, query: Array) -> Array:
        return attend_forward(self, self.recipe, self.collect_stats, query)


def attend_forward(module: nn.Embed, recipe: RecipeLike, collect_stats: bool,
                   query: Array) -> Array:
    """``nn.Embed.attend`` (``query @ embedding.T``) with a recipe; statistics are sown under the
    embedding module itself."""
    recipe = C.resolve_recipe(recipe)
    query, embedding = module.promote_dtype(query, module.embedding, dtype=module.dtype)
    if recipe is None:
        return jnp.dot(query, embedding.T)
    if collect_stats:
        _sow_stats(module, C.operand_stats(query, embedding, -1, 1, recipe))
    return C._ops().dot_general(query, embedding, (((query.ndim - 1,), (1,)), ((), ())),
                                recipe=recipe, key=_quant_key(module, recipe))


def dense(features: int, fmt: str | None = None, *, recipe: RecipeLike = None,
          **dense_kwargs: Any) -> Dense:
    """A drop-in for ``flax.linen.Dense(features, **dense_kwargs)`` whose matmul is quantized.

    Args:
      features: output features.
      fmt: shorthand for ``recipe=fmt`` (a recipe name such as ``"mxfp4"``).
      recipe: a recipe name or ``qjax.recipes.Recipe`` (give ``fmt`` or ``recipe``, not both).
      **dense_kwargs: any other ``nn.Dense`` attribute (``use_bias``, ``dtype``, ``kernel_init``,
        ...), plus ``collect_stats`` / ``delayed_scaling``.

    Returns:
      A :class:`Dense` module.

    Example:
      >>> layer = qjax.dense(256, "mxfp4")            # was: nn.Dense(256)
      >>> y = layer.apply(params, x)                  # params of nn.Dense(256) load unchanged
    """
    return Dense(features, recipe=C.recipe_from(fmt, recipe), **dense_kwargs)

"""Flax NNX layers whose GEMMs run through :mod:`qjax.ops` with a recipe.

Each layer subclasses its ``flax.nnx`` counterpart and passes Flax's own injection point
(``dot_general`` / ``einsum_op`` / ``conv_general_dilated``) a static, hashable callable, so the
``kernel`` / ``bias`` parameters are Flax's. Per call, the layer draws one key from its ``"quant"``
RNG stream (stochastic recipes only) and hands it to that callable through a context variable
that lives only for the duration of the call; statistics come back the same way and are kept in
:class:`QuantStats` variables.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array

from qjax.nn import common as C
from qjax.nn.common import RecipeLike
from qjax.nn.layers import _einsum_contraction_axes


class QuantStats(nnx.Intermediate):
    """The NNX variable type holding numerics statistics (the ``"qjax_stats"`` collection): a
    layer with ``collect_stats=True`` keeps the latest ``{"lhs": {...}, "rhs": {...}}`` of its
    GEMM in the attribute ``qjax_stats``; read all of them with
    ``nnx.state(model, qjax.nnx.QuantStats)``."""


class QuantScaling(nnx.Variable):
    """The NNX variable type of delayed-scaling amax histories (the ``"qjax_scaling"``
    collection): ``nnx.state(model, qjax.nnx.QuantScaling)``."""


@dataclasses.dataclass
class _CallState:
    key: Any
    stats: dict
    uses: int = 0
    histories: tuple | None = None

    def next_key(self):
        self.uses += 1
        return None if self.key is None else jax.random.fold_in(self.key, self.uses)


_ACTIVE: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("qjax_nnx_call",
                                                                           default=None)


def _call_key(recipe):
    state = _ACTIVE.get()
    key = None if state is None else state.next_key()
    if C.needs_key(recipe) and key is None:
        raise C.missing_stream_error(recipe, "build the layer with rngs=nnx.Rngs(..., quant=seed)")
    return key


def _record_stats(enabled: bool, stats: dict):
    state = _ACTIVE.get()
    if enabled and state is not None:
        state.stats.update(stats)


def _no_out_sharding(out_sharding, what: str):
    if out_sharding is not None:
        raise ValueError(f"{what}: out_sharding is not supported with a quantizing recipe; shard "
                         "the inputs instead.")


@dataclasses.dataclass(frozen=True)
class QuantDotGeneral:
    """``lax.dot_general`` with a recipe (static; Flax NNX's ``dot_general`` argument)."""

    recipe: Any
    collect_stats: bool = False

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
        (lhs_contract, rhs_contract), _ = dimension_numbers
        _record_stats(self.collect_stats, C.operand_stats(
            lhs, rhs, lhs_contract[0], rhs_contract[0], self.recipe) if self.collect_stats else {})
        return C._ops().dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                    preferred_element_type=preferred_element_type,
                                    recipe=self.recipe, key=_call_key(self.recipe),
                                    out_sharding=out_sharding)


@dataclasses.dataclass(frozen=True)
class DelayedScalingDotGeneral:
    """``lax.dot_general`` on E4M3 operands with delayed per-tensor scales (see
    :class:`qjax.nn.DelayedScaling`); the amax histories travel through the layer's call state."""

    config: C.DelayedScaling

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
        state = _ACTIVE.get()
        if state is None or state.histories is None:
            raise RuntimeError("DelayedScalingDotGeneral is called by its qjax.nnx layer only.")
        lhs, lhs_history = C.delayed_quantize(lhs, state.histories[0], self.config)
        rhs, rhs_history = C.delayed_quantize(rhs, state.histories[1], self.config)
        state.histories = (lhs_history, rhs_history)
        sharding = {} if out_sharding is None else {"out_sharding": out_sharding}
        out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=preferred_element_type, **sharding)
        return C.cotangent_quantized(out, self.config.backward_format)


@dataclasses.dataclass(frozen=True)
class QuantEinsumOp:
    """``jnp.einsum`` of two operands with a recipe (Flax NNX's ``einsum_op`` argument)."""

    recipe: Any
    collect_stats: bool = False

    def __call__(self, subscripts, lhs, rhs, precision=None, preferred_element_type=None,
                 out_sharding=None):
        _no_out_sharding(out_sharding, "qjax.nnx.Einsum")
        if self.collect_stats:
            lhs_axis, rhs_axis = _einsum_contraction_axes(subscripts)
            _record_stats(True, C.operand_stats(lhs, rhs, lhs_axis, rhs_axis, self.recipe))
        return C._ops().einsum(subscripts, lhs, rhs, recipe=self.recipe,
                               key=_call_key(self.recipe), precision=precision,
                               preferred_element_type=preferred_element_type)


@dataclasses.dataclass(frozen=True)
class QuantConvOp:
    """``lax.conv_general_dilated`` with a recipe (Flax NNX's ``conv_general_dilated``)."""

    recipe: Any
    collect_stats: bool = False

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None,
                 preferred_element_type=None, out_sharding=None):
        _no_out_sharding(out_sharding, "qjax.nnx.Conv")
        conv = C.conv_op()
        if self.collect_stats and dimension_numbers is not None:
            dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            _record_stats(True, C.operand_stats(lhs, rhs, dn.lhs_spec[1], dn.rhs_spec[1],
                                                self.recipe))
        return conv(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type, recipe=self.recipe,
            key=_call_key(self.recipe))


def _quant_rngs(recipe, rngs):
    if not C.needs_key(recipe):
        return None
    if rngs is None or C.QUANT_STREAM not in rngs:
        raise C.missing_stream_error(recipe, "pass rngs=nnx.Rngs(params=..., quant=seed)")
    return rngs[C.QUANT_STREAM].fork()


class _Quantized:
    """Shared behaviour: the recipe, the ``"quant"`` stream, stats; set up by ``_configure``."""

    _hook: str = ""
    _op: type = QuantDotGeneral

    def _configure(self, recipe: RecipeLike, collect_stats: bool, rngs,
                   delayed_scaling: C.DelayedScaling | None = None):
        recipe = C.resolve_recipe(recipe)
        self.recipe = recipe
        self.collect_stats = collect_stats
        self.quant_rngs = _quant_rngs(recipe, rngs)
        self.delayed_scaling = delayed_scaling
        if recipe is not None:
            setattr(self, self._hook, self._op(recipe, collect_stats))
        if delayed_scaling is not None:
            if recipe is not None:
                raise ValueError("delayed_scaling replaces the recipe's forward quantization with "
                                 "per-tensor E4M3; pass recipe=None with it.")
            if self._op is not QuantDotGeneral:
                raise ValueError(f"delayed_scaling is for Linear / LinearGeneral, not "
                                 f"{type(self).__name__}.")
            history = jnp.zeros((delayed_scaling.history_length,), jnp.float32)
            self.lhs_amax_history = QuantScaling(history)
            self.rhs_amax_history = QuantScaling(history)
            self.use_running_average = False  # model.eval() sets it: histories frozen
            setattr(self, self._hook, DelayedScalingDotGeneral(delayed_scaling))

    def _run(self, call, *args, **kwargs):
        delayed = self.delayed_scaling is not None
        if self.recipe is None and not delayed:
            return call(*args, **kwargs)
        key = self.quant_rngs() if self.quant_rngs is not None else None
        histories = (self.lhs_amax_history[...], self.rhs_amax_history[...]) if delayed else None
        state = _CallState(key, {}, histories=histories)
        token = _ACTIVE.set(state)
        try:
            out = call(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        if delayed and not self.use_running_average:
            self.lhs_amax_history[...] = state.histories[0]
            self.rhs_amax_history[...] = state.histories[1]
        if state.stats:
            existing = getattr(self, "qjax_stats", None)
            if isinstance(existing, QuantStats):
                existing.set_value(dict(state.stats))
            else:
                self.qjax_stats = QuantStats(dict(state.stats))
        return out


class Linear(_Quantized, nnx.Linear):
    """``flax.nnx.Linear`` whose matmul runs with ``recipe``: same parameters, same call.

    Args (beyond ``nnx.Linear``'s):
      recipe: a recipe name, a ``qjax.recipes.Recipe``, or None (plain ``nnx.Linear``).
      collect_stats: keep operand statistics as :class:`QuantStats` (off by default).
      delayed_scaling: a :class:`qjax.nn.DelayedScaling` (with ``recipe=None``): E4M3 operands
        with per-tensor scales from amax histories kept as :class:`QuantScaling` variables,
        updated on every call unless ``use_running_average`` (``model.eval()``) is set.
      rngs: as ``nnx.Linear``; needs a ``"quant"`` stream when the recipe is stochastic.

    Example:
      >>> layer = Linear(64, 32, recipe="mxfp8", rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((4, 64))).shape
      (4, 32)
    """

    _hook = "dot_general"
    _op = QuantDotGeneral

    def __init__(self, in_features: int, out_features: int, *, recipe: RecipeLike = None,
                 collect_stats: bool = False, delayed_scaling: C.DelayedScaling | None = None,
                 rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self._configure(recipe, collect_stats, rngs, delayed_scaling)

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        return self._run(super().__call__, inputs, out_sharding=out_sharding)


class LinearGeneral(_Quantized, nnx.LinearGeneral):
    """``flax.nnx.LinearGeneral`` with a recipe; arguments as :class:`Linear`."""

    _hook = "dot_general"
    _op = QuantDotGeneral

    def __init__(self, in_features, out_features, *, recipe: RecipeLike = None,
                 collect_stats: bool = False, delayed_scaling: C.DelayedScaling | None = None,
                 rngs: nnx.Rngs, **kwargs):
        if kwargs.get("dot_general_cls") is not None and (recipe or delayed_scaling):
            raise ValueError("pass recipe= / delayed_scaling= or dot_general_cls=, not both.")
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self._configure(recipe, collect_stats, rngs, delayed_scaling)

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        return self._run(super().__call__, inputs, out_sharding=out_sharding)


class Einsum(_Quantized, nnx.Einsum):
    """``flax.nnx.Einsum`` with a recipe; arguments as :class:`Linear`."""

    _hook = "einsum_op"
    _op = QuantEinsumOp

    def __init__(self, einsum_str, kernel_shape, bias_shape=None, *, recipe: RecipeLike = None,
                 collect_stats: bool = False, rngs: nnx.Rngs, **kwargs):
        super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **kwargs)
        self._configure(recipe, collect_stats, rngs)

    def __call__(self, inputs: Array, einsum_str: str | None = None, out_sharding=None) -> Array:
        return self._run(super().__call__, inputs, einsum_str, out_sharding=out_sharding)


class Conv(_Quantized, nnx.Conv):
    """``flax.nnx.Conv`` with a recipe (through ``qjax.ops.conv_general_dilated``)."""

    _hook = "conv_general_dilated"
    _op = QuantConvOp

    def __init__(self, in_features, out_features, kernel_size, *, recipe: RecipeLike = None,
                 collect_stats: bool = False, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, out_features, kernel_size, rngs=rngs, **kwargs)
        self._configure(recipe, collect_stats, rngs)

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        return self._run(super().__call__, inputs, out_sharding=out_sharding)


QUANTIZED_CLASSES: dict[type, type] = {nnx.Linear: Linear, nnx.LinearGeneral: LinearGeneral,
                                       nnx.Einsum: Einsum, nnx.Conv: Conv}

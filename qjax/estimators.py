"""Gradient estimators: fake quantizers whose backward pass is a chosen rule.

Every estimator has one signature::

    estimator(x, fmt, *, axis=-1, key=None, **options) -> fake-quantized x (x's shape and dtype)

Its forward value is a fake quantization of ``x`` to ``fmt`` (blocks along ``axis``, the
contraction axis of a GEMM operand); its backward pass (a ``jax.custom_vjp``) is the estimator's
rule. ``get(name)`` returns one by name, ``names()`` lists them:

* ``"ste"``: straight-through (identity gradient); forward :func:`qjax.fake_quant`.
* ``"clipped_ste"``: zero gradient where the format's saturation changed ``x`` by more than
  rounding would have, identity elsewhere.
* ``"stochastic"``: stochastic-rounding forward (unbiased; needs ``key``), identity gradient.
* ``"quest"``: QuEST (Panferov et al., 2025): Gaussian MSE-optimal clipping scale on (optionally
  Hadamard-rotated) ``x`` and the trust-region gradient mask.
* ``"dge"``: the Differentiable Gradient Estimator of Wang et al. (2025), with optional Outlier
  Clamping and Compensation (OCC).
* ``"gaussian"``: pseudo-quantization noise (Gaussian, with the variance of the format's rounding
  error; needs ``key``), identity gradient.

All rules except QuEST's optional rotation are elementwise: the cotangent is multiplied by a mask
or a factor computed in the forward pass. The per-element scale of ``fmt`` (block scale times
tensor scale; 1 for plain casts) is :func:`element_scale`; the grid spacing at each element is
:func:`quantization_step`.

Example:
  >>> x = jnp.array([[0.3, 1.0, 2.6, 5.0] * 8])
  >>> y, grad = jax.value_and_grad(lambda v: get("clipped_ste")(v, "mxfp4").sum())(x)
  >>> bool(jnp.all(grad == 1.0))   # nothing saturates in this block
  True
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Key

from qjax import formats as F
from qjax import transforms as T

# The module, not the function ``qjax.quantize`` that the package namespace re-exports.
Q = importlib.import_module("qjax.quantize")

_ROUNDINGS = ("nearest", "stochastic")


# --------------------------------------------------------------------------- gradient rules


@jax.custom_vjp
def _straight_through(x, value):
    return value


def _straight_through_fwd(x, value):
    return value, None


def _straight_through_bwd(_, g):
    return g, None


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


@jax.custom_vjp
def _masked(x, value, passes):
    return value


def _masked_fwd(x, value, passes):
    return value, passes


def _masked_bwd(passes, g):
    return jnp.where(passes, g, jnp.zeros((), g.dtype)), None, None


_masked.defvjp(_masked_fwd, _masked_bwd)


@jax.custom_vjp
def _scaled(x, value, factor):
    return value


def _scaled_fwd(x, value, factor):
    return value, factor


def _scaled_bwd(factor, g):
    return (g * factor).astype(g.dtype), None, None


_scaled.defvjp(_scaled_fwd, _scaled_bwd)


def _with_identity_gradient(x, value):
    return _straight_through(x, lax.stop_gradient(value))


def _with_mask(x, value, passes):
    return _masked(x, lax.stop_gradient(value), lax.stop_gradient(passes))


def _with_factor(x, value, factor):
    return _scaled(x, lax.stop_gradient(value), lax.stop_gradient(factor))


# --------------------------------------------------------------------------- grids and scales


def _top_step(element: F.ElementEncoding) -> float:
    """Grid spacing just below ``element.max`` (0 for binary: {-1, +1} has no top interval)."""
    if isinstance(element, F.FloatEncoding):
        return 2.0 ** (element.emax - element.mantissa_bits)
    if isinstance(element, F.IntEncoding):
        return 2.0**-element.fraction_bits
    return 0.0


def _saturation_limit(element: F.ElementEncoding) -> np.float32:
    """In element units: beyond ``max + top_step / 2`` saturation changed the value by more than
    round-to-nearest on the unbounded grid would have (binary: beyond 1, the hardtanh clip)."""
    return np.float32(element.max + _top_step(element) / 2)


def _step_in_units(u, element: F.ElementEncoding):
    """Grid spacing (element units) of the binade holding ``u >= 0`` (the top binade above max)."""
    if isinstance(element, F.IntEncoding):
        return jnp.full_like(u, 2.0**-element.fraction_bits)
    if isinstance(element, F.BinaryEncoding):
        return jnp.full_like(u, 2.0)
    _, exponent = jnp.frexp(u)  # u = m * 2**exponent, m in [0.5, 1)
    floor_log2 = jnp.where(u > 0, exponent - 1, element.emin)
    binade = jnp.clip(floor_log2, element.emin, element.emax)
    return jnp.ldexp(jnp.ones_like(u), binade - element.mantissa_bits)


def _in_units(x32, scale):
    """``|x| / scale``; 0 where the scale is 0 or not a normal number (all-zero or underflowed
    groups: every element there quantizes to 0, nothing saturates)."""
    usable = scale >= np.float32(np.finfo(np.float32).tiny)
    return jnp.where(usable, jnp.abs(x32) / jnp.where(usable, scale, 1), 0), usable


def _quantize_with_scale(x32, fmt: F.Format, axis: int, rounding, key, scale_mode,
                         alpha: float | None = None):
    """Fake-quantized float32 ``x32`` and the float32 scale of each element's group.

    With ``alpha=None`` the scales are the format's own (the same steps, bit for bit, as
    :func:`qjax.fake_quant`); with ``alpha`` each group's clipping value ``alpha * RMS(group)``
    takes the place of the group statistic (QuEST), i.e. the scale the format would pick for a
    group whose absmax were ``alpha * RMS``.
    """
    if fmt.scaling is None:
        value = Q._cast_format(x32, fmt, rounding, key)
        return value, jnp.ones_like(x32)
    scaling, element = fmt.scaling, fmt.element
    block_shape = scaling.granularity.block_shape(x32.shape, axis)
    tensor_scale = Q._tensor_scale(x32, fmt) if scaling.tensor_scale else None
    grouped, padded = Q._group_view(x32, block_shape)
    reduce_axes = Q._block_axes(x32.ndim)
    if alpha is None:
        if scaling.statistic == "absmax":
            stat = Q._absmax(grouped, reduce_axes)
        else:
            total = jnp.sum(jnp.abs(grouped), axis=reduce_axes, keepdims=True)
            stat = total * (1 / Q._group_counts(x32.shape, block_shape))
    else:
        squares = jnp.sum(grouped * grouped, axis=reduce_axes, keepdims=True)
        clip = jnp.sqrt(squares * (1 / Q._group_counts(x32.shape, block_shape))) * np.float32(alpha)
        # The statistic whose scale maps the clipping value to the element maximum.
        stat = clip if scaling.statistic == "absmax" else clip * np.float32(1 / element.max)
    grouped_tensor_scale = None if tensor_scale is None else \
        tensor_scale.reshape((1, 1) * x32.ndim)
    divisor, _, reciprocal = Q._scale_from_stat(stat, fmt, scale_mode, grouped_tensor_scale)
    random_bits = None if rounding == "nearest" else Q.stochastic_bits(key, grouped.shape)
    nan = np.float32(np.nan)
    if scaling.scale.power_of_two:
        exponent = jnp.minimum(divisor, 127)
        if isinstance(element, F.BinaryEncoding):
            elements = Q._round_binary(Q._times_power_of_two(grouped, -exponent), rounding,
                                       random_bits)
            value = Q._times_power_of_two(elements, exponent)
        else:
            value = Q._round_scaled(grouped, element, exponent, rounding, random_bits)
        value = jnp.where(divisor > 127, nan, value)
        scale = jnp.where(divisor > 127, nan, Q._from_bits(Q._power_of_two_bits(exponent)))
    else:
        elements = Q.round_to_element(grouped * reciprocal, element, rounding=rounding,
                                      random_bits=random_bits)
        value = elements * divisor
        scale = divisor
    scale = jnp.broadcast_to(scale, grouped.shape)
    return Q._crop(value, padded, x32.shape), Q._crop(scale, padded, x32.shape)


def _not_saturated(x32, scale, element) -> Array:
    """The clipped-STE mask: True where saturation did not change x beyond rounding."""
    u, _ = _in_units(x32, scale)
    return ~(u > _saturation_limit(element))  # NaN (a NaN group) counts as not saturated


# --------------------------------------------------------------------------- argument checks


def _prepare(x, fmt, axis, rounding, key, scale_mode, name):
    x = jnp.asarray(x)
    fmt = F.get(fmt)
    if rounding not in _ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(_ROUNDINGS)}.")
    if rounding == "stochastic" and key is None:
        raise ValueError(f"estimator {name!r} with rounding='stochastic' needs a PRNG key: pass "
                         "key=jax.random.key(seed).")
    Q._check_arguments(x, fmt, rounding, key, scale_mode)
    if x.ndim == 0:
        raise ValueError(f"estimator {name!r} needs an array of rank >= 1; got a scalar.")
    return x, fmt, Q._normalize_axis(axis, x.ndim)


def _require_key(key, name):
    if key is None:
        raise ValueError(f"estimator {name!r} draws random numbers and needs a PRNG key: pass "
                         "key=jax.random.key(seed).")


def _check_positive(value, what):
    if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive number, got {value!r}.")


# --------------------------------------------------------------------------- estimators


def ste(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
        key: Key[Array, ""] | None = None, rounding: str = "nearest",
        scale_mode: str = "floor") -> Float[Array, "..."]:
    """Straight-through estimator: forward :func:`qjax.fake_quant`, gradient the identity
    (Bengio, Léonard & Courville, 2013, "Estimating or Propagating Gradients Through Stochastic
    Neurons for Conditional Computation").

    Args:
      x: a float32/bfloat16/float16 array.
      fmt: a format name or :class:`~qjax.formats.Format`.
      axis: the axis blocks run along.
      key: PRNG key, needed only with ``rounding="stochastic"``.
      rounding: ``"nearest"`` or ``"stochastic"``.
      scale_mode: ``"floor"`` or ``"rceil"`` (E8M0 scales only).

    Returns:
      ``qjax.fake_quant(x, fmt, ...)``, bit for bit; ``d out / d x = 1``.

    Example:
      >>> ste(jnp.array([0.3, 1.0, 2.6, 5.0]), "mxfp4")
      Array([0.5, 1. , 3. , 4. ], dtype=float32)
    """
    return Q.fake_quant(x, fmt, axis=axis, rounding=rounding, key=key, scale_mode=scale_mode)


def clipped_ste(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
                key: Key[Array, ""] | None = None, rounding: str = "nearest",
                scale_mode: str = "floor") -> Float[Array, "..."]:
    """Clipped straight-through estimator: forward :func:`qjax.fake_quant`; the gradient is zero
    where saturation changed the value beyond rounding, the identity elsewhere (the gradient of
    the clamp in ``round(clamp(x / s))``; Hubara et al., 2016, "Binarized Neural Networks";
    Courbariaux et al.'s hardtanh STE for binary).

    Rule, with ``s`` the element's scale (:func:`element_scale`) and ``E`` the element encoding::

        d out / d x = 0  if |x| / s > E.max + top_step(E) / 2   (binary: |x| / s > 1)
                      1  otherwise

    ``top_step`` is the grid spacing below ``E.max`` (e2m1: 2, e4m3: 32, int: 1). Up to half a
    top step above the maximum, round-to-nearest on the unbounded grid would also give ``E.max``,
    so only the values that saturation moved further count as clipped; this also keeps a group's
    own maximum (which an FP32 scale can place one ulp above ``E.max``) unclipped. Groups whose
    scale is zero (all elements quantize to 0: an underflow, not a saturation) and NaN groups pass
    the gradient. With absmax scales nothing saturates except through the rounding of the scale:
    MX ``"floor"`` scales put block maxima in [4, 8) for e2m1, so values of 7 and above clip.

    Args: as :func:`ste`.

    Returns:
      ``qjax.fake_quant(x, fmt, ...)`` bit for bit, with the masked gradient.

    Example:
      >>> x = jnp.array([0.5, 1.0, 2.0, 7.5] + [0.0] * 28)  # scale 1: 7.5 saturates to 6
      >>> jax.grad(lambda v: clipped_ste(v, "mxfp4").sum())(x)[:4]
      Array([1., 1., 1., 0.], dtype=float32)
    """
    x, fmt, axis = _prepare(x, fmt, axis, rounding, key, scale_mode, "clipped_ste")
    return _clipped_ste(x, fmt, axis, rounding, key, scale_mode)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5))
def _clipped_ste(x, fmt, axis, rounding, key, scale_mode):
    x32 = x.astype(jnp.float32)
    value, scale = _quantize_with_scale(x32, fmt, axis, rounding, key, scale_mode)
    return _with_mask(x, value.astype(x.dtype), _not_saturated(x32, scale, fmt.element))


def stochastic(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
               key: Key[Array, ""] | None = None, rounding: str = "stochastic",
               scale_mode: str = "floor") -> Float[Array, "..."]:
    """Stochastic rounding with a straight-through gradient (Gupta et al., 2015, "Deep Learning
    with Limited Numerical Precision"; the rounding of the backward GEMM operands in Tseng et al.
    2025, Quartet, NVIDIA's NVFP4 recipe).

    Forward: ``qjax.fake_quant(x, fmt, rounding="stochastic", key=key)``: each value rounds to one
    of its two neighbouring grid points with probabilities that make ``E[out] = x`` wherever
    nothing saturates (scales as for nearest rounding). Gradient: the identity.

    Args:
      x, fmt, axis, scale_mode: as :func:`ste`.
      key: a PRNG key (required); the same key gives the same output.
      rounding: must be ``"stochastic"`` (accepted so a recipe's rounding can be passed through).

    Returns:
      The stochastically rounded ``x``, bit for bit ``qjax.fake_quant``'s.

    Example:
      >>> y = stochastic(jnp.full((32,), 0.7), "mxfp4", key=jax.random.key(0))
      >>> sorted(set(np.asarray(y).tolist()))   # scale 2^-3: 0.7 = 5.6 elements -> 4 or 6
      [0.5, 0.75]
    """
    _require_key(key, "stochastic")
    if rounding != "stochastic":
        raise ValueError(f"estimator 'stochastic' rounds stochastically; rounding={rounding!r} "
                         "is not valid (use estimator 'ste' for round-to-nearest).")
    x = jnp.asarray(x)
    value = Q.fake_quant(x, fmt, axis=axis, rounding="stochastic", key=key,
                         scale_mode=scale_mode)
    return _with_identity_gradient(x, value)


# QuEST ------------------------------------------------------------------------------------------


def _element_grid(element: F.ElementEncoding) -> np.ndarray:
    """The non-negative values of an element encoding (float64, ascending); binary: [1]."""
    if isinstance(element, F.BinaryEncoding):
        return np.array([1.0])
    if isinstance(element, F.IntEncoding):
        return np.arange(element.max_code + 1) * 2.0**-element.fraction_bits
    m = element.mantissa_bits
    fields = np.arange(2**element.exponent_bits)[:, None]
    mantissas = np.arange(2**m)[None, :] / 2**m
    values = np.where(fields == 0, mantissas * 2.0**element.emin,
                      (1 + mantissas) * 2.0 ** (fields - element.bias)).ravel()
    return np.unique(values[values <= element.max])


def _gaussian_mse(positive_grid: np.ndarray, clip: float) -> float:
    """E[(X - q(X))^2] for X ~ N(0, 1) rounded to nearest on the symmetric grid
    ``±positive_grid * clip / max(positive_grid)`` (values beyond the ends clamp)."""
    points = positive_grid * (clip / positive_grid[-1])
    points = np.unique(np.concatenate([-points, points]))
    bounds = np.concatenate([[-np.inf], (points[1:] + points[:-1]) / 2, [np.inf]])
    a, b = bounds[:-1], bounds[1:]
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in bounds])
    pdf = np.where(np.isfinite(bounds), np.exp(-np.minimum(bounds**2, 1e4) / 2), 0.0)
    pdf = pdf / math.sqrt(2 * math.pi)
    mass = cdf[1:] - cdf[:-1]
    # int_a^b x phi = phi(a) - phi(b);  int_a^b x^2 phi = mass + a phi(a) - b phi(b)
    first = pdf[:-1] - pdf[1:]
    a_pdf = np.where(np.isfinite(a), a, 0.0) * pdf[:-1]
    b_pdf = np.where(np.isfinite(b), b, 0.0) * pdf[1:]
    second = mass + a_pdf - b_pdf
    return float(np.sum(second - 2 * points * first + points**2 * mass))


@functools.lru_cache(maxsize=64)
def _mse_optimal_clip(positive_grid: tuple[float, ...]) -> float:
    """The clipping value c minimising :func:`_gaussian_mse` (a log-spaced scan, then golden
    section search around its best point)."""
    grid = np.asarray(positive_grid, np.float64)
    candidates = np.geomspace(0.05, 200.0, 481)
    errors = [_gaussian_mse(grid, c) for c in candidates]
    best = int(np.argmin(errors))
    lo, hi = candidates[max(best - 1, 0)], candidates[min(best + 1, len(candidates) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c1, c2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = _gaussian_mse(grid, c1), _gaussian_mse(grid, c2)
    for _ in range(200):
        if hi - lo < 1e-12 * hi:
            break
        if f1 < f2:
            hi, c2, f2 = c2, c1, f1
            c1 = hi - ratio * (hi - lo)
            f1 = _gaussian_mse(grid, c1)
        else:
            lo, c1, f1 = c1, c2, f2
            c2 = lo + ratio * (hi - lo)
            f2 = _gaussian_mse(grid, c2)
    return float((lo + hi) / 2)


def gaussian_clip_ratio(fmt: F.FormatLike) -> float:
    """QuEST's ``alpha`` for ``fmt``: the clipping value, in standard deviations, that minimises
    the mean squared error of rounding N(0, 1) data to the format's element grid scaled so that
    ``element.max`` sits at the clipping value.

    QuEST (Panferov et al., 2025) tabulates this for uniform 2^b-level grids (b = 4: 2.5139,
    b = 1: sqrt(2/pi) = 0.7979); Quartet (Castro et al., 2025) uses 2.9225 for the FP4 (E2M1)
    grid. This function computes it for any element encoding (exact Gaussian cell integrals,
    golden-section search), so those constants are reproduced rather than copied.

    Args:
      fmt: a format name or :class:`~qjax.formats.Format`.

    Returns:
      ``alpha`` (float).

    Example:
      >>> round(gaussian_clip_ratio("mxfp4"), 4)
      2.9225
    """
    grid = _element_grid(F.get(fmt).element)
    return _mse_optimal_clip(tuple(float(v) for v in grid))


def quest(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
          key: Key[Array, ""] | None = None, rotate: bool = False, rotate_back: bool = False,
          hadamard_block_size: int | None = None, signs: Float[Array, "b"] | None = None,
          alpha: float | None = None, trust: float = 1.0, rounding: str = "nearest",
          scale_mode: str = "floor") -> Float[Array, "..."]:
    """QuEST: Gaussian-fitted quantization with the trust-region gradient mask (Panferov et al.,
    2025, "QuEST: Stable Training of LLMs with 1-Bit Weights and Activations"; its MXFP4 form is
    Quartet's forward pass, Castro et al., 2025).

    Forward, on ``z = x`` (or ``z = hadamard(x)`` along ``axis`` with ``rotate=True``):

    * per scaling group of ``fmt``: clipping value ``c = alpha * RMS(z_group)``, where ``alpha``
      minimises the MSE of a Gaussian on the element grid (:func:`gaussian_clip_ratio`: 2.9225
      for E2M1; QuEST's own table is for uniform 2^b-level grids, 2.5139 at 4 bits);
    * the group's scale is the one ``fmt`` picks for a group whose absmax were ``c`` (``c / max``
      for FP32/BF16 scales, rounded to E4M3 for NVFP4 under its tensor scale, and for E8M0
      ``2^(floor(log2 c) - emax)`` (``scale_mode="floor"``) or ``2^ceil(log2(c / max))``
      (``"rceil"``); Quartet's kernel instead takes ``2^floor(log2(c / max))``);
    * ``q = round_to_nearest_saturating(z / s) * s``.

    Backward (the trust estimator): the gradient passes where ``|z - q| <= trust * step / 2``,
    ``step`` the grid spacing at ``|z|`` times the scale (the top binade's spacing beyond the
    maximum), and is zero elsewhere. With the default ``trust = 1`` (the QuEST code's default
    trust, ``alpha / (2^b - 1)`` standard deviations, is exactly half a step) every value inside
    the range passes and values clipped by more than half a step do not. With stochastic rounding
    errors reach a whole step: use ``trust=2`` there.

    Domains: with ``rotate=False`` (the default) ``x`` is quantized as given: this is how
    :mod:`qjax.ops` calls it, after rotating both GEMM operands itself (``GemmSpec.transform``).
    With ``rotate=True`` the estimator applies ``qjax.hadamard(x, axis=axis,
    block_size=hadamard_block_size, signs=signs)`` in float32 first and returns the quantized
    value in the Hadamard domain (``rotate_back=False``: the other GEMM operand must be rotated
    the same way, which leaves the product unchanged) or rotated back to x's domain
    (``rotate_back=True``: a drop-in replacement for ``x``). The trust mask always lives in the
    rotated domain; gradients flow through the rotations by the chain rule.

    Args:
      x: a float array (float32, bfloat16, float16).
      fmt: a scaled format (name or :class:`~qjax.formats.Format`).
      axis: the axis blocks (and the rotation) run along.
      key: PRNG key, only for ``rounding="stochastic"``.
      rotate: apply the Hadamard transform to ``x`` first.
      rotate_back: with ``rotate``, return ``inverse_hadamard`` of the quantized value.
      hadamard_block_size: block of the rotation (power of two dividing the axis; ``None``: the
        whole axis, a power of two). QuEST's code uses 128, Quartet 32.
      signs: optional ±1 vector of the randomized transform (:func:`qjax.random_signs`).
      alpha: the clipping ratio; ``None`` for :func:`gaussian_clip_ratio`.
      trust: the trust factor (multiples of half a step).
      rounding, scale_mode: as :func:`ste`.

    Returns:
      The quantized array, x's shape and dtype, in the domain described above.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (4, 64))
      >>> y = quest(x, "mxfp4", rotate=True, hadamard_block_size=32)
      >>> y.shape, y.dtype
      ((4, 64), dtype('float32'))
    """
    x, fmt, axis = _prepare(x, fmt, axis, rounding, key, scale_mode, "quest")
    if fmt.scaling is None:
        raise ValueError(f"estimator 'quest' fits a scale per group and needs a scaled format; "
                         f"{fmt.name!r} is a plain cast.")
    if rotate_back and not rotate:
        raise ValueError("rotate_back=True undoes the estimator's own rotation; it needs "
                         "rotate=True.")
    if not rotate and (hadamard_block_size is not None or signs is not None):
        raise ValueError("hadamard_block_size and signs configure the estimator's own rotation; "
                         "they need rotate=True.")
    alpha = gaussian_clip_ratio(fmt) if alpha is None else alpha
    _check_positive(alpha, "alpha")
    _check_positive(trust, "trust")
    x32 = x.astype(jnp.float32)
    if rotate:
        x32 = T.hadamard(x32, axis=axis, block_size=hadamard_block_size, signs=signs)
    z = _quest_core(x32, fmt, axis, rounding, key, scale_mode, float(alpha), float(trust))
    if rotate_back:
        z = T.inverse_hadamard(z, axis=axis, block_size=hadamard_block_size, signs=signs)
    return z.astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5, 6, 7))
def _quest_core(z, fmt, axis, rounding, key, scale_mode, alpha, trust):
    value, scale = _quantize_with_scale(z, fmt, axis, rounding, key, scale_mode, alpha)
    u, usable = _in_units(z, scale)
    allowed = np.float32(trust / 2) * _step_in_units(
        jnp.minimum(u, np.float32(fmt.element.max)), fmt.element) * scale
    passes = ~(jnp.abs(z - value) > allowed) | ~usable
    return _with_mask(z, value, passes)


# DGE --------------------------------------------------------------------------------------------


def _dge_derivative(u, element: F.ElementEncoding, k: float, derivative_clip: float):
    """Wang et al.'s power-function derivative at ``u = |x| / s >= 0`` (element units)."""
    u = jnp.minimum(u, np.float32(element.max))
    step = _step_in_units(u, element)
    lower = jnp.floor(u / step) * step
    position = (u - lower) / step  # in [0, 1): where u sits in its grid interval
    distance = jnp.abs(2 * position - 1)
    derivative = jnp.power(distance, np.float32(1 / k - 1)) * np.float32(1 / k)
    return jnp.minimum(derivative, np.float32(derivative_clip))


def _quantile_bounds(x32, quantile: float):
    """(lower, upper) clamp bounds: the sorted values at indices ``int((1 - q) n)`` and
    ``int(q n)`` over the whole tensor (the OCC rule of Wang et al.'s code)."""
    n = x32.size
    ordered = jnp.sort(x32.ravel())
    return ordered[int((1 - quantile) * n)], ordered[min(int(quantile * n), n - 1)]


def dge(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
        key: Key[Array, ""] | None = None, k: float = 5.0, derivative_clip: float = 3.0,
        outlier_quantile: float | None = None, rounding: str = "nearest",
        scale_mode: str = "floor") -> Float[Array, "..."]:
    """Differentiable Gradient Estimator, optionally with Outlier Clamping and Compensation
    (Wang et al., 2025, "Optimizing Large Language Model Training Using FP4 Quantization").

    Forward: :func:`qjax.fake_quant` (round to nearest by default). Backward: the derivative of a
    smooth power-function approximation of the quantizer. In element units ``u = |x| / s`` (``s``
    the element's scale), on the grid interval ``[lo, lo + δ)`` holding ``u`` (``δ`` the grid
    spacing there), the quantizer is approximated by

        f(u) = lo + δ/2 · (1 + sign(2t - 1) · |2t - 1|^(1/k)),   t = (u - lo) / δ,

    whose derivative gives the gradient factor

        d out / d x = min(|2t - 1|^(1/k - 1) / k, derivative_clip)

    (k = 5 and a clip at 3 in the paper's code; large near the middle of an interval, ``1/k`` at
    grid points; its mean over an interval is 1 without the clip). The factor is scale invariant.
    Values clipped by saturation (as in :func:`clipped_ste`) get 0; at or just above the maximum
    the derivative of the grid point, ``1/k``. ``k = 1`` gives the STE.

    OCC (``outlier_quantile=q``, e.g. 0.999 or 0.99, for activations): ``x`` is clamped to
    ``[x_(1-q), x_(q)]`` (values at sorted indices ``int((1-q) n)`` and ``int(q n)`` of the whole
    tensor), the clamped tensor is quantized (its scales no longer set by the outliers), and the
    residual ``x - clamp(x)`` (non-zero for ~2(1-q) of the values) is added back in high
    precision: ``out = Q(clamp(x)) + (x - clamp(x))``, so a GEMM on ``out`` computes the paper's
    ``Q(Y_c) W + ΔY W`` with a dense ΔY. Gradient: the DGE factor at the clamped value inside the
    bounds, 1 outside (the compensation is exact there). Use ``k=1`` for OCC with an STE.

    Args:
      x, fmt, axis, key, rounding, scale_mode: as :func:`ste`.
      k: sharpness of the approximation (> 0).
      derivative_clip: upper bound of the gradient factor (> 0).
      outlier_quantile: ``None`` (no OCC) or a quantile in (0.5, 1).

    Returns:
      The fake-quantized ``x`` (plus the OCC residual), x's shape and dtype.

    Example:
      >>> x = jnp.array([0.25, 1.0, 4.0, 5.0] + [0.0] * 28)   # scale 1: mid-interval, grid points
      >>> jax.grad(lambda v: dge(v, "mxfp4").sum())(x)[:4]
      Array([3. , 0.2, 0.2, 3. ], dtype=float32)
    """
    x, fmt, axis = _prepare(x, fmt, axis, rounding, key, scale_mode, "dge")
    if isinstance(fmt.element, F.BinaryEncoding):
        raise ValueError("estimator 'dge' interpolates between grid points; the binary format "
                         "{-1, +1} has one interval. Use 'clipped_ste' or 'ste'.")
    _check_positive(k, "k")
    _check_positive(derivative_clip, "derivative_clip")
    if outlier_quantile is not None and not (
            isinstance(outlier_quantile, (int, float)) and 0.5 < outlier_quantile < 1):
        raise ValueError(f"outlier_quantile must be None or a number in (0.5, 1) such as 0.999; "
                         f"got {outlier_quantile!r}.")
    quantile = None if outlier_quantile is None else float(outlier_quantile)
    return _dge(x, fmt, axis, rounding, key, scale_mode, float(k), float(derivative_clip),
                quantile)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5, 6, 7, 8))
def _dge(x, fmt, axis, rounding, key, scale_mode, k, derivative_clip, quantile):
    x32 = x.astype(jnp.float32)
    clamped = x32
    if quantile is not None:
        lower, upper = _quantile_bounds(x32, quantile)
        clamped = jnp.clip(x32, lower, upper)
    value, scale = _quantize_with_scale(clamped, fmt, axis, rounding, key, scale_mode)
    u, usable = _in_units(clamped, scale)
    factor = jnp.where(usable, _dge_derivative(u, fmt.element, k, derivative_clip), 1)
    factor = jnp.where(_not_saturated(clamped, scale, fmt.element), factor, 0)
    if quantile is not None:
        value = value + (x32 - clamped)
        factor = jnp.where(clamped == x32, factor, 1)
    return _with_factor(x, value.astype(x.dtype), factor.astype(jnp.float32))


# Gaussian pseudo-quantization -------------------------------------------------------------------


def gaussian(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
             key: Key[Array, ""] | None = None, noise_scale: float = 1 / math.sqrt(12),
             scale_mode: str = "floor") -> Float[Array, "..."]:
    """Pseudo-quantization training by Gaussian weight sampling (Ahn & Yoo, 2025, "Gaussian Weight
    Sampling for Scalable, Efficient and Stable Pseudo-Quantization Training", arXiv 2505.11170;
    uniform-noise PQT: Défossez et al., 2021, DiffQ).

    Forward: ``x + noise_scale * step(x) * ε``, ``ε ~ N(0, 1)`` independent per element, with
    ``step(x)`` the spacing of ``fmt``'s grid at ``x`` under the format's own scales
    (:func:`quantization_step`), computed in float32 and cast once to x's dtype (the "addition and
    subsequent FP cast" of the paper). The default ``noise_scale = 1/sqrt(12)`` gives the noise the
    variance ``step² / 12`` of the round-to-nearest error (uniform over a step); the values are not
    clipped to the format's range. Gradient: the identity (the noise is independent of ``x``).

    Args:
      x, fmt, axis, scale_mode: as :func:`ste`.
      key: a PRNG key (required).
      noise_scale: the noise's standard deviation in grid steps (> 0).

    Returns:
      ``x`` plus noise, x's shape and dtype.

    Example:
      >>> x = jnp.linspace(-4, 4, 64)
      >>> y = gaussian(x, "mxfp4", key=jax.random.key(0))
      >>> y.shape, bool(jnp.all(jnp.abs(y - x) < 2.0))
      ((64,), True)
    """
    _require_key(key, "gaussian")
    _check_positive(noise_scale, "noise_scale")
    x, fmt, axis = _prepare(x, fmt, axis, "nearest", None, scale_mode, "gaussian")
    return _gaussian(x, fmt, axis, key, scale_mode, float(noise_scale))


@functools.partial(jax.jit, static_argnums=(1, 2, 4, 5))
def _gaussian(x, fmt, axis, key, scale_mode, noise_scale):
    x32 = x.astype(jnp.float32)
    step = _quantization_step(x32, fmt, axis, scale_mode)
    noise = jax.random.normal(key, x.shape, jnp.float32) * (step * np.float32(noise_scale))
    return _with_identity_gradient(x, (x32 + noise).astype(x.dtype))


# --------------------------------------------------------------------------- helpers


def element_scale(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
                  scale_mode: str = "floor") -> Float[Array, "..."]:
    """The scale each element of ``x`` is quantized with: its group's block scale times the
    tensor scale (float32, x's shape; 1 for plain casts; NaN in NaN groups).

    Example:
      >>> element_scale(jnp.array([1.0, 5.0] + [0.0] * 30), "mxfp4")[:2]   # 2^(floor(log2 5) - 2)
      Array([1., 1.], dtype=float32)
    """
    x, fmt, axis = _prepare(x, fmt, axis, "nearest", None, scale_mode, "element_scale")
    return _element_scale(x, fmt, axis, scale_mode)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _element_scale(x, fmt, axis, scale_mode):
    return _quantize_with_scale(x.astype(jnp.float32), fmt, axis, "nearest", None, scale_mode)[1]


def quantization_step(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
                      scale_mode: str = "floor") -> Float[Array, "..."]:
    """The spacing of ``fmt``'s grid at each element of ``x`` (float32, x's shape): the element
    scale times the element encoding's spacing in the binade of ``|x| / scale`` (the subnormal
    spacing near 0, the top binade's beyond the maximum; ``2**-fraction_bits`` for integers).
    0 where the scale is 0 (every value there quantizes to 0).

    Example:
      >>> quantization_step(jnp.array([0.2, 1.2, 2.5, 5.0] + [0.0] * 28), "mxfp4")[:4]
      Array([0.5, 0.5, 1. , 2. ], dtype=float32)
    """
    x, fmt, axis = _prepare(x, fmt, axis, "nearest", None, scale_mode, "quantization_step")
    return _quantization_step(x.astype(jnp.float32), fmt, axis, scale_mode)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantization_step(x32, fmt, axis, scale_mode):
    scale = _quantize_with_scale(x32, fmt, axis, "nearest", None, scale_mode)[1]
    u, usable = _in_units(x32, scale)
    return jnp.where(usable, _step_in_units(u, fmt.element) * scale, 0)


# --------------------------------------------------------------------------- registry


def _with_option_check(fn):
    """Rejects unknown keyword options with an error that lists the estimator's options."""
    parameters = inspect.signature(fn).parameters
    options = tuple(p for p in parameters if p not in ("x", "fmt"))

    @functools.wraps(fn)
    def wrapper(x, fmt, **kwargs):
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise TypeError(f"estimator {fn.__name__!r} got unknown option(s) {unknown}; valid "
                            f"options: {', '.join(options)}.")
        return fn(x, fmt, **kwargs)

    return wrapper


ste = _with_option_check(ste)
clipped_ste = _with_option_check(clipped_ste)
stochastic = _with_option_check(stochastic)
quest = _with_option_check(quest)
dge = _with_option_check(dge)
gaussian = _with_option_check(gaussian)

_ESTIMATORS = {
    "ste": ste,
    "clipped_ste": clipped_ste,
    "stochastic": stochastic,
    "quest": quest,
    "dge": dge,
    "gaussian": gaussian,
}


def names() -> tuple[str, ...]:
    """The registered estimator names."""
    return tuple(_ESTIMATORS)


def get(name: str):
    """The estimator registered under ``name``: ``f(x, fmt, *, axis=-1, key=None, **options)``.

    Raises:
      ValueError: unknown name; the message lists the valid names.

    Example:
      >>> get("ste")(jnp.array([0.3, 1.0, 2.6, 5.0]), "mxfp4")
      Array([0.5, 1. , 3. , 4. ], dtype=float32)
    """
    if isinstance(name, str) and name in _ESTIMATORS:
        return _ESTIMATORS[name]
    raise ValueError(f"unknown estimator {name!r}; valid names: {', '.join(_ESTIMATORS)}.")


__all__ = [
    "clipped_ste",
    "dge",
    "element_scale",
    "gaussian",
    "gaussian_clip_ratio",
    "get",
    "names",
    "quantization_step",
    "quest",
    "ste",
    "stochastic",
]

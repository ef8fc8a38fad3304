"""Quantizers: ``quantize``, ``dequantize``, ``fake_quant`` and the ``QArray`` they produce.

All rounding is done on float32 bit patterns with integer operations (no XLA casts to sub-byte
types, no ``exp2``/``log2``), so results are bit-exact and identical on every backend. The rules
are written down in ``docs/numerics.md``; ``tests/reference.py`` is an independent NumPy
implementation of them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Integer, Key

from qjax import formats as F
from qjax.config import kernels_enabled, single_gpu

Rounding = Literal["nearest", "stochastic"]
ScaleMode = Literal["floor", "rceil"]
_ROUNDINGS = ("nearest", "stochastic")
_SCALE_MODES = ("floor", "rceil")

_F32_NAN_BITS = 0x7FC00000
_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)


# --------------------------------------------------------------------------- float32 bit helpers


def _bits(x):
    return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def _from_bits(b):
    return lax.bitcast_convert_type(b.astype(jnp.uint32), jnp.float32)


def _exponent_and_mantissa(abs_bits):
    """Unbiased exponent (subnormals normalised as 2^-126 * 0.m) and 24-bit significand."""
    biased = (abs_bits >> 23).astype(jnp.int32)
    significand = (abs_bits & 0x7FFFFF) | jnp.where(biased > 0, jnp.uint32(0x800000), jnp.uint32(0))
    return jnp.maximum(biased, 1) - 127, significand


def _compose(k, exponent):
    """float32 with value ``k * 2**exponent`` for integers ``0 <= k < 2**25``, built from bits so no
    float unit can flush subnormals; below 2**-126 the result is a float32 subnormal, rounded to
    nearest-even where it is not representable."""
    k = k.astype(jnp.uint32)
    lead = 31 - lax.clz(k).astype(jnp.int32)  # position of the leading one bit
    biased = exponent + lead + 127
    mantissa = jnp.where(lead <= 23, k << jnp.clip(23 - lead, 0, 31).astype(jnp.uint32),
                         k >> jnp.clip(lead - 23, 0, 31).astype(jnp.uint32)) & 0x7FFFFF
    normal = (jnp.clip(biased, 0, 255).astype(jnp.uint32) << 23) | mantissa
    left = exponent + 149  # subnormal bits are k * 2**(exponent + 149)
    right = jnp.clip(-left, 1, 31).astype(jnp.uint32)
    kept, dropped = k >> right, k & ((jnp.uint32(1) << right) - 1)
    half = jnp.uint32(1) << (right - 1)
    up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
    subnormal = jnp.where(left >= 0, k << jnp.clip(left, 0, 31).astype(jnp.uint32),
                          jnp.where(left < -25, jnp.uint32(0), kept + up.astype(jnp.uint32)))
    out = jnp.where(biased >= 1, normal, subnormal)
    return _from_bits(jnp.where(k == 0, jnp.uint32(0), out))


def _times_power_of_two(v, exponent):
    """``v * 2**exponent`` for float32 ``v`` and integer ``exponent``, exactly (integer ops)."""
    b = _bits(v)
    sign, abs_bits = b & _SIGN, b & _ABS
    e, significand = _exponent_and_mantissa(abs_bits)
    out = _compose(significand, e - 23 + exponent)
    out = jnp.where(abs_bits >= 0x7F800000, _from_bits(abs_bits), out)
    return _from_bits(_bits(out) | sign)


def _reciprocal(d):
    """Correctly rounded float32 ``1 / d`` for positive ``d``, by integer long division: float
    division is not correctly rounded on every backend (XLA on GPU differs from IEEE by an ulp at
    times). NaN -> NaN, +Inf -> 0; results beyond float32 range become +Inf."""
    abs_bits = _bits(d) & _ABS
    exponent, significand = _exponent_and_mantissa(abs_bits)
    lead = 31 - lax.clz(significand).astype(jnp.int32)
    significand = significand << jnp.clip(23 - lead, 0, 31).astype(jnp.uint32)  # normalise
    exponent = exponent + lead - 23
    # 1/d = 2**47 / significand * 2**(-24 - exponent); quotient of 2**47 (<= 25 bits) bit by bit.
    # Unrolled, the chain fuses into its neighbours on the GPU; XLA's CPU compiler takes minutes on
    # it for some shapes, so there it is a loop of 5 x 5 steps.
    def step(_, carry):
        quotient, remainder = carry
        bit = remainder >= significand
        remainder = jnp.where(bit, remainder - significand, remainder)
        return (quotient << 1) | bit.astype(jnp.uint32), remainder << 1

    quotient, remainder = lax.fori_loop(
        0, 25, step, (jnp.zeros_like(significand), jnp.full_like(significand, 1 << 23)),
        unroll=5 if jax.default_backend() == "cpu" else True)
    # remainder now holds 2 * (true remainder): round half up; exact halves cannot occur.
    rounded = quotient + (remainder > significand).astype(jnp.uint32)
    out_exponent = -24 - exponent
    out = _compose(rounded, out_exponent)
    # A subnormal result is rounded once, from the truncated quotient and a sticky bit (rounding
    # the already rounded quotient again would round twice).
    sticky = (quotient << 1) | (remainder != 0).astype(jnp.uint32)
    out = jnp.where(_bits(out) < 0x800000, _compose(sticky, out_exponent - 1), out)
    quotient = rounded
    out = jnp.where(out_exponent + 31 - lax.clz(quotient).astype(jnp.int32) > 127,
                    np.float32(np.inf), out)
    out = jnp.where(abs_bits == 0x7F800000, np.float32(0), out)
    return jnp.where(abs_bits > 0x7F800000, np.float32(np.nan), out)


def _floor_log2(abs_bits):
    """floor(log2(|x|)) of positive finite float32 magnitudes (bit patterns), subnormals included."""
    exponent, significand = _exponent_and_mantissa(abs_bits)
    lead = 31 - lax.clz(significand).astype(jnp.int32)
    return exponent + lead - 23


def _power_of_two_bits(exponent):
    """float32 bit patterns of 2**exponent (subnormal below 2**-126, 0 below 2**-149)."""
    exponent = jnp.asarray(exponent, jnp.int32)
    normal = (jnp.clip(exponent + 127, 1, 254).astype(jnp.uint32)) << 23
    subnormal = jnp.where(exponent < -149, jnp.uint32(0),
                          jnp.uint32(1) << jnp.clip(exponent + 149, 0, 31).astype(jnp.uint32))
    return jnp.where(exponent >= -126, normal, subnormal)


def _round_scaled(x, element, scale_exponent, rounding, random_bits, saturate=True):
    """The value of the grid ``element * 2**scale_exponent`` nearest to float32 ``x``, as float32.

    Works on the bit pattern of ``x``: rounding it to a multiple of the grid step is clearing its low
    bits (a carry into the exponent field is the move to the next binade), so no float arithmetic
    is involved and nothing is flushed. Steps larger than x itself (the grid's subnormal region)
    round to 0 or to one step. Stochastic rounding adds uniform random low bits before clearing.
    """
    b = _bits(x)
    sign, a = b & _SIGN, b & _ABS
    is_nan = a > 0x7F800000
    a = jnp.minimum(a, 0x7F800000)
    biased = (a >> 23).astype(jnp.int32)
    ulp_exponent = jnp.maximum(biased, 1) - 150  # exponent of the last bit of x's significand
    if isinstance(element, F.IntEncoding):
        step_exponent = scale_exponent - element.fraction_bits
    else:
        lowest = element.emin + scale_exponent
        step_exponent = jnp.maximum(_floor_log2(a), lowest) - element.mantissa_bits
    step_exponent = jnp.broadcast_to(step_exponent, a.shape)
    shift = step_exponent - ulp_exponent  # low bits of x that the grid cannot hold
    in_binade = jnp.clip(shift, 1, 23).astype(jnp.uint32)
    mask = (jnp.uint32(1) << in_binade) - 1
    significand = jnp.where(biased > 0, (a & 0x7FFFFF) | 0x800000, a)
    if rounding == "nearest":
        half = jnp.uint32(1) << (in_binade - 1)
        remainder = a & mask
        odd = ((significand >> in_binade) & 1) == 1  # the implicit bit when shift == 23
        up = (remainder > half) | ((remainder == half) & odd)
        cleared = (a & ~mask) + jnp.where(up, mask + 1, jnp.uint32(0))
        # Below the grid's first step q: q if x > q/2, else 0 (a tie goes to the even 0).
        below = jnp.where(a > _power_of_two_bits(step_exponent - 1),
                          _power_of_two_bits(step_exponent), jnp.uint32(0))
    else:
        cleared = (a + (random_bits & mask)) & ~mask
        # Up to one step with probability x / q = significand / 2**shift.
        wide = jnp.clip(shift, 1, 31).astype(jnp.uint32)
        extra = jnp.clip(shift - 31, 0, 31).astype(jnp.uint32)  # bias below 2**-31 of a step
        up = (random_bits & ((jnp.uint32(1) << wide) - 1)) < (significand >> extra)
        below = jnp.where(up, _power_of_two_bits(step_exponent), jnp.uint32(0))
    out = jnp.where(shift <= 0, a, jnp.where(shift <= 23, cleared, below))
    if isinstance(scale_exponent, int) and scale_exponent == 0:  # no ops for a constant
        limit = np.float32(element.max).view(np.uint32)
    else:
        limit = _bits(_times_power_of_two(np.float32(element.max), scale_exponent))
    limit = jnp.broadcast_to(limit, a.shape)
    if saturate or not isinstance(element, F.FloatEncoding) or element.specials == "none":
        out = jnp.minimum(out, limit)
    else:
        overflow = jnp.uint32(0x7F800000 if element.has_inf else _F32_NAN_BITS)
        out = jnp.where(out > limit, overflow, out)
    if isinstance(element, F.IntEncoding):
        sign = jnp.where(out == 0, jnp.uint32(0), sign)  # integers have no -0
    has_nan = isinstance(element, F.FloatEncoding) and element.has_nan
    out = jnp.where(is_nan, jnp.uint32(_F32_NAN_BITS if has_nan else 0), out | sign)
    return _from_bits(out)


def round_to_element(y: Float[Array, "..."], element: F.ElementEncoding, *,
                     rounding: Rounding = "nearest", random_bits=None,
                     saturate: bool = True) -> Float[Array, "..."]:
    """Rounds float32 ``y`` to the nearest value of ``element`` (values, not codes).

    Args:
      y: values already divided by their scale.
      element: the element encoding.
      rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (needs ``random_bits``, uint32 of
        ``y``'s shape).
      saturate: clamp to ±max ("satfinite": ±Inf -> ±max). With ``saturate=False`` an IEEE encoding
        overflows to ±Inf, as a cast does.

    Returns:
      float32 values on the element's grid. NaN stays NaN where the encoding has a NaN, else 0.

    Example:
      >>> round_to_element(jnp.array([2.5, 3.5, 7.0]), F.FloatEncoding(2, 1, "none"))
      Array([2., 4., 6.], dtype=float32)
    """
    y = y.astype(jnp.float32)
    if isinstance(element, F.BinaryEncoding):
        return _round_binary(y, rounding, random_bits)
    return _round_scaled(y, element, 0, rounding, random_bits, saturate)


def _round_binary(y, rounding, random_bits):
    """±1: +1 for y >= 0 (either zero), or stochastically with P(+1) = (1 + clip(y, -1, 1)) / 2."""
    if rounding == "nearest":
        b = _bits(y)
        positive = ((b & _SIGN) == 0) | ((b & _ABS) == 0)
    else:
        uniform = (random_bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
        positive = uniform < (1 + jnp.clip(y, -1, 1)) * np.float32(0.5)
    return jnp.where(positive, np.float32(1), np.float32(-1))


# --------------------------------------------------------------------------- codes


def encode(v: Float[Array, "..."], element: F.ElementEncoding) -> Integer[Array, "..."]:
    """Bit codes (uint32) of values already on ``element``'s grid (see :func:`round_to_element`).

    Float codes are sign|exponent|mantissa; integers are two's complement in ``bits`` bits; binary
    is 1 for +1 and 0 for -1.
    """
    b = _bits(v)
    if isinstance(element, F.BinaryEncoding):
        return (v > 0).astype(jnp.uint32)
    if isinstance(element, F.IntEncoding):
        k = jnp.round(v * 2.0**element.fraction_bits).astype(jnp.int32)
        return k.astype(jnp.uint32) & ((1 << element.bits) - 1)
    e, m = element.exponent_bits, element.mantissa_bits
    sign, abs_bits = b & _SIGN, b & _ABS
    exponent, significand = _exponent_and_mantissa(abs_bits)
    normal = exponent >= element.emin
    field = jnp.where(normal, exponent + element.bias, 0).astype(jnp.uint32)
    down = jnp.clip(23 - m + jnp.where(normal, 0, element.emin - exponent), 0, 31).astype(jnp.uint32)
    mantissa = (significand >> down) & ((1 << m) - 1)
    code = (field << m) | mantissa
    code = jnp.where(abs_bits == 0, jnp.uint32(0), code)
    top = (1 << e) - 1
    if element.specials == "ieee":
        code = jnp.where(abs_bits == 0x7F800000, jnp.uint32(top << m), code)
        code = jnp.where(abs_bits > 0x7F800000, jnp.uint32((top << m) | (1 << (m - 1) if m else 1)), code)
    elif element.specials == "fn":
        code = jnp.where(abs_bits > 0x7F800000, jnp.uint32((top << m) | ((1 << m) - 1)), code)
    if element.signed:
        code = code | ((sign >> 31) << (e + m))
    return code


def decode(code: Integer[Array, "..."], element: F.ElementEncoding) -> Float[Array, "..."]:
    """Values (float32) of bit codes of ``element``; the inverse of :func:`encode`.

    Example:
      >>> decode(jnp.arange(8, dtype=jnp.uint32), F.FloatEncoding(2, 1, "none"))
      Array([0. , 0.5, 1. , 1.5, 2. , 3. , 4. , 6. ], dtype=float32)
    """
    code = code.astype(jnp.uint32)
    if isinstance(element, F.BinaryEncoding):
        return jnp.where((code & 1) == 1, 1.0, -1.0).astype(jnp.float32)
    if isinstance(element, F.IntEncoding):
        shift = 32 - element.bits
        k = lax.bitcast_convert_type(code << shift, jnp.int32) >> shift  # sign-extend
        return k.astype(jnp.float32) * np.float32(2.0**-element.fraction_bits)
    e, m = element.exponent_bits, element.mantissa_bits
    field = ((code >> m) & ((1 << e) - 1)).astype(jnp.int32)
    mantissa = code & ((1 << m) - 1)
    significand = jnp.where(field > 0, mantissa | (1 << m), mantissa)
    value = _compose(significand, jnp.maximum(field, 1) - element.bias - m)
    top = (1 << e) - 1
    if element.specials == "ieee":
        value = jnp.where(field == top, jnp.where(mantissa == 0, np.float32(np.inf), np.float32(np.nan)), value)
    elif element.specials == "fn":
        value = jnp.where((field == top) & (mantissa == (1 << m) - 1), np.float32(np.nan), value)
    if element.signed:
        negative = ((code >> (e + m)) & 1) == 1
        value = jnp.where(negative, -value, value)
    return value


# --------------------------------------------------------------------------- scales


def _e8m0_exponent(stat, element, scale_mode):
    """Integer exponent of the OCP MX shared scale for block statistics ``stat`` (float32, >= 0)."""
    abs_bits = _bits(stat) & _ABS
    log2_floor = _floor_log2(abs_bits)
    if scale_mode == "floor":
        exponent = log2_floor - element.emax
    else:  # ceil(log2(amax / max_elem)), exact: compare the normalised significands.
        max_mantissa, max_exponent = math.frexp(element.max)  # max = m * 2**e with m in [0.5, 1)
        max_significand = int(max_mantissa * 2**24)  # exact: element max has few mantissa bits
        _, significand = _exponent_and_mantissa(abs_bits)
        lead = 31 - lax.clz(significand).astype(jnp.int32)
        normalised = significand << jnp.clip(23 - lead, 0, 31).astype(jnp.uint32)
        exponent = log2_floor - (max_exponent - 1) + (normalised > max_significand).astype(jnp.int32)
    return jnp.clip(exponent, -127, 127)


def _scale_from_stat(stat, fmt: F.Format, scale_mode, tensor_scale):
    """Scales for group statistics ``stat`` (float32).

    Returns ``(divisor, stored, reciprocal)``: for E8M0 scales ``divisor`` is the integer exponent
    (int32; the caller scales by it exactly on bit patterns) and ``reciprocal`` is None, otherwise
    ``divisor`` is the float32 value every element is divided by (block scale times tensor scale)
    and ``reciprocal`` its correctly rounded reciprocal (0 for a zero divisor); ``stored`` is the
    scale in its storage dtype. NaN marks groups holding a NaN or Inf (exponent 128 for E8M0).
    """
    scaling, element = fmt.scaling, fmt.element
    finite = jnp.isfinite(stat)
    nan = np.float32(np.nan)
    encoding = scaling.scale
    if encoding.power_of_two:
        stat_bits = _bits(stat)  # compared as bits: a float compare may flush subnormals
        finite = stat_bits < 0x7F800000
        exponent = _e8m0_exponent(stat, element, scale_mode)
        exponent = jnp.where(stat_bits > 0, exponent, -127)
        code = jnp.where(finite, exponent + 127, 255).astype(jnp.uint8)
        return (jnp.where(finite, exponent, 128),
                lax.bitcast_convert_type(code, jnp.float8_e8m0fnu), None)
    tensor_reciprocal, reciprocal_table = _scale_reciprocals(fmt, tensor_scale)
    # Divisions by constants are written as products with the float32 reciprocal: XLA rewrites
    # them so under jit, and one spelling keeps eager, jit and every backend bit-identical.
    target = stat if scaling.statistic == "absmean" else stat * _constant_reciprocal(element.max)
    if tensor_scale is not None:
        # The barrier keeps XLA from reassociating (stat * c) * r into (stat * r) * c, which it
        # does on the GPU (it moves constants outward) and which rounds differently.
        target = lax.optimization_barrier(target) * tensor_reciprocal
    if encoding.name in ("fp32", "bf16"):
        value = target if encoding.name == "fp32" else \
            round_to_element(target, F.get("bf16").element, saturate=False)
        value = jnp.where(finite, jnp.where(value > 0, value, np.float32(1)), nan)
        stored = value.astype(jnp.float32 if encoding.name == "fp32" else jnp.bfloat16)
        return value, stored, _divisor_reciprocal(value, stored, None)
    grid = encoding.float_encoding
    value = round_to_element(jnp.where(finite, target, nan), grid)
    code = encode(value, grid).astype(jnp.uint8)
    stored = lax.bitcast_convert_type(code, jnp.float8_e4m3fn) if encoding.name == "e4m3" else code
    if tensor_scale is not None:
        value = value * tensor_scale
    return value, stored, _divisor_reciprocal(value, stored, reciprocal_table)


@functools.lru_cache(maxsize=None)
def _scale_code_values(grid: F.FloatEncoding, bits: int) -> np.ndarray:
    """float32 values of every ``bits``-bit code of the scale grid (a constant table)."""
    with jax.ensure_compile_time_eval():
        return np.asarray(decode(jnp.arange(2**bits, dtype=jnp.uint32), grid))


def _scale_reciprocals(fmt: F.Format, tensor_scale):
    """``(1 / tensor_scale, table)`` for the float (not E8M0) scales of :func:`_scale_from_stat`,
    from one long division: the tensor scale's reciprocal (None without a tensor scale) and, for
    scales on an 8-bit grid (E4M3, UE5M3), the table ``1 / (value(code) * tensor_scale)`` (0 for
    the zero code; None for other scales). A block looks its divisor's reciprocal up by its scale
    code: the same bits as the reciprocal of its own divisor (the same float32 product), but 256
    divisions per tensor instead of one per block, and one copy of the division in the compiled
    program instead of two (NVFP4's quantizer was 3-4x the HLO of MXFP4's)."""
    encoding = fmt.scaling.scale
    grid = encoding.float_encoding
    if encoding.power_of_two or (grid is None and tensor_scale is None):
        return None, None
    parts = [] if tensor_scale is None else [tensor_scale.reshape((1,))]
    if grid is not None:
        values = jnp.asarray(_scale_code_values(grid, encoding.bits))
        parts.append(values if tensor_scale is None else values * tensor_scale.reshape(()))
    reciprocals = _reciprocal(jnp.concatenate(parts))
    table = None
    if grid is not None:
        table = jnp.where(parts[-1] == 0, np.float32(0), reciprocals[-parts[-1].size:])
    if tensor_scale is None:
        return None, table
    return reciprocals[0].reshape(tensor_scale.shape), table


def _divisor_reciprocal(divisor, stored, table):
    """``1 / divisor`` correctly rounded, 0 where the divisor is 0: looked up by the scale code in
    ``table`` (:func:`_scale_reciprocals`) where there is one."""
    if table is None:
        return jnp.where(divisor == 0, np.float32(0), _reciprocal(divisor))
    code = stored if stored.dtype == jnp.uint8 else lax.bitcast_convert_type(stored, jnp.uint8)
    return table[code.astype(jnp.int32)]


def _constant_reciprocal(value: float) -> np.float32:
    return np.float32(1) / np.float32(value)


def _decode_scale(stored, encoding: F.ScaleEncoding):
    """The inverse of :func:`_scale_from_stat`'s ``stored``: an exponent for E8M0 (128 = NaN),
    otherwise the float32 block scale."""
    if encoding.name in ("fp32", "bf16"):
        return stored.astype(jnp.float32)
    code = lax.bitcast_convert_type(stored, jnp.uint8) if stored.dtype != jnp.uint8 else stored
    if encoding.power_of_two:
        return code.astype(jnp.int32) - 127
    return decode(code, encoding.float_encoding)


def _apply_scale(elements, divisor, power_of_two):
    """Element values times their group's scale (an exponent for E8M0, else a float32)."""
    if power_of_two:
        out = _times_power_of_two(elements, jnp.minimum(divisor, 127))
        return jnp.where(divisor > 127, np.float32(np.nan), out)
    return elements * divisor


def _absmax(x, axes):
    """max |x| over ``axes`` (keepdims), taken over bit patterns: exact, NaN-propagating (NaN
    patterns are the largest) and blind to flush-to-zero."""
    if x.size == 0:
        return jnp.zeros([1 if d in axes else n for d, n in enumerate(x.shape)], jnp.float32)
    return _from_bits(jnp.max(_bits(x) & _ABS, axis=axes, keepdims=True))


_SMALLEST_NORMAL = np.float32(2.0**-126)


def _tensor_scale(x, fmt: F.Format):
    """The NVFP4-style FP32 second-level scale of ``x``, shape (1,)*ndim."""
    return _tensor_scale_of_amax(_absmax(x, tuple(range(x.ndim))), fmt)


def _tensor_scale_of_amax(amax, fmt: F.Format):
    """The NVFP4-style FP32 second-level scale amax / (element.max * scale.max) of a tensor whose
    max |x| is ``amax`` (float32), at least 2**-126: 1 where amax is 0, NaN where it is NaN or Inf.

    The floor keeps the scale and its reciprocal normal float32 numbers: a subnormal tensor scale
    (amax below ~3.2e-35 for NVFP4) is flushed to 0 by XLA's float arithmetic on the CPU, which
    turned such tensors into zeros."""
    scale = amax * _constant_reciprocal(fmt.element.max * fmt.scaling.scale.float_encoding.max)
    scale = jnp.where(amax > 0, jnp.maximum(scale, _SMALLEST_NORMAL), np.float32(1))
    return jnp.where(jnp.isfinite(amax), scale, np.float32(np.nan))


# --------------------------------------------------------------------------- grouping


def _normalize_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, (int, np.integer)) or not -max(ndim, 1) <= axis < max(ndim, 1):
        raise ValueError(f"axis {axis} is out of range for an array of rank {ndim} "
                         f"(valid: {-ndim} .. {ndim - 1}).")
    return int(axis) % ndim


def _group_view(x, block_shape):
    """Pads ``x`` (float32) to whole blocks and reshapes to (n0, b0, n1, b1, ...)."""
    padded = [-(-n // b) * b for n, b in zip(x.shape, block_shape)]
    if tuple(padded) != x.shape:
        x = jnp.pad(x, [(0, p - n) for p, n in zip(padded, x.shape)])
    grouped = []
    for p, b in zip(padded, block_shape):
        grouped += [p // b, b]
    return x.reshape(grouped), tuple(padded)


def _block_axes(ndim):
    return tuple(range(1, 2 * ndim, 2))


def _group_counts(shape, block_shape):
    """Number of real (unpadded) elements in each group, shaped like the group statistics."""
    counts = np.ones((), np.float32)
    for n, b in zip(shape, block_shape):
        per_block = np.minimum(b, n - np.arange(-(-n // b)) * b).astype(np.float32)
        counts = counts[..., None] * per_block
    grouped = []
    for c in counts.shape:
        grouped += [c, 1]
    return counts.reshape(grouped)


def _check_arguments(x, fmt, rounding, key, scale_mode):
    if rounding not in _ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(_ROUNDINGS)}.")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(seed).")
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; valid: {', '.join(_SCALE_MODES)}.")
    if scale_mode != "floor" and (fmt.scaling is None or not fmt.scaling.scale.power_of_two):
        raise ValueError(f"scale_mode={scale_mode!r} applies to E8M0 (power-of-two) scales only; "
                         f"format {fmt.name!r} has none.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize needs a floating-point input (float32, bfloat16, float16), "
                        f"got dtype {x.dtype}.")


def hash32(x: Integer[Array, "..."]) -> Integer[Array, "..."]:
    """The "lowbias32" integer finaliser (C. Wellons): two multiplies and three xor-shifts that
    map each uint32 to another (a bijection) with low bias; elementwise, in plain JAX ops, so the
    same code runs under XLA and inside Pallas kernels."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def stream_words(key: Key[Array, ""]) -> Integer[Array, "2"]:
    """The two uint32 words :func:`stochastic_bits` mixes into its counters, from every word of
    ``key``'s data (any PRNG implementation, typed or legacy uint32 keys)."""
    data = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
    k0 = hash32(data[0] ^ np.uint32(0x3C6EF372))
    for i in range(1, data.shape[0]):
        k0 = hash32(k0 ^ data[i])
    return jnp.stack([k0, hash32(k0 ^ np.uint32(0x9E3779B9))])


def counter_bits(index: Integer[Array, "..."], words: Integer[Array, "2"]) -> Integer[Array, "..."]:
    """:func:`stochastic_bits` of the elements with row-major ``index`` (uint32), from
    :func:`stream_words`: ``hash32(hash32(index ^ k0) ^ k1)``."""
    return hash32(hash32(index ^ words[0]) ^ words[1])


def check_counter_range(shape) -> None:
    """:func:`stochastic_bits` counts elements in uint32: ValueError for 2**32 elements or more."""
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"stochastic rounding counts elements in uint32: shape {tuple(shape)} has "
                         f"{size} elements (at most 2**32 - 1); quantize it in parts.")


def stochastic_bits(key: Key[Array, ""], shape) -> Integer[Array, "..."]:
    """The uniform 32-bit words every stochastic rounding in qjax draws: a counter-based hash of
    each element's row-major index and ``key``.

    Unlike ``jax.random.bits`` (threefry: about 2.4x the time of an elementwise pass over a bf16
    array on an H200, written to memory and read back), the hash is a dozen integer operations
    that XLA fuses into the rounding that consumes it and that the Pallas kernels compute in
    registers, with the same bits. An element's bits depend on its flat index only, not on how
    the array is grouped into blocks.

    Args:
      key: a JAX PRNG key; split or fold it for independent draws.
      shape: the shape of the result (fewer than 2**32 elements).

    Returns:
      uint32 array of ``shape``.

    Example:
      >>> b = stochastic_bits(jax.random.key(0), (2, 3))
      >>> b.dtype, bool(jnp.all(b.reshape(-1) == stochastic_bits(jax.random.key(0), (6,))))
      (dtype('uint32'), True)
    """
    shape = tuple(shape)
    check_counter_range(shape)
    index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return counter_bits(index, stream_words(key))


def _quantize_core(x, fmt: F.Format, axis, rounding, key, scale_mode, prescale: float = 1.0):
    """Returns (element values, dequantized values, stored scales, tensor scale, block shape,
    padded shape); element and dequantized values (float32) on the padded grouped view.

    ``prescale`` (E8M0 scales only): the scales come from ``x`` and the elements are those of
    ``x * prescale`` at those scales (Tseng et al.'s quantizer, which keeps SR from clipping)."""
    x32 = x.astype(jnp.float32)
    scaling = fmt.scaling
    block_shape = scaling.granularity.block_shape(x.shape, axis)
    tensor_scale = _tensor_scale(x32, fmt) if scaling.tensor_scale else None
    grouped, padded = _group_view(x32, block_shape)
    reduce_axes = _block_axes(x.ndim)
    if scaling.statistic == "absmax":
        stat = _absmax(grouped, reduce_axes)
    else:
        total = jnp.sum(jnp.abs(grouped), axis=reduce_axes, keepdims=True)
        stat = total * (1 / _group_counts(x.shape, block_shape))
    grouped_tensor_scale = None if tensor_scale is None else tensor_scale.reshape((1, 1) * x.ndim)
    divisor, stored, reciprocal = _scale_from_stat(stat, fmt, scale_mode, grouped_tensor_scale)
    random_bits = None if rounding == "nearest" else stochastic_bits(key, grouped.shape)
    nan = np.float32(np.nan)
    if scaling.scale.power_of_two:
        exponent = jnp.minimum(divisor, 127)
        if prescale != 1:
            grouped = grouped * np.float32(prescale)
        if isinstance(fmt.element, F.BinaryEncoding):
            elements = _round_binary(_times_power_of_two(grouped, -exponent), rounding, random_bits)
            dequantized = _times_power_of_two(elements, exponent)
        else:  # rounded in place (the dequantized value directly), and in the element domain
            # (the dequantized value can overflow float32 where the element does not); jit keeps
            # only the one its caller uses.
            dequantized = _round_scaled(grouped, fmt.element, exponent, rounding, random_bits)
            elements = _round_scaled(_times_power_of_two(grouped, -exponent), fmt.element, 0,
                                     rounding, random_bits)
        elements = jnp.where(divisor > 127, nan, elements)
        dequantized = jnp.where(divisor > 127, nan, dequantized)
    else:
        if prescale != 1:
            raise ValueError(f"prescale applies to E8M0-scaled formats; {fmt.name!r} is not one.")
        # Multiply by the reciprocal computed once per group (XLA rewrites a division by a
        # broadcast into that anyway), correctly rounded on every backend.
        elements = round_to_element(grouped * reciprocal, fmt.element, rounding=rounding,
                                    random_bits=random_bits)
        dequantized = elements * divisor
    scale_shape = tuple(p // b for p, b in zip(padded, block_shape))
    return (elements, dequantized, stored.reshape(scale_shape), tensor_scale, block_shape,
            padded)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5))
def _split_outer_scale(x, fmt: F.Format, axis, rounding, key, scale_mode):
    """``fake_quant`` split for a GEMM, for formats whose ``bf16_gemm`` is ``"outer_scale"``:
    ``(elements * block scales, outer scale)``, both float32; the outer scale (x's rank, size 1
    along ``axis``) is the tensor scale of a two-level format, else the per-tensor or per-channel
    scale. Their product is ``fake_quant(x)`` up to one float32 rounding."""
    elements, _, stored, tensor_scale, _, padded = _quantize_core(x, fmt, axis, rounding, key,
                                                                  scale_mode)
    scale = _decode_scale(stored, fmt.scaling.scale)
    if tensor_scale is None:
        return _crop(elements, padded, x.shape), scale
    grouped_scale = scale.reshape([d for n in scale.shape for d in (n, 1)])
    return _crop(elements * grouped_scale, padded, x.shape), tensor_scale


def _crop(grouped, padded_shape, shape):
    x = grouped.reshape(padded_shape)
    if padded_shape != tuple(shape):
        x = x[tuple(slice(0, n) for n in shape)]
    return x


def _cast_format(x, fmt, rounding, key):
    """Unscaled float formats (bf16, fp16, or any ExMy without scaling), rounded on bits: a
    ``convert`` round trip would do for nearest rounding, but XLA on GPU may remove it."""
    random_bits = None if rounding == "nearest" else stochastic_bits(key, x.shape)
    return round_to_element(x.astype(jnp.float32), fmt.element, rounding=rounding,
                            random_bits=random_bits, saturate=fmt.native_dtype is None)


# --------------------------------------------------------------------------- public API


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("values", "scales", "tensor_scale"),
                   meta_fields=("fmt", "axis", "block_shape", "dtype"))
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array: element codes plus the scales that decode them.

    Attributes:
      values: the elements, shaped like the original array: ``float8_e4m3fn`` / ``float8_e5m2``
        for fp8 elements, ``uint8`` bit codes for other float elements (fp6, fp4, any ExMy),
        ``int8`` for integer, ternary and binary elements, ``bfloat16`` / ``float16`` for casts.
      scales: one scale per group, shaped like the original array with each axis divided by its
        block side (rounded up; so ``scales.ndim == values.ndim``): ``float8_e8m0fnu`` (MX),
        ``float8_e4m3fn`` (NVFP4), ``uint8`` codes (UE5M3), ``float32`` or ``bfloat16``; None for casts.
      tensor_scale: float32 of shape ``(1,) * ndim`` for two-level formats (NVFP4), else None.
      fmt: the :class:`~qjax.formats.Format` (static).
      axis: the quantized axis, as a negative index so leading batch axes (vmap) keep it valid.
      block_shape: the group shape the scales were computed over, for the trailing axes.
      dtype: the dtype of the array that was quantized (the default of :meth:`dequantize`).

    Example:
      >>> q = quantize(jnp.ones((4, 64)), "mxfp4")
      >>> q.values.shape, q.scales.shape
      ((4, 64), (4, 2))
    """

    values: Array
    scales: Array | None
    tensor_scale: Array | None
    fmt: F.Format
    axis: int
    block_shape: tuple[int, ...] | None
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    def dequantize(self, dtype=None) -> Array:
        """See :func:`dequantize`."""
        return dequantize(self, dtype)

    def codes(self) -> Integer[Array, "..."]:
        """The element bit codes as uint32 (for packing), shaped like ``values``."""
        if self.fmt.scaling is None:
            return _bits(self.values) if self.values.dtype == jnp.float32 else \
                lax.bitcast_convert_type(self.values, jnp.uint16).astype(jnp.uint32)
        if self.values.dtype == jnp.int8:
            return encode(self.values.astype(jnp.float32) * 2.0**-_fraction_bits(self.fmt.element),
                          self.fmt.element)
        if self.values.dtype != jnp.uint8:
            return lax.bitcast_convert_type(self.values, jnp.uint8).astype(jnp.uint32)
        return self.values.astype(jnp.uint32)

    @property
    def nbytes_packed(self) -> int:
        """Bytes of the packed storage (:meth:`pack`): element bits, scales and tensor scale."""
        return PackedQArray.storage_bytes(self)

    def pack(self) -> "PackedQArray":
        """Packs the elements into real low-bit storage; :meth:`PackedQArray.unpack` inverts it."""
        return pack(self)


def _fraction_bits(element):
    return element.fraction_bits if isinstance(element, F.IntEncoding) else 0


def _element_storage(elements, element: F.ElementEncoding):
    """Stored element values from on-grid float32 values."""
    if isinstance(element, (F.IntEncoding, F.BinaryEncoding)):
        return jnp.round(elements * 2.0**_fraction_bits(element)).astype(jnp.int8)
    return code_storage(encode(elements, element), element)


def code_storage(code: Integer[Array, "..."], element: F.FloatEncoding) -> Array:
    """A float element's bit codes in ``QArray.values``' dtype: ``float8_e4m3fn`` /
    ``float8_e5m2`` for fp8, ``uint16`` above 8 bits, ``uint8`` otherwise."""
    if element.bits > 8:
        return code.astype(jnp.uint16)
    code = code.astype(jnp.uint8)
    if element == F.E4M3_ELEM:
        return lax.bitcast_convert_type(code, jnp.float8_e4m3fn)
    if element == F.E5M2_ELEM:
        return lax.bitcast_convert_type(code, jnp.float8_e5m2)
    return code


def _element_values(stored, element: F.ElementEncoding):
    if isinstance(element, (F.IntEncoding, F.BinaryEncoding)):
        return stored.astype(jnp.float32) * np.float32(2.0**-_fraction_bits(element))
    if stored.dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2):
        stored = lax.bitcast_convert_type(stored, jnp.uint8)
    return decode(stored, element)


def _prepare(x, fmt, axis, rounding, key, scale_mode):
    x = jnp.asarray(x)
    fmt = F.get(fmt)
    _check_arguments(x, fmt, rounding, key, scale_mode)
    if x.ndim == 0:
        raise ValueError("quantize needs an array of rank >= 1; got a scalar.")
    return x, fmt, _normalize_axis(axis, x.ndim)


def quantize(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
             rounding: Rounding = "nearest", key: Key[Array, ""] | None = None,
             scale_mode: ScaleMode = "floor") -> QArray:
    """Quantizes ``x`` to ``fmt``.

    Args:
      x: a float32, bfloat16 or float16 array.
      fmt: a format name (``qjax.formats.names()``) or a :class:`~qjax.formats.Format`.
      axis: the axis the blocks run along (the contraction axis of a matmul operand); for 2-D
        tile formats, one of the last two axes.
      rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased; needs ``key``).
      key: a JAX PRNG key, required for stochastic rounding.
      scale_mode: ``"floor"`` (OCP MX) or ``"rceil"`` (NVIDIA); only for E8M0 scales.

    Returns:
      A :class:`QArray`.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (8, 64))
      >>> q = quantize(x, "mxfp4")
      >>> q.values.dtype, q.scales.dtype
      (dtype('uint8'), dtype(float8_e8m0fnu))
    """
    x, fmt, axis = _prepare(x, fmt, axis, rounding, key, scale_mode)
    return _quantize_jit(x, fmt, axis, rounding, key, scale_mode, kernels_enabled())


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5, 6))
def _quantize_jit(x, fmt, axis, rounding, key, scale_mode, kernels):
    if not (kernels and _fused_kernel_applies(x, fmt, axis)):
        return _quantize_xla(x, fmt, axis, rounding, key, scale_mode)
    from qjax.pallas import quantize as kernel  # lazy: qjax.pallas builds on this module

    if not kernel.supports(fmt):  # e.g. a user-built E8M0 format with a 12-bit element
        return _quantize_xla(x, fmt, axis, rounding, key, scale_mode)

    return lax.platform_dependent(  # see _fake_quant_jit
        x, key,
        cuda=lambda x, key: kernel.quantize_pallas(x, fmt, rounding=rounding, key=key,
                                                   scale_mode=scale_mode),
        default=lambda x, key: _quantize_xla(x, fmt, axis, rounding, key, scale_mode))


def _quantize_xla(x, fmt, axis, rounding, key, scale_mode):
    if fmt.scaling is None:
        values = _cast_format(x, fmt, rounding, key)
        stored = values.astype(fmt.native_dtype) if fmt.native_dtype is not None else \
            _element_storage(values, fmt.element)
        return QArray(stored, None, None, fmt, axis - x.ndim, None, x.dtype)
    elements, _, scales, tensor_scale, block_shape, padded = _quantize_core(
        x, fmt, axis, rounding, key, scale_mode)
    values = _element_storage(_crop(elements, padded, x.shape), fmt.element)
    return QArray(values, scales, tensor_scale, fmt, axis - x.ndim, block_shape, x.dtype)


def dequantize(q: QArray, dtype=None) -> Array:
    """Decodes a :class:`QArray` back to a dense array.

    Args:
      q: the quantized array.
      dtype: output dtype; defaults to the dtype that was quantized.

    Returns:
      ``values * scales`` (and ``* tensor_scale``), shaped like the original array.

    Example:
      >>> x = jnp.linspace(-1, 1, 64).reshape(2, 32)
      >>> bool(jnp.all(dequantize(quantize(x, "mxfp8")) == fake_quant(x, "mxfp8")))
      True
    """
    return _dequantize_jit(q, jnp.dtype(q.dtype if dtype is None else dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_jit(q: QArray, dtype):
    fmt = q.fmt
    if fmt.scaling is None:
        if fmt.native_dtype is not None:
            return q.values.astype(dtype)
        return _element_values(q.values, fmt.element).astype(dtype)
    elements = _element_values(q.values, fmt.element)
    batch = (1,) * (q.ndim - len(q.block_shape))
    grouped, padded = _group_view(elements, batch + tuple(q.block_shape))
    divisor = _decode_scale(q.scales, fmt.scaling.scale)
    if q.tensor_scale is not None:
        divisor = divisor * q.tensor_scale
    divisor = divisor.reshape([d for s in divisor.shape for d in (s, 1)])
    out = _apply_scale(grouped, divisor, fmt.scaling.scale.power_of_two)
    return _crop(out, padded, q.shape).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 5, 6))
def _fake_quant(x, fmt, axis, rounding, key, scale_mode, kernels):
    return _fake_quant_jit(x, fmt, axis, rounding, key, scale_mode, kernels)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 5, 6, 7, 8))
def _fake_quant_jit(x, fmt, axis, rounding, key, scale_mode, kernels, prescale=1.0,
                    out_dtype=None):
    if not (kernels and _fused_kernel_applies(x, fmt, axis, any_axis=True)):
        return _fake_quant_xla(x, fmt, axis, rounding, key, scale_mode, prescale, out_dtype)
    from qjax.pallas import fake_quant as kernel  # lazy: qjax.pallas builds on this module

    # Chosen when lowering for the platform the data is on: a GPU machine may still run this on
    # its CPU (jax.default_device), where only XLA's version compiles.
    return lax.platform_dependent(
        x, key,
        cuda=lambda x, key: kernel.fake_quant_pallas(x, fmt, rounding=rounding, key=key,
                                                     scale_mode=scale_mode, axis=axis,
                                                     prescale=prescale, out_dtype=out_dtype),
        default=lambda x, key: _fake_quant_xla(x, fmt, axis, rounding, key, scale_mode, prescale,
                                               out_dtype))


def _fake_quant_xla(x, fmt, axis, rounding, key, scale_mode, prescale=1.0, out_dtype=None):
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if fmt.scaling is None:
        return _cast_format(x, fmt, rounding, key).astype(out_dtype)
    _, dequantized, _, _, _, padded = _quantize_core(x, fmt, axis, rounding, key, scale_mode,
                                                     prescale)
    return _crop(dequantized, padded, x.shape).astype(out_dtype)


def prescaled_fake_quant(x: Float[Array, "..."], fmt: F.FormatLike, prescale: float, *,
                         axis: int = -1, rounding: Rounding = "nearest",
                         key: Key[Array, ""] | None = None, scale_mode: ScaleMode = "floor",
                         out_dtype=None) -> Float[Array, "..."]:
    """Tseng et al.'s pre-scaled quantizer for E8M0-scaled formats: block scales from ``x``,
    elements those of ``prescale * x`` at those scales; returns ``elements * scale`` (divide by
    ``prescale`` for the estimate of ``x``). With ``prescale = 3/4`` no MXFP4 element clips, so
    stochastic rounding stays unbiased. The fused kernel runs it where it runs ``fake_quant``.

    Args: as :func:`quantize`, plus ``prescale``, a positive float, and ``out_dtype``, the
      result's dtype (default ``x``'s; bfloat16 holds every MX value exactly), which the kernel
      writes directly.

    Returns:
      An array of ``x``'s shape.

    Example:
      >>> prescaled_fake_quant(jnp.array([1.0, 2.0, 4.0, 6.0] + [0.0] * 28), "mxfp4", 0.75)[:4]
      Array([1. , 1.5, 3. , 4. ], dtype=float32)
    """
    x, fmt, axis = _prepare(x, fmt, axis, rounding, key, scale_mode)
    if fmt.scaling is None or not fmt.scaling.scale.power_of_two:
        raise ValueError(f"prescaled_fake_quant needs a format with E8M0 block scales; "
                         f"{fmt.name!r} has none.")
    if not prescale > 0:
        raise ValueError(f"prescale must be a positive float, got {prescale}.")
    out_dtype = None if out_dtype is None else np.dtype(out_dtype)
    return _fake_quant_jit(x, fmt, axis, rounding, key, scale_mode, kernels_enabled(),
                           float(prescale), out_dtype)


def _fused_kernel_applies(x, fmt, axis, any_axis: bool = False) -> bool:
    """Whether ``fake_quant`` and ``quantize`` run as one-pass Pallas kernels
    (``qjax.pallas.fake_quant`` / ``qjax.pallas.quantize``, bit identical): on a single GPU, for
    E8M0-scaled block formats and two-level ones (NVFP4: the tensor amax is an XLA reduction
    before the kernel) along an axis whose length the block divides: any axis for ``fake_quant``
    (``any_axis``), the last one for ``quantize``. Elsewhere XLA's passes (block amax, then
    rounding and encoding) run. The kernels are bit-identical for the other float-scaled formats
    too (int4's bf16 scales), but int4 awaits a timing and a GPU check of its vmap/scan paths
    (docs/benchmarks.md). A kernel on arrays sharded over several devices needs a
    ``shard_map``."""
    if not single_gpu():
        return False
    from qjax.pallas import fake_quant as kernel  # lazy: qjax.pallas builds on this module

    return (kernel.supports(fmt) and (fmt.scaling.scale.power_of_two or fmt.scaling.tensor_scale)
            and x.ndim >= 1
            and x.size > 0 and x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
            and (any_axis or axis in (-1, x.ndim - 1)) and x.shape[axis] % fmt.block_size == 0)


@_fake_quant.defjvp
def _fake_quant_jvp(fmt, axis, rounding, scale_mode, kernels, primals, tangents):
    x, key = primals
    x_dot, _ = tangents
    return _fake_quant(x, fmt, axis, rounding, key, scale_mode, kernels), x_dot


def fake_quant(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
               rounding: Rounding = "nearest", key: Key[Array, ""] | None = None,
               scale_mode: ScaleMode = "floor") -> Float[Array, "..."]:
    """Quantizes and dequantizes ``x`` in one step: ``dequantize(quantize(x, ...))`` in x's dtype.

    Its derivative is the straight-through estimator, an explicit choice: ``grad`` and ``jvp`` pass
    the (co)tangent through unchanged, as if the quantizer were the identity. Clipped, trust-region
    and other estimators build on the non-differentiable quantizer separately.

    Args: as :func:`quantize`.

    Returns:
      An array of ``x``'s shape and dtype holding the values ``fmt`` can represent.

    Example:
      >>> fake_quant(jnp.array([0.3, 1.0, 2.6, 5.0]), "mxfp4")  # scale 1; 5 ties to even 4
      Array([0.5, 1. , 3. , 4. ], dtype=float32)
    """
    x, fmt, axis = _prepare(x, fmt, axis, rounding, key, scale_mode)
    return _fake_quant(x, fmt, axis, rounding, key, scale_mode, kernels_enabled())


# --------------------------------------------------------------------------- packing


def pack_bits(codes: Integer[Array, "... n"], bits: int) -> Integer[Array, "... m"]:
    """Packs ``bits``-bit codes along the last axis into bytes, little-endian bit order (value i
    occupies stream bits [i*bits, (i+1)*bits): two fp4 per byte low nibble first; four fp6 in
    three bytes). The stream is zero-padded to whole bytes."""
    codes = codes.astype(jnp.uint32)
    planes = (codes[..., None] >> jnp.arange(bits, dtype=jnp.uint32)) & 1
    stream = planes.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    pad = -stream.shape[-1] % 8
    if pad:
        stream = jnp.pad(stream, [(0, 0)] * (stream.ndim - 1) + [(0, pad)])
    stream = stream.reshape(*stream.shape[:-1], -1, 8)
    return jnp.sum(stream << jnp.arange(8, dtype=jnp.uint32), axis=-1).astype(jnp.uint8)


def unpack_bits(packed: Integer[Array, "... m"], bits: int, n: int) -> Integer[Array, "... n"]:
    """Inverse of :func:`pack_bits`: the first ``n`` codes (uint32) of each row."""
    planes = (packed.astype(jnp.uint32)[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1
    stream = planes.reshape(*packed.shape[:-1], -1)[..., : n * bits]
    stream = stream.reshape(*packed.shape[:-1], n, bits)
    return jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32), axis=-1)


def arrays_nbytes(*arrays: Array | None) -> int:
    """Bytes of the given arrays (``None`` counts 0): what packed storage classes report."""
    return sum(a.size * a.dtype.itemsize for a in arrays if a is not None)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("data", "scales", "tensor_scale"),
                   meta_fields=("fmt", "axis", "block_shape", "dtype", "shape"))
@dataclasses.dataclass(frozen=True)
class PackedQArray:
    """A :class:`QArray` whose elements are packed ``bits`` per value along the last axis."""

    data: Array
    scales: Array | None
    tensor_scale: Array | None
    fmt: F.Format
    axis: int
    block_shape: tuple[int, ...] | None
    dtype: np.dtype
    shape: tuple[int, ...]

    @staticmethod
    def storage_bytes(q: QArray) -> int:
        rows = math.prod(q.shape[:-1])
        return rows * -(-q.shape[-1] * q.fmt.element.bits // 8) + arrays_nbytes(
            q.scales, q.tensor_scale)

    @property
    def nbytes(self) -> int:
        return arrays_nbytes(self.data, self.scales, self.tensor_scale)

    def unpack(self) -> QArray:
        """The :class:`QArray` this was packed from, exactly."""
        return unpack(self)


def pack(q: QArray) -> PackedQArray:
    """Packs ``q``'s elements into ``element.bits`` bits each (see :func:`pack_bits`)."""
    bits = q.fmt.element.bits
    data = pack_bits(q.codes(), bits)
    return PackedQArray(data, q.scales, q.tensor_scale, q.fmt, q.axis, q.block_shape, q.dtype, q.shape)


def unpack(p: PackedQArray) -> QArray:
    """Inverse of :func:`pack`."""
    element = p.fmt.element
    codes = unpack_bits(p.data, element.bits, p.shape[-1])
    if p.fmt.scaling is None:
        native = p.fmt.native_dtype
        if native is None:
            values = _element_storage(decode(codes, element), element)
        else:
            values = lax.bitcast_convert_type(codes.astype(jnp.uint16), native)
    else:
        values = _element_storage(decode(codes, element), element)
    return QArray(values, p.scales, p.tensor_scale, p.fmt, p.axis, p.block_shape, p.dtype)

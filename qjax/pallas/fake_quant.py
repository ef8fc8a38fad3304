"""Fused fake quantization for block-scaled formats: one Pallas (Triton) kernel, one pass.

Under XLA, :func:`qjax.fake_quant` of a block format compiles to two passes over the tensor: a
block-amax reduction, then an elementwise rounding pass that reads the tensor again. Here each
program loads one ``(block_rows, block_cols)`` tile, reduces the amax of its ``block_cols // B``
blocks in registers, computes the scales, rounds and writes: the tensor is read once and written
once.

The tile arrives already split into blocks: the wrapper views ``x`` as ``(rows, K // B, B)`` (a free
reshape) and the BlockSpec loads a ``(block_rows, block_cols // B, B)`` tile, so the kernel needs no
in-kernel reshape; the block amax is a reduction over the last axis. A non-last quantized axis
(the wgrad operands' layout) is viewed as ``(outer, K // B, B, inner)`` instead, a program takes
``(blocks, B, inner columns)`` and reduces over the middle axis (default: one block down 256
columns, 1.5x of ``x * 2`` on an H200 where XLA's two passes take 3x).

Results are bit-identical to ``qjax.fake_quant(x, fmt, ...)`` (same rules, ``docs/numerics.md``):
everything is integer arithmetic on float32 bit patterns, as in ``qjax/quantize.py``, with two
changes that matter for Triton:

* no ``lax.clz``: the leading-one position of an integer below 2**24 is read off the exponent field
  of its (exact) float32 conversion, see :func:`_lead`;
* every shift amount is clamped below 32 (Triton's shifts are LLVM's, undefined from 32 on; XLA's
  are defined, so the interpreter would not notice).

For nearest rounding with E8M0 scales the per-element work is cut down (:func:`_round_nearest`):
for a normal float32 input ``floor(log2 |x|)`` is the biased exponent field, so the rounding shift
is ``max(E, L) - max(E, 1) + 23 - m`` with ``L`` a per-block constant, and rounding to nearest
even is one add and one mask. A float32 *subnormal* input needs its true ``floor(log2)`` only in
blocks whose scale is at most ``2**(-127 - emin)`` (``L < 0``); tiles holding such a block take an
exact branch (``lax.cond`` on the tile, uniform across the program, so it costs nothing
elsewhere). For elements with ``emin >= 0`` (e2m1, e2m3, integers) that branch cannot occur.

Stochastic rounding consumes the same random bits as ``qjax.fake_quant``
(``qjax.stochastic_bits``, a counter-based hash of the element's flat index and the key), computed
in registers from the indices of the tile and two words derived from the key: no random array is
generated or read.

Formats: every format whose scaling is ``Block(size)`` with the ``absmax`` statistic along the last
axis: E8M0 scales (mxfp8, mxfp8_e5m2, mxfp6_*, mxfp4, mxint8, ``formats.float_format``), float
scales (int4 with bf16 scales, fp32/e4m3/ue5m3 scales), and two-level NVFP4: the tensor amax is a
separate XLA reduction (it must be known before any block scale), the fused kernel takes the
tensor scale and its reciprocal as a tiny input.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from qjax import formats as F
from qjax.quantize import _reciprocal as _xla_reciprocal
from qjax.quantize import _tensor_scale_of_amax
from qjax.quantize import check_counter_range, counter_bits, stream_words

__all__ = ["fake_quant_pallas", "supports"]

_ABS = np.uint32(0x7FFFFFFF)
_SIGN = np.uint32(0x80000000)
_INF = np.uint32(0x7F800000)
_NAN = np.uint32(0x7FC00000)
_MANT = np.uint32(0x7FFFFF)
_IMPLICIT = np.uint32(0x800000)

DEFAULT_BLOCK_ROWS = 8
DEFAULT_BLOCK_COLS = 512
DEFAULT_NUM_WARPS = 4
# A non-last axis: 256 consecutive columns, one block down them (mxfp4 and mxfp8 on an 8192^2 bf16
# array, H200: 1.5x of `x * 2`; 8 x 512, the last axis' tile, is 3.2x there).
DEFAULT_COLUMN_BLOCK_ROWS = 256


# --------------------------------------------------------------------------- bit helpers (kernel-safe)


def _bits(x):
    return lax.bitcast_convert_type(x, jnp.uint32)


def _from_bits(b):
    return lax.bitcast_convert_type(b, jnp.float32)


def _u32(v):
    return jnp.asarray(v).astype(jnp.uint32)


def _i32(v):
    return jnp.asarray(v).astype(jnp.int32)


def _clip(v, lo, hi):
    return jnp.minimum(jnp.maximum(v, lo), hi)  # lax.clamp has no Triton lowering


def _lead(k):
    """Position of the leading one bit of uint32 ``k < 2**31`` (``31 - clz(k)``; -1 for k == 0),
    from the exponent field of its float32 conversion: exact below 2**24; above, the conversion may
    round up to the next power of two, which the comparison undoes."""
    lead = _i32(_bits(k.astype(jnp.float32)) >> 23) - 127
    lead = lead - _i32((np.uint32(1) << _u32(_clip(lead, 0, 31))) > k)
    return jnp.where(k == 0, -1, lead)


def _floor_log2(abs_bits):
    """floor(log2) of float32 magnitudes given as bit patterns, subnormals included; as
    ``qjax.quantize._floor_log2`` (which uses clz): NaN/Inf patterns give 128, zero gives -150."""
    biased = _i32(abs_bits >> 23)
    return jnp.where(biased > 0, biased - 127, _lead(abs_bits & _MANT) - 149)


def _power_of_two_bits(exponent):
    """float32 bit patterns of 2**exponent (subnormal below 2**-126, 0 below 2**-149)."""
    exponent = _i32(exponent)
    normal = _u32(_clip(exponent + 127, 1, 254)) << 23
    subnormal = jnp.where(exponent < -149, np.uint32(0),
                          np.uint32(1) << _u32(_clip(exponent + 149, 0, 31)))
    return jnp.where(exponent >= -126, normal, subnormal)


def _compose_const(k: int, exponent):
    """Bits of ``k * 2**exponent`` for a Python integer ``0 < k < 2**25`` and an int32 array
    ``exponent``: ``qjax.quantize._compose`` with the leading-bit position known statically."""
    lead = k.bit_length() - 1
    exponent = _i32(exponent)
    biased = exponent + (lead + 127)
    mantissa = np.uint32(((k << (23 - lead)) if lead <= 23 else (k >> (lead - 23))) & 0x7FFFFF)
    normal = (_u32(_clip(biased, 0, 255)) << 23) | mantissa
    kk = np.uint32(k)
    left = exponent + 149
    right = _u32(_clip(-left, 1, 31))
    kept, dropped = kk >> right, kk & ((np.uint32(1) << right) - 1)
    half = np.uint32(1) << (right - 1)
    up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
    subnormal = jnp.where(left >= 0, kk << _u32(_clip(left, 0, 31)),
                          jnp.where(left < -25, np.uint32(0), kept + _u32(up)))
    return jnp.where(biased >= 1, normal, subnormal)


def _limit_bits(element, scale_exponent):
    """Bits of ``element.max * 2**scale_exponent`` (``_times_power_of_two`` of the constant)."""
    m = np.float32(element.max).view(np.uint32)
    biased = int(m >> 23)
    significand = int(m & 0x7FFFFF) | (0x800000 if biased else 0)
    return _compose_const(significand, max(biased, 1) - 127 - 23 + scale_exponent)


def _reciprocal(d):
    """``qjax.quantize._reciprocal`` (correctly rounded float32 1/d by integer long division)
    without clz. Used once per block."""
    abs_bits = _bits(d) & _ABS
    biased = _i32(abs_bits >> 23)
    significand = jnp.where(biased > 0, (abs_bits & _MANT) | _IMPLICIT, abs_bits & _MANT)
    exponent = jnp.maximum(biased, 1) - 127
    lead = _lead(significand)
    significand = significand << _u32(_clip(23 - lead, 0, 31))
    exponent = exponent + lead - 23

    def step(_, carry):  # one quotient bit; a loop (not unrolled): compiles fast everywhere
        quotient, remainder = carry
        bit = remainder >= significand
        remainder = jnp.where(bit, remainder - significand, remainder)
        return (quotient << 1) | _u32(bit), remainder << 1

    quotient, remainder = lax.fori_loop(
        0, 25, step, (jnp.zeros_like(significand), jnp.full_like(significand, 1 << 23)))
    rounded = quotient + _u32(remainder > significand)
    out_exponent = -24 - exponent
    q_lead = _lead(rounded)
    out = _compose_var(rounded, out_exponent, q_lead)
    sticky = (quotient << 1) | _u32(remainder != 0)  # subnormal results: round once
    out = jnp.where(out < np.uint32(0x800000),
                    _compose_var(sticky, out_exponent - 1, _lead(sticky)), out)
    out = jnp.where(out_exponent + q_lead > 127, _INF, out)
    out = jnp.where(abs_bits == _INF, np.uint32(0), out)
    return _from_bits(jnp.where(abs_bits > _INF, _NAN, out))


def _reciprocal_fast(d, *, subnormal_possible=True):
    """``_reciprocal(d)`` bit for bit, per block, on the GPU: PTX ``rcp.rn.f32`` is the correctly
    rounded IEEE reciprocal (subnormals kept), which is what ``_reciprocal`` computes wherever the
    result is a normal number, zero, Inf or NaN (the NaN's payload differs but never reaches the
    output: every later use is a float multiply, which returns the canonical NaN). For ``d > 2**126``
    the result is subnormal; where the caller cannot rule that out (``subnormal_possible``), tiles
    holding such a block take the long division, whatever the GPU does with subnormal results."""
    (fast,) = pltriton.elementwise_inline_asm(
        "rcp.rn.f32 $0, $1;", args=[d], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(d.shape, jnp.float32)])
    if not subnormal_possible:
        return fast
    abs_bits = _bits(d) & _ABS
    subnormal_result = jnp.max(_u32((abs_bits > np.uint32(0x7E800000)) & (abs_bits < _INF)))
    return lax.cond(subnormal_result > 0, _reciprocal, lambda d: fast, d)


def _compose_var(k, exponent, lead):
    """``qjax.quantize._compose`` for uint32 ``k`` whose leading-bit position ``lead`` is given."""
    biased = exponent + lead + 127
    mantissa = jnp.where(lead <= 23, k << _u32(_clip(23 - lead, 0, 31)),
                         k >> _u32(_clip(lead - 23, 0, 31))) & _MANT
    normal = (_u32(_clip(biased, 0, 255)) << 23) | mantissa
    left = exponent + 149
    right = _u32(_clip(-left, 1, 31))
    kept, dropped = k >> right, k & ((np.uint32(1) << right) - 1)
    half = np.uint32(1) << (right - 1)
    up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
    subnormal = jnp.where(left >= 0, k << _u32(_clip(left, 0, 31)),
                          jnp.where(left < -25, np.uint32(0), kept + _u32(up)))
    out = jnp.where(biased >= 1, normal, subnormal)
    return jnp.where(k == 0, np.uint32(0), out)


# --------------------------------------------------------------------------- element rounding


def _round_generic(b, element, scale_exponent, rounding, random_bits, saturate=True):
    """Bits of ``qjax.quantize._round_scaled(x, element, scale_exponent, ...)`` for float32 bit
    patterns ``b``: the same computation, written with kernel-safe helpers."""
    sign, a = b & _SIGN, b & _ABS
    is_nan = a > _INF
    a = jnp.minimum(a, _INF)
    biased = _i32(a >> 23)
    ulp_exponent = jnp.maximum(biased, 1) - 150
    if isinstance(element, F.IntEncoding):
        step_exponent = scale_exponent - element.fraction_bits
    else:
        lowest = element.emin + scale_exponent
        step_exponent = jnp.maximum(_floor_log2(a), lowest) - element.mantissa_bits
    shift = step_exponent - ulp_exponent
    in_binade = _u32(_clip(shift, 1, 23))
    mask = (np.uint32(1) << in_binade) - 1
    significand = jnp.where(biased > 0, (a & _MANT) | _IMPLICIT, a)
    if rounding == "nearest":
        half = np.uint32(1) << (in_binade - 1)
        remainder = a & mask
        odd = ((significand >> in_binade) & 1) == 1
        up = (remainder > half) | ((remainder == half) & odd)
        cleared = (a & ~mask) + jnp.where(up, mask + 1, np.uint32(0))
        below = jnp.where(a > _power_of_two_bits(step_exponent - 1),
                          _power_of_two_bits(step_exponent), np.uint32(0))
    else:
        cleared = (a + (random_bits & mask)) & ~mask
        wide = _u32(_clip(shift, 1, 31))
        extra = _u32(_clip(shift - 31, 0, 31))
        up = (random_bits & ((np.uint32(1) << wide) - 1)) < (significand >> extra)
        below = jnp.where(up, _power_of_two_bits(step_exponent), np.uint32(0))
    out = jnp.where(shift <= 0, a, jnp.where(shift <= 23, cleared, below))
    limit = _limit_bits(element, scale_exponent)
    if saturate or not isinstance(element, F.FloatEncoding) or element.specials == "none":
        out = jnp.minimum(out, limit)
    else:
        overflow = np.uint32(0x7F800000 if element.has_inf else 0x7FC00000)
        out = jnp.where(out > limit, overflow, out)
    if isinstance(element, F.IntEncoding):
        sign = jnp.where(out == 0, np.uint32(0), sign)
    has_nan = isinstance(element, F.FloatEncoding) and element.has_nan
    return jnp.where(is_nan, np.uint32(0x7FC00000 if has_nan else 0), out | sign)


def _round_nearest(b, element, scale_exponent, *, exact_subnormal, specials):
    """Round-to-nearest-even of bit patterns ``b`` to ``element * 2**scale_exponent`` (saturating),
    bit-identical to :func:`_round_generic` with ``rounding="nearest"`` and ``saturate=True``, with
    fewer operations per element (see the module docstring). ``scale_exponent``: int32 of the
    per-block shape (or a Python int); everything derived from it alone is per block.

    ``exact_subnormal=False`` is exact unless a float32 subnormal input meets a block with
    ``emin + scale_exponent < -127``; ``specials=False`` leaves NaN/Inf inputs to the caller (their
    blocks are NaN anyway for E8M0 scales)."""
    a = b & _ABS
    if specials:
        is_nan = a > _INF
        a = jnp.minimum(a, _INF)
    e = _i32(a >> 23)
    if isinstance(element, F.IntEncoding):
        step_low = scale_exponent - element.fraction_bits
        shift = (step_low + 150) - jnp.maximum(e, 1)
    else:
        m = element.mantissa_bits
        lowest = element.emin + scale_exponent
        step_low = lowest - m
        e_eff = e
        if exact_subnormal:  # floor(log2) + 127 of subnormal inputs, from their float conversion
            e_eff = jnp.where(e > 0, e, _i32(_bits(a.astype(jnp.float32)) >> 23) - 149)
        shift = jnp.maximum(e_eff, lowest + 127) - jnp.maximum(e, 1) + (23 - m)
    may_be_exact = exact_subnormal or specials  # shift <= 0 possible
    sh = _u32(_clip(shift, 1, 23) if may_be_exact else jnp.minimum(shift, 23))
    mask = (np.uint32(1) << sh) - 1
    implicit = jnp.where(e > 0, _IMPLICIT, np.uint32(0))
    odd = ((a | implicit) >> sh) & 1
    cleared = (a + (mask >> 1) + odd) & ~mask  # ties to even; a carry moves to the next binade
    below = jnp.where(a > _power_of_two_bits(step_low - 1), _power_of_two_bits(step_low),
                      np.uint32(0))
    out = jnp.where(shift <= 23, cleared, below)
    if may_be_exact:
        out = jnp.where(shift <= 0, a, out)
    out = jnp.minimum(out, _limit_bits(element, scale_exponent))
    sign = b & _SIGN
    if isinstance(element, F.IntEncoding):
        sign = jnp.where(out == 0, np.uint32(0), sign)
    out = out | sign
    if specials:
        has_nan = isinstance(element, F.FloatEncoding) and element.has_nan
        out = jnp.where(is_nan, np.uint32(0x7FC00000 if has_nan else 0), out)
    return out


def _round_stochastic(b, element, scale_exponent, random_bits, *, exact_subnormal):
    """Stochastic rounding of bit patterns ``b`` to ``element * 2**scale_exponent`` (saturating)
    for a float ``element`` and per-block int32 exponents, bit-identical to :func:`_round_generic`
    with ``rounding="stochastic"`` on finite inputs, with the rounding shift of
    :func:`_round_nearest` (NaN/Inf inputs are left to the caller: their blocks are NaN).
    ``exact_subnormal`` as for :func:`_round_nearest`."""
    a = b & _ABS
    e = _i32(a >> 23)
    m = element.mantissa_bits
    lowest = element.emin + scale_exponent
    e_eff = e
    if exact_subnormal:
        e_eff = jnp.where(e > 0, e, _i32(_bits(a.astype(jnp.float32)) >> 23) - 149)
    shift = jnp.maximum(e_eff, lowest + 127) - jnp.maximum(e, 1) + (23 - m)
    mask = (np.uint32(1) << _u32(_clip(shift, 1, 23))) - 1
    cleared = (a + (random_bits & mask)) & ~mask
    significand = jnp.where(e > 0, (a & _MANT) | _IMPLICIT, a)
    wide = (np.uint32(1) << _u32(_clip(shift, 1, 31))) - 1
    up = (random_bits & wide) < (significand >> _u32(_clip(shift - 31, 0, 31)))
    # shift > 23 only where floor(log2 |x|) < lowest (floor(log2 |x|) + 127 <= max(e, 1) + m):
    # the step there is 2**(lowest - m), a per-block constant.
    below = jnp.where(up, _power_of_two_bits(lowest - m), np.uint32(0))
    out = jnp.where(shift <= 23, cleared, below)
    if exact_subnormal:
        out = jnp.where(shift <= 0, a, out)
    out = jnp.minimum(out, _limit_bits(element, scale_exponent))
    return out | (b & _SIGN)


# --------------------------------------------------------------------------- scales


def _e8m0_exponent(amax_bits, element, scale_mode):
    """``qjax.quantize._scale_from_stat``'s E8M0 divisor: the scale exponent, 128 for a block
    holding NaN/Inf. ``amax_bits``: uint32 block maxima of |x| bit patterns."""
    log2_floor = _floor_log2(amax_bits)
    if scale_mode == "floor":
        exponent = log2_floor - element.emax
    else:
        max_mantissa, max_exponent = math.frexp(element.max)
        max_significand = int(max_mantissa * 2**24)
        biased = _i32(amax_bits >> 23)
        significand = jnp.where(biased > 0, (amax_bits & _MANT) | _IMPLICIT, amax_bits & _MANT)
        lead = _lead(significand)
        normalised = significand << _u32(_clip(23 - lead, 0, 31))
        exponent = log2_floor - (max_exponent - 1) + _i32(normalised > np.uint32(max_significand))
    exponent = _clip(exponent, -127, 127)
    exponent = jnp.where(amax_bits > 0, exponent, -127)
    return jnp.where(amax_bits < _INF, exponent, 128)


def _float_scale(amax_bits, fmt, tensor_scale, tensor_reciprocal):
    """``qjax.quantize._scale_from_stat`` for non-power-of-two scales: ``(block scale, divisor)``
    (float32), the block scale as stored (NaN for blocks holding NaN/Inf) and the divisor of the
    elements, the block scale times the tensor scale of a two-level format (NVFP4)."""
    element, encoding = fmt.element, fmt.scaling.scale
    stat = _from_bits(amax_bits)
    finite = amax_bits < _INF
    nan = np.float32(np.nan)
    target = stat * (np.float32(1) / np.float32(element.max))
    if tensor_scale is not None:
        target = target * tensor_reciprocal
    if encoding.name in ("fp32", "bf16"):
        if encoding.name == "bf16":
            target = _from_bits(_round_generic(_bits(target), F.get("bf16").element, 0, "nearest",
                                               None, saturate=False))
        value = jnp.where(finite, jnp.where(target > 0, target, np.float32(1)), nan)
        return value, value
    grid = encoding.float_encoding
    value = _from_bits(_round_generic(_bits(jnp.where(finite, target, nan)), grid, 0, "nearest",
                                      None))
    return value, (value if tensor_scale is None else value * tensor_scale)


def quantize_float_scaled_tile(b, amax, fmt, rounding, random_bits, tensor_pair, *, interpret):
    """Quantization of float32 bit patterns ``b`` in registers with float block scales (int4's
    bf16/fp32 scales, NVFP4's E4M3 scales under a tensor scale) from the block maxima ``amax``
    (uint32 bits of |x|, broadcastable against ``b``): RTN or SR (``random_bits``) of ``b`` times
    the divisor's reciprocal, correctly rounded (``rcp.rn`` on the GPU, long division in the
    interpreter), as ``qjax.quantize`` does.

    Args:
      tensor_pair: ``(tensor scale, its reciprocal)`` for two-level formats, else None.

    Returns:
      ``(elements, block scale, divisor)``, float32: ``elements * divisor`` is the fake-quantized
      value, ``elements * block scale`` the same without the tensor scale. Shared by the fused
      kernels of this package.
    """
    tensor_scale, tensor_reciprocal = (None, None) if tensor_pair is None else tensor_pair
    value, divisor = _float_scale(amax, fmt, tensor_scale, tensor_reciprocal)
    if interpret:
        reciprocal = _reciprocal(divisor)
    else:
        # The divisor is at most about float32's max / element max (a tensor scale included),
        # rounded up by at most a bf16 ulp: below 2**126, so 1/divisor is normal, for elements
        # up to 4 or more (E2M1, int4).
        largest = float(np.finfo(np.float32).max) / fmt.element.max * (1 + 2.0**-7)
        reciprocal = _reciprocal_fast(divisor, subnormal_possible=largest >= 2.0**126)
    reciprocal = jnp.where(divisor == 0, np.float32(0), reciprocal)
    y = _bits(_from_bits(b) * reciprocal)
    if rounding == "nearest":
        elements = _round_nearest(y, fmt.element, 0, exact_subnormal=False, specials=True)
    elif isinstance(fmt.element, F.FloatEncoding):
        # At scale exponent 0 no block lies below 2**-127, so the shortcut's rounding shift is
        # exact for float32 subnormals too; Inf saturates in it, NaN is handled here.
        elements = _round_stochastic(y, fmt.element, 0, random_bits, exact_subnormal=False)
        nan_code = np.uint32(0x7FC00000 if fmt.element.has_nan else 0)
        elements = jnp.where((y & _ABS) > _INF, nan_code, elements)
    else:
        elements = _round_generic(y, fmt.element, 0, rounding, random_bits)
    return _from_bits(elements), value, divisor


# --------------------------------------------------------------------------- kernel


def _load(ref, mask):
    if mask is None:
        return ref[...]
    return _triton_load(ref, mask=mask, other=0)


def _store(ref, value, mask):
    if mask is None:
        ref[...] = value
    else:
        _triton_store(ref, value, mask=mask)


def _triton_load(ref, *, mask, other):
    if hasattr(pltriton, "load"):
        return pltriton.load(ref, mask=mask, other=other)
    return pl.load(ref, (slice(None),) * len(ref.shape), mask=mask, other=other)


def _triton_store(ref, value, *, mask):
    if hasattr(pltriton, "store"):
        return pltriton.store(ref, value, mask=mask)
    return pl.store(ref, (slice(None),) * len(ref.shape), value, mask=mask)


def _tile_mask(shape, rows, blocks):
    """In-bounds mask of this program's tile, or None when the grid divides the array. The edge
    tiles are masked here explicitly: the BlockSpec's own bounds masking was seen not to mask the
    stores of a partial edge tile (JAX 0.11.2, Triton backend, H100), which then wrote past the
    output into other buffers."""
    block_rows, blocks_per_tile, size = shape
    if rows % block_rows == 0 and blocks % blocks_per_tile == 0:
        return None
    row = pl.program_id(0) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    col = pl.program_id(1) * blocks_per_tile + jnp.arange(blocks_per_tile, dtype=jnp.int32)
    mask = (row[:, None, None] < rows) & (col[None, :, None] < blocks)
    return jnp.broadcast_to(mask, shape)


def _column_tile_mask(shape, blocks, inner):
    """:func:`_tile_mask` for the layout of a non-last quantized axis: tiles ``(blocks_per_tile,
    B, block_inner)`` of the view ``(outer, K // B, B, inner)``, grid ``(outer, block tiles,
    inner tiles)``."""
    blocks_per_tile, _, block_inner = shape
    if blocks % blocks_per_tile == 0 and inner % block_inner == 0:
        return None
    col = pl.program_id(1) * blocks_per_tile + jnp.arange(blocks_per_tile, dtype=jnp.int32)
    lane = pl.program_id(2) * block_inner + jnp.arange(block_inner, dtype=jnp.int32)
    mask = (col[:, None, None] < blocks) & (lane[None, None, :] < inner)
    return jnp.broadcast_to(mask, shape)


def tile_random_bits(shape, words_ref, length, inner=None):
    """``qjax.stochastic_bits`` of this program's tile, computed in registers from the flat
    indices of its elements and the key's two stream words: tiles ``(block_rows, blocks, B)`` of
    ``(rows, length // B, B)`` (``inner is None``), or ``(blocks, B, block_inner)`` of ``(outer,
    length // B, B, inner)``."""
    if inner is None:
        block_rows, blocks_per_tile, size = shape
        row = pl.program_id(0) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
        col = (pl.program_id(1) * blocks_per_tile + jnp.arange(blocks_per_tile, dtype=jnp.int32))
        index = (_u32(row)[:, None, None] * np.uint32(length)
                 + _u32(col)[None, :, None] * np.uint32(size)
                 + _u32(jnp.arange(size, dtype=jnp.int32))[None, None, :])
    else:
        blocks_per_tile, size, block_inner = shape
        col = pl.program_id(1) * blocks_per_tile + jnp.arange(blocks_per_tile, dtype=jnp.int32)
        along = (_u32(pl.program_id(0)) * np.uint32(length) + _u32(col)[:, None] * np.uint32(size)
                 + _u32(jnp.arange(size, dtype=jnp.int32))[None, :])
        lane = pl.program_id(2) * block_inner + jnp.arange(block_inner, dtype=jnp.int32)
        index = along[:, :, None] * np.uint32(inner) + _u32(lane)[None, None, :]
    return counter_bits(index, (words_ref[0], words_ref[1]))


def quantize_e8m0_tile(b, amax, element, scale_mode, rounding, prescale, random_bits):
    """Fake quantization of float32 bit patterns ``b`` in registers with E8M0 block scales from
    the block maxima ``amax`` (uint32 bits of |x|, broadcastable against ``b``): the scale, the
    optional pre-scale, RTN or SR (``random_bits``) of the elements. Returns float32 values, NaN
    for blocks holding NaN/Inf. Shared by the fused kernels of this package."""
    divisor = _e8m0_exponent(amax, element, scale_mode)
    exponent = jnp.minimum(divisor, 127)
    if prescale != 1:  # scales from x, elements from prescale * x
        b = _bits(_from_bits(b) * np.float32(prescale))
    if rounding == "nearest":
        def fast(b, e, exact):
            return _round_nearest(b, element, e, exact_subnormal=exact, specials=False)
    else:
        def fast(b, e, exact):
            return _round_stochastic(b, element, e, random_bits, exact_subnormal=exact)
    if rounding != "nearest" and isinstance(element, F.IntEncoding):
        out = _round_generic(b, element, exponent, rounding, random_bits)
    elif isinstance(element, F.IntEncoding) or element.emin >= 0:
        out = fast(b, exponent, False)
    elif element.mantissa_bits > 21:
        out = fast(b, exponent, True)
    else:
        needs_exact = jnp.min(exponent) < -127 - element.emin  # a block with L < 0
        out = lax.cond(needs_exact, lambda b, e: fast(b, e, True),
                       lambda b, e: fast(b, e, False), b, exponent)
    return _from_bits(jnp.where(divisor > 127, _NAN, out))


def _kernel(*refs, fmt, rounding, scale_mode, has_bits, has_tensor_scale, interpret, rows,
            blocks, inner, length, prescale, split):
    """One tile: ``(block_rows, blocks_per_tile, B)`` with the blocks along the last axis
    (``inner is None``), or ``(blocks_per_tile, B, block_inner)`` with the blocks along the middle
    axis (a non-last quantized axis, ``inner`` elements after it)."""
    refs = list(refs)
    x_ref, o_ref = refs.pop(0), refs.pop()
    words_ref = refs.pop(0) if has_bits else None
    ts_ref = refs.pop(0) if has_tensor_scale else None
    element = fmt.element
    if inner is None:
        mask, block_axis = _tile_mask(x_ref.shape, rows, blocks), -1
    else:
        mask, block_axis = _column_tile_mask(x_ref.shape, blocks, inner), 1
    b = _bits(_load(x_ref, mask).astype(jnp.float32))
    amax = jnp.max(b & _ABS, axis=block_axis, keepdims=True)  # max of bits: NaN-propagating
    random_bits = tile_random_bits(x_ref.shape, words_ref, length, inner) if has_bits else None
    if fmt.scaling.scale.power_of_two:
        out = quantize_e8m0_tile(b, amax, element, scale_mode, rounding, prescale, random_bits)
    else:
        tensor_pair = (ts_ref[0], ts_ref[1]) if has_tensor_scale else None
        elements, scale, divisor = quantize_float_scaled_tile(b, amax, fmt, rounding, random_bits,
                                                              tensor_pair, interpret=interpret)
        out = elements * (scale if split else divisor)
    _store(o_ref, out.astype(o_ref.dtype), mask)


# --------------------------------------------------------------------------- wrapper


def supports(fmt: F.FormatLike) -> bool:
    """Whether :func:`fake_quant_pallas` handles ``fmt``: 1-D ``Block`` scaling with the absmax
    statistic and a float or integer element."""
    fmt = F.get(fmt)
    s = fmt.scaling
    return (s is not None and isinstance(s.granularity, F.Block) and s.statistic == "absmax"
            and isinstance(fmt.element, (F.FloatEncoding, F.IntEncoding)))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tensor_scale_pair(amax, fmt):
    """The NVFP4 tensor scale (``qjax.quantize._tensor_scale``) of a tensor whose max |x| is the
    float32 scalar ``amax``, and its reciprocal, by XLA, as the ``(2,)`` operand the kernels read."""
    scale = _tensor_scale_of_amax(amax, fmt)
    # XLA's unrolled long division: the kernels' rolled loop (`_reciprocal`) is a while loop
    # here, 25 launches that took 145 us against the whole 8192^2 kernel's 158 (H100).
    return jnp.stack([scale, _xla_reciprocal(scale)])


def _tensor_amax_scale(x, fmt):
    return tensor_scale_pair(_from_bits(jnp.max(_bits(x.astype(jnp.float32)) & _ABS)), fmt)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12))
def _fake_quant(x, fmt, rounding, key, scale_mode, block_rows, block_cols, num_warps, num_stages,
                interpret, axis, prescale, out_dtype):
    return _fake_quant_jit(x, fmt, rounding, key, scale_mode, block_rows, block_cols, num_warps,
                           num_stages, interpret, axis, prescale, out_dtype, False)


@_fake_quant.defjvp
def _fake_quant_jvp(fmt, rounding, scale_mode, block_rows, block_cols, num_warps, num_stages,
                    interpret, axis, prescale, out_dtype, primals, tangents):
    x, key = primals
    out = _fake_quant(x, fmt, rounding, key, scale_mode, block_rows, block_cols, num_warps,
                      num_stages, interpret, axis, prescale, out_dtype)
    return out, tangents[0].astype(out.dtype)  # straight-through, as qjax.fake_quant


def tiled_operands(x, fmt, rounding, key, block_rows, block_cols, axis=-1):
    """The grid, tile spec and operands shared by the fused kernels of this package: ``x`` viewed
    as ``(rows, K // B, B)`` (``axis`` last) or ``(outer, K // B, B, inner)`` (any other axis; a
    program takes ``block_cols // B`` blocks of ``block_rows`` consecutive inner columns), the
    random bits ``qjax.quantize``/``qjax.fake_quant`` draw for stochastic rounding, and NVFP4's
    tensor scale with its reciprocal.

    Returns:
      ``(grid, tile, operands, in_specs, rows, inner)``; ``inner`` is None for the last axis.
    """
    shape = x.shape
    axis = axis % len(shape)
    size = fmt.block_size
    k = shape[axis]
    blocks_per_tile = block_cols // size
    if axis == len(shape) - 1:
        m, inner = math.prod(shape[:-1]), None
        view = x.reshape(m, k // size, size)
        grid = (pl.cdiv(m, block_rows), pl.cdiv(k // size, blocks_per_tile))
        tile = pl.BlockSpec((block_rows, blocks_per_tile, size), lambda i, j: (i, j, 0))
    else:
        m, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
        view = x.reshape(m, k // size, size, inner)
        grid = (m, pl.cdiv(k // size, blocks_per_tile), pl.cdiv(inner, block_rows))
        tile = pl.BlockSpec((None, blocks_per_tile, size, block_rows),
                            lambda o, j, i: (o, j, 0, i))
    operands, in_specs = [view], [tile]
    if rounding == "stochastic":  # the kernel computes qjax.stochastic_bits from these two words
        check_counter_range(shape)
        operands.append(stream_words(key))
        in_specs.append(pl.BlockSpec((2,), lambda *ids: (0,)))
    if fmt.scaling.tensor_scale:
        operands.append(_tensor_amax_scale(x, fmt))
        in_specs.append(pl.BlockSpec((2,), lambda *ids: (0,)))
    return grid, tile, operands, in_specs, m, inner


@functools.partial(jax.jit, static_argnums=(1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13))
def _fake_quant_jit(x, fmt, rounding, key, scale_mode, block_rows, block_cols, num_warps,
                    num_stages, interpret, axis, prescale, out_dtype, split_tensor_scale):
    grid, tile, operands, in_specs, m, inner = tiled_operands(x, fmt, rounding, key, block_rows,
                                                              block_cols, axis)
    kernel = functools.partial(_kernel, fmt=fmt, rounding=rounding, scale_mode=scale_mode,
                               has_bits=rounding == "stochastic",
                               has_tensor_scale=fmt.scaling.tensor_scale, interpret=interpret,
                               rows=m, blocks=operands[0].shape[1], inner=inner,
                               length=x.shape[axis], prescale=prescale,
                               split=split_tensor_scale)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(operands[0].shape, out_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"fake_quant_{fmt.name}",
    )(*operands)
    if split_tensor_scale:  # the tensor scale pair is the last operand
        return out.reshape(x.shape), operands[-1][0].reshape((1,) * x.ndim)
    return out.reshape(x.shape)


def check_split_tensor_scale(fmt: F.Format, split_tensor_scale: bool) -> None:
    """ValueError where ``split_tensor_scale`` is asked of a format without a tensor scale."""
    if split_tensor_scale and not fmt.scaling.tensor_scale:
        raise ValueError(f"split_tensor_scale needs a two-level format with a tensor scale "
                         f"(nvfp4); {fmt.name!r} has none.")


def check_arguments(x, fmt: F.Format, rounding, key, scale_mode, block_rows, block_cols, *,
                    caller: str, fallback: str, axis: int = -1) -> None:
    """The argument checks of the fused kernels (:func:`fake_quant_pallas` and
    ``qjax.pallas.quantize_pallas``): ValueError/TypeError naming the problem and the choices."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; valid: nearest, stochastic.")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(seed).")
    if scale_mode not in ("floor", "rceil"):
        raise ValueError(f"unknown scale_mode {scale_mode!r}; valid: floor, rceil.")
    if scale_mode != "floor" and not fmt.scaling.scale.power_of_two:
        raise ValueError(f"scale_mode={scale_mode!r} applies to E8M0 (power-of-two) scales only; "
                         f"format {fmt.name!r} has none.")
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize > 4:
        raise TypeError(f"{caller} needs a float32, bfloat16 or float16 input, got "
                        f"{x.dtype}.")
    if x.ndim == 0:
        raise ValueError(f"{caller} needs an array of rank >= 1; got a scalar.")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{caller}: axis {axis} is out of range for an array of rank {x.ndim}.")
    size = fmt.block_size
    if x.shape[axis] % size:
        raise ValueError(
            f"{caller} quantizes along axis {axis} in blocks of {size} ({fmt.name}): "
            f"its length must be a multiple of {size}, got shape {x.shape}. Pad that axis to "
            f"{-(-x.shape[axis] // size) * size} (zeros give what {fallback} computes), or use "
            f"{fallback}.")
    if block_cols % size or not _is_power_of_two(block_cols // size):
        raise ValueError(f"block_cols must be the block size {size} times a power of two, got "
                         f"{block_cols}.")
    if not _is_power_of_two(block_rows):
        raise ValueError(f"block_rows must be a power of two, got {block_rows}.")


def fake_quant_pallas(x, fmt: F.FormatLike, *, rounding: str = "nearest", key=None,
                      scale_mode: str = "floor", block_rows: int | None = None,
                      block_cols: int | None = None, num_warps: int = DEFAULT_NUM_WARPS,
                      num_stages: int | None = None, interpret: bool = False, axis: int = -1,
                      prescale: float = 1.0, out_dtype=None, split_tensor_scale: bool = False):
    """``qjax.fake_quant(x, fmt, axis=axis, ...)`` as one fused Pallas kernel, bit for bit.

    Args:
      x: float32, bfloat16 or float16 array of rank >= 1, quantized along ``axis``, whose length
        must be a multiple of the format's block size (pad it first: padding with zeros gives the
        blocks ``qjax.fake_quant`` pads implicitly).
      fmt: a format with ``Block`` scaling and the absmax statistic (:func:`supports`): mxfp8,
        mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, mxint8, int4, nvfp4, or a user-built one.
      rounding: ``"nearest"`` or ``"stochastic"`` (needs ``key``; the random bits are those of
        ``qjax.fake_quant``, generated by XLA and read by the kernel).
      key: PRNG key for stochastic rounding.
      scale_mode: ``"floor"`` or ``"rceil"`` (E8M0 scales only).
      block_rows: rows per program (a power of two): for a non-last ``axis``, consecutive columns
        of the axes after it (the blocks of one program run down that many columns). Default:
        ``DEFAULT_BLOCK_ROWS`` (last axis), ``DEFAULT_COLUMN_BLOCK_ROWS`` (any other).
      block_cols: elements of the quantized axis per program: a multiple of the block size whose
        quotient by it is a power of two (default ``DEFAULT_BLOCK_COLS`` for the last axis, one
        block for any other). Both are capped to the array (rounded up to a power of two);
        partial edge tiles are masked.
      num_warps, num_stages: Triton launch parameters (None: Pallas' defaults).
      interpret: run the kernel in the Pallas interpreter (any backend; for tests on CPU).
      axis: the quantized axis (the blocks run along it), as in ``qjax.fake_quant``.
      prescale: E8M0 formats only: ``qjax.quantize.prescaled_fake_quant`` (scales from ``x``,
        elements from ``prescale * x``); 1 is ``qjax.fake_quant``.
      out_dtype: the result's dtype (default ``x``'s), written by the kernel.
      split_tensor_scale: for a two-level format (NVFP4), return ``(elements * block scales,
        tensor scale)`` (the tensor scale float32 of shape ``(1,) * x.ndim``), the factors a GEMM
        multiplies (``qjax.quantize._split_outer_scale``), instead of their product. Not
        differentiable.

    Returns:
      An array of ``x``'s shape and ``out_dtype`` (a pair with ``split_tensor_scale``). The
      derivative is the straight-through estimator.
    """
    fmt = F.get(fmt)
    x = jnp.asarray(x)
    if not supports(fmt):
        raise ValueError(f"fake_quant_pallas handles formats with 1-D Block scaling and the absmax "
                         f"statistic (mxfp*, mxint8, int4, nvfp4); {fmt.name!r} has none. Use "
                         f"qjax.fake_quant.")
    if prescale != 1 and not fmt.scaling.scale.power_of_two:
        raise ValueError(f"prescale applies to E8M0-scaled formats; {fmt.name!r} is not one.")
    check_split_tensor_scale(fmt, split_tensor_scale)
    last = x.ndim == 0 or axis in (-1, x.ndim - 1)
    if block_rows is None:
        block_rows = DEFAULT_BLOCK_ROWS if last else DEFAULT_COLUMN_BLOCK_ROWS
    if block_cols is None:
        block_cols = DEFAULT_BLOCK_COLS if last else fmt.block_size
    check_arguments(x, fmt, rounding, key, scale_mode, block_rows, block_cols,
                    caller="fake_quant_pallas", fallback="qjax.fake_quant", axis=axis)
    out_dtype = x.dtype if out_dtype is None else np.dtype(out_dtype)
    if x.size == 0:
        empty = x.astype(out_dtype)
        return (empty, jnp.ones((1,) * x.ndim, jnp.float32)) if split_tensor_scale else empty
    axis = axis % x.ndim
    size = fmt.block_size
    rows = math.prod(x.shape[:-1]) if axis == x.ndim - 1 else math.prod(x.shape[axis + 1:])
    block_rows = min(block_rows, _next_power_of_two(rows))
    block_cols = min(block_cols, size * _next_power_of_two(x.shape[axis] // size))
    if rounding == "nearest":
        key = None
    if split_tensor_scale:
        return _fake_quant_jit(x, fmt, rounding, key, scale_mode, block_rows, block_cols,
                               num_warps, num_stages, interpret, axis, float(prescale), out_dtype,
                               True)
    return _fake_quant(x, fmt, rounding, key, scale_mode, block_rows, block_cols, num_warps,
                       num_stages, interpret, axis, float(prescale), out_dtype)

"""Fused quantization for block-scaled formats: one Pallas (Triton) kernel, one pass.

``qjax.quantize`` of a block format under XLA reads the tensor several times (block amax, element
rounding, element encoding, scale encoding; 4.2-4.4x the time of an elementwise read+write for the
MX formats on an H100, docs/benchmarks.md). Here each program loads one ``(block_rows,
block_cols)`` tile, reduces the amax of its ``block_cols // B`` blocks in registers, computes and
encodes the scales, rounds the elements in the element domain and encodes them: the tensor is read
once, and one byte per element plus one per block is written.

Results are bit-identical to :func:`qjax.quantize` (values and scales of the :class:`QArray`); the
rounding and scale helpers are those of :mod:`qjax.pallas.fake_quant` (integer arithmetic on
float32 bit patterns, see its docstring for the Triton-specific rules).

Element domain for E8M0 scales: the element is the rounding of ``x * 2**-e`` (``e`` the block's
scale exponent). That product is formed exactly on bit patterns: for a normal ``x`` whose product
stays normal it is an exponent-field subtraction; a subnormal ``x`` is recomposed from its
mantissa; a product below ``2**-126`` becomes ``±0``. The last step is exact because every
element encoding this kernel takes (:func:`supports`) has its smallest positive value at or above
``2**-100``: such a product rounds to ``±0`` (nearest) and has a rounding-up probability below
``2**-32`` with 32 random bits (stochastic), i.e. exactly zero, as in ``qjax.quantize``.

Stochastic rounding consumes the random bits ``qjax.quantize`` draws (``qjax.stochastic_bits``),
computed in the kernel from the tile's flat indices (:func:`qjax.pallas.fake_quant.tile_random_bits`),
so that it is bit-identical too.
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
from jaxtyping import Array, Float, Key

from qjax import formats as F
from qjax.quantize import QArray, code_storage, quantize
from qjax.pallas import fake_quant as FQ

__all__ = ["quantize_pallas", "supports"]

DEFAULT_BLOCK_ROWS = 8
DEFAULT_BLOCK_COLS = 512
DEFAULT_NUM_WARPS = 4

_ABS, _SIGN, _INF, _NAN = FQ._ABS, FQ._SIGN, FQ._INF, FQ._NAN
_MANT, _IMPLICIT = FQ._MANT, FQ._IMPLICIT
_u32, _i32, _clip, _bits, _from_bits = FQ._u32, FQ._i32, FQ._clip, FQ._bits, FQ._from_bits


def supports(fmt: F.FormatLike) -> bool:
    """Whether :func:`quantize_pallas` handles ``fmt``: what :func:`qjax.pallas.fake_quant.supports`
    takes, with integer elements or float elements of 8 bits or fewer (one byte of storage each)
    whose smallest positive value is at least ``2**-100``."""
    fmt = F.get(fmt)
    element = fmt.element
    if isinstance(element, F.IntEncoding):
        return FQ.supports(fmt)
    return (FQ.supports(fmt) and isinstance(element, F.FloatEncoding) and element.bits <= 8
            and element.emin - element.mantissa_bits >= -100)


# --------------------------------------------------------------------------- kernel helpers


def _subnormal_flag(a):
    """1 where the tile holds a float32 subnormal, else 0 (``a``: magnitude bit patterns)."""
    return jnp.max(_u32((a > 0) & (a < _IMPLICIT)))


def _scale_down(b, exponent):
    """Bits of ``x * 2**-exponent`` for float32 bit patterns ``b`` and int32 block exponents in
    [-127, 127]; products below ``2**-126`` become ``±0`` (see the module docstring). NaN/Inf
    patterns give garbage: their blocks are NaN blocks, overwritten by the caller.

    Only float32 subnormal inputs need the recomposition; a tile without any takes the
    exponent-field subtraction alone (``lax.cond`` on the tile: uniform across the program)."""
    sign, a = b & _SIGN, b & _ABS
    biased = _i32(a >> 23)
    normal = jnp.where((biased > 0) & (biased - exponent >= 1), a + (_u32(-exponent) << 23),
                       np.uint32(0))  # zeros, and products below 2**-126, are ±0

    def with_subnormal_inputs(a, exponent, normal):
        subnormal = FQ._compose_var(a, -149 - exponent, FQ._lead(a))  # a * 2**-149 * 2**-exponent
        out = jnp.where(a >= _IMPLICIT, normal, subnormal)
        return jnp.where(out < _IMPLICIT, np.uint32(0), out)  # below 2**-126: ±0

    out = lax.cond(_subnormal_flag(a) > 0, with_subnormal_inputs, lambda a, e, normal: normal,
                   a, exponent, normal)
    return out | sign


def _encode(y, element):
    """``qjax.quantize.encode`` of on-grid float element values given as float32 bit patterns
    (no clz)."""
    e, m = element.exponent_bits, element.mantissa_bits
    sign, a = y & _SIGN, y & _ABS
    biased = _i32(a >> 23)
    exponent = jnp.maximum(biased, 1) - 127
    significand = (a & _MANT) | jnp.where(biased > 0, _IMPLICIT, np.uint32(0))
    normal = exponent >= element.emin
    field = _u32(jnp.where(normal, exponent + element.bias, 0))
    down = _u32(_clip(23 - m + jnp.where(normal, 0, element.emin - exponent), 0, 31))
    code = (field << m) | ((significand >> down) & np.uint32((1 << m) - 1))
    code = jnp.where(a == 0, np.uint32(0), code)
    top = (1 << e) - 1
    if element.specials == "ieee":
        code = jnp.where(a == _INF, np.uint32(top << m), code)
        code = jnp.where(a > _INF, np.uint32((top << m) | (1 << (m - 1) if m else 1)), code)
    elif element.specials == "fn":
        code = jnp.where(a > _INF, np.uint32((top << m) | ((1 << m) - 1)), code)
    if element.signed:
        code = code | ((sign >> 31) << (e + m))
    return code


def _encode_scaled(out, element, exponent):
    """Codes of on-grid values ``out = v * 2**exponent`` (float32 bit patterns; ``v`` a value of
    the float ``element``), for per-block int32 exponents at which every nonzero ``out`` is a
    normal float32 (:func:`_fast_exponent_range`). The element's exponent field and mantissa are
    ``out``'s shifted down, less a per-block constant; subnormal elements are the significand
    shifted by the distance to the smallest subnormal step (zero shifts out entirely)."""
    m = element.mantissa_bits
    a = out & _ABS
    smallest_normal = _u32(element.emin + exponent + 127) << 23  # bits of 2**(emin + exponent)
    normal = (a >> (23 - m)) - (_u32(127 - element.bias + exponent) << m)
    shift = _u32(jnp.minimum((150 - m + element.emin) + exponent - _i32(a >> 23), 31))
    subnormal = ((a & _MANT) | _IMPLICIT) >> shift
    code = jnp.where(a >= smallest_normal, normal, subnormal)
    if element.signed:
        code = code | ((out & _SIGN) >> (31 - element.exponent_bits - m))
    return code


def _fast_exponent_range(element):
    """Block exponents at which :func:`_encode_scaled` applies: the smallest subnormal element
    times ``2**exponent`` is a normal float32, and the largest element times it is finite."""
    return -126 - element.emin + element.mantissa_bits, 127 - element.emax


def _kernel(*refs, fmt, rounding, scale_mode, has_bits, has_tensor_scale, interpret, rows,
            blocks, nan_code):
    refs = list(refs)
    x_ref = refs.pop(0)
    words_ref = refs.pop(0) if has_bits else None
    ts_ref = refs.pop(0) if has_tensor_scale else None
    codes_ref, scales_ref = refs
    element = fmt.element
    mask = FQ._tile_mask(x_ref.shape, rows, blocks)
    b = _bits(FQ._load(x_ref, mask).astype(jnp.float32))  # (block_rows, blocks, B)
    amax = jnp.max(b & _ABS, axis=-1, keepdims=True)
    random_bits = (FQ.tile_random_bits(x_ref.shape, words_ref, blocks * fmt.block_size)
                   if has_bits else None)
    if fmt.scaling.scale.power_of_two:
        divisor = FQ._e8m0_exponent(amax, element, scale_mode)
        exponent = jnp.minimum(divisor, 127)

        def element_domain(b, exponent, random_bits):
            y = _scale_down(b, exponent)
            if rounding == "nearest":
                return FQ._round_nearest(y, element, 0, exact_subnormal=False, specials=False)
            return FQ._round_generic(y, element, 0, rounding, random_bits)

        if isinstance(element, F.IntEncoding):
            elements = element_domain(b, exponent, random_bits)
        else:
            # Round as fake_quant does (at the block's scale, no scaling of x) and encode the
            # result; tiles with a block outside that encoding's exponent range (amax below about
            # 2**-115 or above 2**125) take the exact element-domain path and encode generally.
            # NaN/Inf blocks (overwritten below) and zero blocks (all codes ±0 at any exponent)
            # do not count.
            def at_block_scale(b, exponent, random_bits):
                if rounding == "nearest":
                    out = FQ._round_nearest(b, element, exponent, exact_subnormal=False,
                                            specials=False)
                else:
                    out = FQ._round_stochastic(b, element, exponent, random_bits,
                                               exact_subnormal=False)
                return _encode_scaled(out, element, exponent)

            def general(b, exponent, random_bits):
                return _encode(element_domain(b, exponent, random_bits), element)

            ordinary = jnp.where((divisor > 127) | (amax == 0), 0, divisor)
            low, high = _fast_exponent_range(element)
            fast = (jnp.min(ordinary) >= low) & (jnp.max(ordinary) <= high)
            if rounding == "stochastic":
                # SR of a float32 subnormal x draws on other random bits than SR of the normal
                # x * 2**-e that qjax.quantize rounds (same distribution, other bits).
                fast = fast & (_subnormal_flag(b & _ABS) == 0)
            codes = lax.cond(fast, at_block_scale, general, b, ordinary, random_bits)
            codes = jnp.where(divisor > 127, np.uint32(nan_code), codes)
        scale_code = _u32(jnp.where(divisor > 127, 255, divisor + 127))
    else:
        tensor_pair = (ts_ref[0], ts_ref[1]) if has_tensor_scale else None
        elements, value, _ = FQ.quantize_float_scaled_tile(b, amax, fmt, rounding, random_bits,
                                                           tensor_pair, interpret=interpret)
        elements = _bits(elements)
        encoding = fmt.scaling.scale
        if encoding.name == "fp32":
            scale_code = _bits(value)
        elif encoding.name == "bf16":
            scale_code = _bits(value) >> 16
        else:
            scale_code = _encode(_bits(value), encoding.float_encoding)
    if isinstance(element, F.IntEncoding):
        if fmt.scaling.scale.power_of_two:
            elements = jnp.where(divisor > 127, _NAN, elements)
        # On-grid values times 2**fraction_bits are integers: the conversion is exact. NaN
        # elements (NaN/Inf blocks) store 0, as XLA's float-to-int conversion does.
        value = _from_bits(elements) * np.float32(2.0**element.fraction_bits)
        codes = _u32(jnp.where(value == value, value, np.float32(0)).astype(jnp.int32)) & 0xFF
    elif not fmt.scaling.scale.power_of_two:
        codes = _encode(elements, element)
    FQ._store(codes_ref, codes.astype(codes_ref.dtype), mask)
    scale_mask = None if mask is None else FQ._tile_mask(scales_ref.shape, rows, blocks)
    FQ._store(scales_ref, scale_code.astype(scales_ref.dtype), scale_mask)


# --------------------------------------------------------------------------- wrapper


def _nan_code(element) -> int:
    """The byte a NaN/Inf block's elements store: :func:`_encode` of the NaN pattern (for elements
    without NaN, what XLA's ``qjax.quantize`` stores too)."""
    if not isinstance(element, F.FloatEncoding):
        return 0
    with jax.ensure_compile_time_eval():
        return int(_encode(jnp.asarray(_NAN, jnp.uint32), element)) & 0xFF


def _scale_storage(fmt):
    """(kernel output dtype of the scale codes, QArray scale dtype)."""
    name = fmt.scaling.scale.name
    if fmt.scaling.scale.power_of_two:
        return jnp.uint8, jnp.float8_e8m0fnu
    return {"fp32": (jnp.uint32, jnp.float32), "bf16": (jnp.uint16, jnp.bfloat16),
            "e4m3": (jnp.uint8, jnp.float8_e4m3fn)}.get(name, (jnp.uint8, jnp.uint8))


@functools.partial(jax.jit, static_argnums=(1, 2, 4, 5, 6, 7, 8, 9))
def _quantize_jit(x, fmt, rounding, key, scale_mode, block_rows, block_cols, num_warps,
                  num_stages, interpret):
    shape = x.shape
    grid, tile, operands, in_specs, m, _ = FQ.tiled_operands(x, fmt, rounding, key, block_rows,
                                                             block_cols)
    x3 = operands[0]
    blocks = x3.shape[1]
    scale_tile = pl.BlockSpec((block_rows, block_cols // fmt.block_size, 1), lambda i, j: (i, j, 0))
    tensor_scale = None
    if fmt.scaling.tensor_scale:
        tensor_scale = operands[-1][0].reshape((1,) * len(shape))
    scale_dtype, stored_dtype = _scale_storage(fmt)
    kernel = functools.partial(_kernel, fmt=fmt, rounding=rounding, scale_mode=scale_mode,
                               has_bits=rounding == "stochastic",
                               has_tensor_scale=fmt.scaling.tensor_scale, interpret=interpret,
                               rows=m, blocks=blocks, nan_code=_nan_code(fmt.element))
    codes, scales = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x3.shape, jnp.uint8),
                   jax.ShapeDtypeStruct((m, blocks, 1), scale_dtype)),
        grid=grid,
        in_specs=in_specs,
        out_specs=(tile, scale_tile),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"quantize_{fmt.name}",
    )(*operands)
    codes = codes.reshape(shape)
    if isinstance(fmt.element, F.IntEncoding):
        values = lax.bitcast_convert_type(codes, jnp.int8)
    else:
        values = code_storage(codes, fmt.element)
    scales = lax.bitcast_convert_type(scales.reshape(*shape[:-1], blocks), stored_dtype)
    block_shape = fmt.scaling.granularity.block_shape(shape, len(shape) - 1)
    return QArray(values, scales, tensor_scale, fmt, -1, block_shape, x.dtype)


def quantize_pallas(x: Float[Array, "..."], fmt: F.FormatLike, *, rounding: str = "nearest",
                    key: Key[Array, ""] | None = None, scale_mode: str = "floor",
                    block_rows: int = DEFAULT_BLOCK_ROWS, block_cols: int = DEFAULT_BLOCK_COLS,
                    num_warps: int = DEFAULT_NUM_WARPS, num_stages: int | None = None,
                    interpret: bool = False) -> QArray:
    """``qjax.quantize(x, fmt, axis=-1, ...)`` as one fused Pallas kernel, bit for bit.

    Args:
      x: float32, bfloat16 or float16 array of rank >= 1, quantized along its last axis; leading
        axes are flattened into rows. The last axis must be a multiple of the block size.
      fmt: a format with ``Block`` scaling, the absmax statistic and a float element of at most
        8 bits (:func:`supports`): mxfp8, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, nvfp4.
      rounding: ``"nearest"`` or ``"stochastic"`` (needs ``key``; the random bits of
        ``qjax.quantize``).
      key: PRNG key for stochastic rounding.
      scale_mode: ``"floor"`` or ``"rceil"`` (E8M0 scales only).
      block_rows, block_cols, num_warps, num_stages: the tile and Triton launch parameters, as
        :func:`qjax.pallas.fake_quant_pallas`.
      interpret: run in the Pallas interpreter (any backend; for tests on CPU).

    Returns:
      The :class:`qjax.QArray` that ``qjax.quantize(x, fmt, axis=-1, ...)`` returns.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (4, 64))
      >>> q = quantize_pallas(x, "mxfp4", interpret=True)
      >>> bool(jnp.all(q.values == qjax.quantize(x, "mxfp4").values))
      True
    """
    fmt = F.get(fmt)
    x = jnp.asarray(x)
    if not supports(fmt):
        raise ValueError(f"quantize_pallas handles formats with 1-D Block scaling, the absmax "
                         f"statistic and float elements of at most 8 bits (mxfp8, mxfp8_e5m2, "
                         f"mxfp6_e3m2, mxfp6_e2m3, mxfp4, nvfp4); {fmt.name!r} is not one. Use "
                         f"qjax.quantize.")
    FQ.check_arguments(x, fmt, rounding, key, scale_mode, block_rows, block_cols,
                       caller="quantize_pallas", fallback="qjax.quantize")
    rows, size = math.prod(x.shape[:-1]), fmt.block_size
    block_rows = min(block_rows, FQ._next_power_of_two(rows))
    block_cols = min(block_cols, size * FQ._next_power_of_two(x.shape[-1] // size))
    if x.size == 0:
        return quantize(x, fmt, axis=-1, rounding=rounding, key=key, scale_mode=scale_mode)
    if rounding == "nearest":
        key = None
    return _quantize_jit(x, fmt, rounding, key, scale_mode, block_rows, block_cols, num_warps,
                         num_stages, interpret)

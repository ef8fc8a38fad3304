"""Randomized Hadamard transform and block fake quantization in one Pallas (Triton) kernel.

The backward GEMMs of the ``mxfp4``, ``quartet`` and ``nvfp4`` recipes rotate each bfloat16 operand
along its contraction axis (blocks of ``h`` = 64, 32 or 16, random signs) and quantize the
rotation: MXFP4 with stochastic rounding and a pre-scale, or NVFP4 (E4M3 block scales under a
tensor scale). Under XLA that is a GEMM with the ±1 matrix and the quantizer behind it: 3.0x
(last axis) and 3.4x (axis 0, the wgrad layout) the time of ``x * 2`` on an H200 for MXFP4, against
2.4x and 2.7x for this kernel (docs/benchmarks.md, 2026-12-04); for NVFP4 the two are about
even (5.7-6.3x; the float-scaled quantizer dominates). Here one program loads a ``(block_rows,
h)`` tile (or ``(h, block_rows)`` along a non-last axis) of the bfloat16 operand once
and, for each of the ``h / B`` format blocks of the Hadamard block, multiplies it by the matching
``h x B`` slice of ``diag(signs) · H`` (entries ±1, exact in bfloat16; float32 accumulation on the
tensor cores), scales by ``1/sqrt(h)``, and quantizes the block in registers
(``fake_quant.quantize_e8m0_tile`` for E8M0 scales, ``fake_quant.quantize_float_scaled_tile`` for
float ones; SR with ``qjax.stochastic_bits`` computed from the element indices), writing bfloat16:
one read and one write of two bytes per element. A format with a tensor scale (NVFP4) needs the
max |rotation| of the whole tensor first: a first pass of the same tiles writes each lane's
maximum, XLA reduces them to the tensor scale, and the second pass quantizes (two reads, one
write).

Result and reference: :func:`hadamard_fake_quant_reference` is
``prescaled_fake_quant(hadamard(x, out_dtype=float32), ...)`` (``fake_quant`` or
``qjax.quantize._split_outer_scale`` for float scales). The quantization is the same computation
bit for bit; the rotation's 16 to 128 float32 additions run in the tensor core's order rather than
XLA's GEMM's, so a rotated value (or the tensor amax) may differ in its last bit and its quantized
value then by one element step where it sits on a rounding boundary (tests: bit-identical where
every sum is exact, a bounded fraction of one-step differences on random inputs).
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
from qjax import transforms as T
from qjax.pallas.fake_quant import (_ABS, _bits, _from_bits, _u32, check_split_tensor_scale,
                                    quantize_e8m0_tile, quantize_float_scaled_tile,
                                    tensor_scale_pair)
from qjax.quantize import (_check_arguments, _split_outer_scale, check_counter_range,
                           counter_bits, fake_quant, prescaled_fake_quant, stream_words)

__all__ = ["hadamard_fake_quant_pallas", "hadamard_fake_quant_reference", "supports"]

# The fastest of block_rows 32..256 x 4/8 warps (x 1-4 Hadamard blocks per program, no gain) on
# an H200 for h = 64, and of 64..512 rows x 4/8 warps for nvfp4's h = 16 (2026-12-04,
# docs/benchmarks.md).
DEFAULT_BLOCK_ROWS = 64
DEFAULT_BLOCK_ROWS_H16 = 128
DEFAULT_NUM_WARPS = 4
MAX_HADAMARD_BLOCK = 128


def supports(fmt: F.FormatLike, hadamard_block_size: int | None) -> bool:
    """Whether the fused kernel handles ``fmt`` rotated in blocks of ``hadamard_block_size``:
    block formats with a float element and absmax scales (E8M0 as in MX, or float scales, with
    NVFP4's tensor scale), and a Hadamard block that is a power of two, a multiple of the format
    block, at least 16 (the smallest tensor-core tile) and at most ``MAX_HADAMARD_BLOCK``."""
    fmt = F.get(fmt)
    s = fmt.scaling
    if s is None or not isinstance(s.granularity, F.Block) or s.statistic != "absmax":
        return False
    h = hadamard_block_size
    return (isinstance(fmt.element, F.FloatEncoding) and h is not None
            and 16 <= h <= MAX_HADAMARD_BLOCK and h % fmt.block_size == 0 and h & (h - 1) == 0)


def hadamard_fake_quant_reference(x, fmt: F.FormatLike, *, hadamard_block_size: int,
                                  signs=None, axis: int = -1, rounding: str = "nearest",
                                  key=None, scale_mode: str = "floor", prescale: float = 1.0,
                                  out_dtype=jnp.bfloat16, split_tensor_scale: bool = False):
    """What :func:`hadamard_fake_quant_pallas` computes, in XLA: the Hadamard transform of ``x``
    in float32 (``qjax.transforms.hadamard``), then ``qjax.quantize.prescaled_fake_quant`` (E8M0
    scales) or ``qjax.fake_quant`` (float scales), or with ``split_tensor_scale`` the
    ``(elements * block scales, tensor scale)`` pair of a two-level format.

    Example:
      >>> x = jnp.arange(64.0, dtype=jnp.bfloat16).reshape(1, 64)
      >>> hadamard_fake_quant_reference(x, "mxfp4", hadamard_block_size=64).dtype
      dtype(bfloat16)
    """
    fmt = F.get(fmt)
    _check_split(fmt, prescale, split_tensor_scale)
    rotated = T.hadamard(x, axis=axis, block_size=hadamard_block_size, signs=signs,
                         out_dtype=jnp.float32)
    if fmt.scaling.scale.power_of_two:
        return prescaled_fake_quant(rotated, fmt, prescale, axis=axis, rounding=rounding,
                                    key=key, scale_mode=scale_mode, out_dtype=out_dtype)
    if split_tensor_scale:
        values, tensor_scale = _split_outer_scale(rotated, fmt, axis % x.ndim, rounding, key,
                                                  scale_mode)
        return values.astype(out_dtype), tensor_scale
    return fake_quant(rotated, fmt, axis=axis, rounding=rounding, key=key,
                      scale_mode=scale_mode).astype(out_dtype)


def _check_split(fmt: F.Format, prescale, split_tensor_scale):
    if not fmt.scaling.scale.power_of_two and prescale != 1:
        raise ValueError(f"prescale applies to E8M0-scaled formats; {fmt.name!r} has "
                         f"{fmt.scaling.scale.name} scales: use prescale=1.")
    check_split_tensor_scale(fmt, split_tensor_scale)


def _rotated_tile(x, matrix_ref, inner, cols=slice(None)):
    """The rotation of one tile, float32: ``(rows, h) @ matrix[:, cols]`` along the last axis,
    ``matrix[cols, :] @ (h, columns)`` along another (``inner`` not None). The matrix is sliced
    as a ref: Triton has no slices of register tensors."""
    if inner is None:
        return lax.dot_general(x, matrix_ref[:, cols], (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
    return lax.dot_general(matrix_ref[cols, :], x, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _amax_kernel(x_ref, matrix_ref, o_ref, *, inner, hadamard_block_size):
    """Max |rotation| (as uint32 bits: NaN-propagating) of each lane of one tile: the first pass
    of a format with a tensor scale, whose value depends on the whole rotated tensor."""
    norm = np.float32(1 / math.sqrt(hadamard_block_size))
    rotated = _rotated_tile(x_ref[...], matrix_ref, inner)
    o_ref[...] = jnp.max(_bits(rotated * norm) & _ABS, axis=1 if inner is None else 0)


def _kernel(*refs, fmt, rounding, scale_mode, prescale, length, inner, hadamard_block_size,
            split, interpret):
    """One tile: ``(block_rows, h)`` of the ``(rows, K)`` view (``inner is None``) or ``(h,
    block_rows)`` of the ``(outer, K, inner)`` view; one dot and one quantized format block per
    ``B`` columns (rows) of the rotation."""
    refs = list(refs)
    x_ref, matrix_ref, o_ref = refs.pop(0), refs.pop(0), refs.pop()
    words_ref = refs.pop(0) if rounding == "stochastic" else None
    tensor_pair = None
    if fmt.scaling.tensor_scale:
        ts_ref = refs.pop(0)
        tensor_pair = (ts_ref[0], ts_ref[1])
    h, size = hadamard_block_size, fmt.block_size
    norm = np.float32(1 / math.sqrt(h))
    x = x_ref[...]
    block_rows = x_ref.shape[0] if inner is None else x_ref.shape[1]
    lane = pl.program_id(0) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    for part in range(h // size):
        cols = slice(part * size, (part + 1) * size)
        first = pl.program_id(1) * h + part * size  # along the quantized axis
        along = _u32(first + jnp.arange(size, dtype=jnp.int32))
        rotated = _rotated_tile(x, matrix_ref, inner, cols)
        if inner is None:  # the blocks run along axis 1
            index = _u32(lane)[:, None] * np.uint32(length) + along[None, :]
            block_axis = 1
        else:  # the blocks run along axis 0
            index = ((_u32(pl.program_id(2)) * np.uint32(length) + along[:, None])
                     * np.uint32(inner) + _u32(lane)[None, :])
            block_axis = 0
        b = _bits(rotated * norm)
        amax = jnp.max(b & _ABS, axis=block_axis, keepdims=True)  # max of bits: NaN-propagating
        random_bits = None
        if words_ref is not None:
            random_bits = counter_bits(index, (words_ref[0], words_ref[1]))
        if fmt.scaling.scale.power_of_two:
            out = quantize_e8m0_tile(b, amax, fmt.element, scale_mode, rounding, prescale,
                                     random_bits)
        else:
            elements, scale, divisor = quantize_float_scaled_tile(
                b, amax, fmt, rounding, random_bits, tensor_pair, interpret=interpret)
            out = elements * (scale if split else divisor)
        out = out.astype(o_ref.dtype)
        if inner is None:
            o_ref[:, cols] = out
        else:
            o_ref[cols, :] = out


@functools.partial(jax.jit, static_argnames=(
    "fmt", "hadamard_block_size", "axis", "rounding", "scale_mode", "prescale", "out_dtype",
    "split_tensor_scale", "block_rows", "num_warps", "num_stages", "interpret"))
def _hadamard_fake_quant(x, signs, key, *, fmt, hadamard_block_size, axis, rounding, scale_mode,
                         prescale, out_dtype, split_tensor_scale, block_rows, num_warps,
                         num_stages, interpret):
    h = hadamard_block_size
    shape = x.shape
    k = shape[axis]
    # Row form as in qjax.transforms: rotated[i] = sum_j matrix[j, i] * x[j], matrix = diag(s) H.
    matrix = jnp.asarray(T._sylvester_signs(h), x.dtype)
    if signs is not None:
        matrix = matrix * signs.astype(x.dtype)[:, None]
    last = axis == len(shape) - 1
    if last:
        rows, inner = math.prod(shape[:-1]), None
        view = x.reshape(rows, k)
        lanes = rows
    else:
        rows, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
        view = x.reshape(rows, k, inner)
        lanes = inner
        matrix = matrix.T  # (B, h) slices of the rows of the transposed matrix
    padded = -(-lanes // block_rows) * block_rows
    if padded != lanes:  # the programs see whole tiles; the pad is cut off below
        pad = [(0, padded - lanes), (0, 0)] if last else [(0, 0), (0, 0), (0, padded - lanes)]
        view = jnp.pad(view, pad)
    if last:
        grid = (padded // block_rows, k // h)
        tile = pl.BlockSpec((block_rows, h), lambda i, j: (i, j))
        lane_maxima = pl.BlockSpec((None, block_rows), lambda i, j: (j, i))
        maxima_shape = (k // h, padded)
    else:
        grid = (padded // block_rows, k // h, rows)
        tile = pl.BlockSpec((None, h, block_rows), lambda i, j, o: (o, j, i))
        lane_maxima = pl.BlockSpec((None, None, block_rows), lambda i, j, o: (j, o, i))
        maxima_shape = (k // h, rows, padded)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    operands = [view, matrix]
    in_specs = [tile, pl.BlockSpec((h, h), lambda *ids: (0, 0))]
    tensor_pair = None
    if fmt.scaling.tensor_scale:  # first pass: max |rotation| of every lane of every tile
        maxima = pl.pallas_call(
            functools.partial(_amax_kernel, inner=inner, hadamard_block_size=h),
            out_shape=jax.ShapeDtypeStruct(maxima_shape, jnp.uint32),
            grid=grid, in_specs=in_specs, out_specs=lane_maxima, compiler_params=params,
            interpret=interpret, name=f"hadamard_amax_{fmt.name}",
        )(*operands)
        tensor_pair = tensor_scale_pair(_from_bits(jnp.max(maxima)), fmt)
    if rounding == "stochastic":
        check_counter_range(shape)
        operands.append(stream_words(key))
        in_specs.append(pl.BlockSpec((2,), lambda *ids: (0,)))
    if tensor_pair is not None:
        operands.append(tensor_pair)
        in_specs.append(pl.BlockSpec((2,), lambda *ids: (0,)))
    kernel = functools.partial(_kernel, fmt=fmt, rounding=rounding, scale_mode=scale_mode,
                               prescale=prescale, length=k, inner=inner, hadamard_block_size=h,
                               split=split_tensor_scale, interpret=interpret)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(view.shape, out_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=params,
        interpret=interpret,
        name=f"hadamard_fake_quant_{fmt.name}",
    )(*operands)
    if padded != lanes:
        out = out[:lanes] if last else out[:, :, :lanes]
    out = out.reshape(shape)
    if split_tensor_scale:
        return out, tensor_pair[0].reshape((1,) * len(shape))
    return out


def hadamard_fake_quant_pallas(x, fmt: F.FormatLike, *, hadamard_block_size: int, signs=None,
                               axis: int = -1, rounding: str = "nearest", key=None,
                               scale_mode: str = "floor", prescale: float = 1.0,
                               out_dtype=jnp.bfloat16, split_tensor_scale: bool = False,
                               block_rows: int | None = None,
                               num_warps: int = DEFAULT_NUM_WARPS, num_stages: int | None = None,
                               interpret: bool = False):
    """``prescaled_fake_quant(hadamard(x, ...), fmt, prescale, ...)`` of a bfloat16/float16 ``x``
    as one fused kernel (``fake_quant`` for float-scaled formats; see the module docstring for
    how it can differ from :func:`hadamard_fake_quant_reference`). A format with a tensor scale
    (NVFP4) takes two passes: the max |rotation| of every tile first, then the quantization.

    Args:
      x: bfloat16 or float16 array of rank >= 1, rotated and quantized along ``axis``, whose length
        must be a multiple of ``hadamard_block_size``.
      fmt: an E8M0-scaled block format with a float element (mxfp4, mxfp6_*, mxfp8, ...).
      hadamard_block_size: the transform's block, a power of two, multiple of the format block,
        16 to ``MAX_HADAMARD_BLOCK``.
      signs: optional ``(hadamard_block_size,)`` ±1 vector (``qjax.transforms.random_signs``).
      axis: the rotated and quantized axis.
      rounding: ``"nearest"`` or ``"stochastic"`` (needs ``key``; the bits of
        ``qjax.stochastic_bits`` at each element's index).
      key: PRNG key for stochastic rounding.
      scale_mode: ``"floor"`` or ``"rceil"``.
      prescale: scales from the rotation, elements from ``prescale`` times it (1: plain
        ``fake_quant``); E8M0-scaled formats only.
      out_dtype: the result's dtype (bfloat16 holds every MX value exactly, and NVFP4's elements
        times their block scales).
      split_tensor_scale: for a two-level format, return ``(elements * block scales, tensor
        scale)`` (the tensor scale float32 of shape ``(1,) * x.ndim``), as a GEMM multiplies
        them (``qjax.quantize._split_outer_scale``), instead of their product.
      block_rows: rows (last axis) or columns of the axes after ``axis`` per program, a power of
        two >= 16 (default ``DEFAULT_BLOCK_ROWS``, ``DEFAULT_BLOCK_ROWS_H16`` for a Hadamard block
        of 16); the array is padded to whole tiles.
      num_warps, num_stages: Triton launch parameters.
      interpret: run in the Pallas interpreter (any backend; tests on CPU).

    Returns:
      An array of ``x``'s shape and ``out_dtype`` (a pair with ``split_tensor_scale``).

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (64, 128), jnp.bfloat16)
      >>> y = hadamard_fake_quant_pallas(x, "mxfp4", hadamard_block_size=64, interpret=True)
      >>> y.shape, y.dtype
      ((64, 128), dtype(bfloat16))
    """
    fmt = F.get(fmt)
    x = jnp.asarray(x)
    if not supports(fmt, hadamard_block_size):
        raise ValueError(
            f"hadamard_fake_quant_pallas handles absmax-scaled block formats with a float element "
            f"(mxfp8, mxfp6_*, mxfp4, nvfp4) with a Hadamard block that is a power of two, a "
            f"multiple of the format block and 16 to {MAX_HADAMARD_BLOCK}; got {fmt.name!r} with "
            f"hadamard_block_size={hadamard_block_size!r}. Use hadamard_fake_quant_reference.")
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise TypeError(f"hadamard_fake_quant_pallas rotates bfloat16 or float16 inputs on the "
                        f"tensor cores, got {x.dtype}; use hadamard_fake_quant_reference.")
    _check_arguments(x, fmt, rounding, key, scale_mode)
    if not prescale > 0:
        raise ValueError(f"prescale must be a positive float, got {prescale}.")
    _check_split(fmt, prescale, split_tensor_scale)
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of shape {x.shape}.")
    axis = axis % x.ndim
    if x.shape[axis] % hadamard_block_size:
        raise ValueError(f"the rotated axis {axis} of shape {x.shape} must be a multiple of "
                         f"hadamard_block_size={hadamard_block_size}.")
    if signs is not None and jnp.shape(signs) != (hadamard_block_size,):
        raise ValueError(f"signs must have shape ({hadamard_block_size},), got "
                         f"{jnp.shape(signs)}.")
    if block_rows is None:
        block_rows = DEFAULT_BLOCK_ROWS_H16 if hadamard_block_size == 16 else DEFAULT_BLOCK_ROWS
    if block_rows < 16 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= 16, got {block_rows}.")
    if x.size == 0:
        empty = x.astype(out_dtype)
        return (empty, jnp.ones((1,) * x.ndim, jnp.float32)) if split_tensor_scale else empty
    lanes = math.prod(x.shape[:-1]) if axis == x.ndim - 1 else math.prod(x.shape[axis + 1:])
    block_rows = max(16, min(block_rows, 1 << max(lanes - 1, 0).bit_length()))
    return _hadamard_fake_quant(
        x, signs, key if rounding == "stochastic" else None, fmt=fmt,
        hadamard_block_size=hadamard_block_size, axis=axis, rounding=rounding,
        scale_mode=scale_mode, prescale=float(prescale), out_dtype=np.dtype(out_dtype),
        split_tensor_scale=split_tensor_scale, block_rows=block_rows, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret)

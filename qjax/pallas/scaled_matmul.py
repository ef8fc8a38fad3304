"""Block-scaled matmul ``C = dequantize(a) @ dequantize(b)`` as one Pallas (Triton) kernel.

Route (Hopper has no block-scaled tensor-core instruction; Triton's own ``tl.dot_scaled`` is
rewritten the same way before Blackwell, by its ``DecomposeScaledBlocked`` pass): each program
owns a ``(block_m, block_n)`` tile of ``C`` and walks K in steps of ``block_k``. Per step it loads
the element codes of an A and a B tile (one byte per element, as ``QArray`` stores them) and
their block scales, decodes the elements and multiplies them by their block scales in float32
registers, casts the scaled tiles to bfloat16 and issues a bf16 tensor-core dot
with float32 accumulation. The scales are thus applied per K-block inside the kernel, to the
operand tiles (``(block_m + block_n) * block_k`` multiplies per step) rather than to the
accumulator (``block_m * block_n`` per 16- or 32-wide K-block, which costs more than the dot).

Exactness: every element of fp4 (E2M1), fp6 (E3M2, E2M3) and fp8 (E4M3, E5M2) times a
power-of-two E8M0 scale, and every E2M1 element times an E4M3 NVFP4 scale (at most 2 + 4
significant bits), is a bf16 number as long as it lies in bf16's normal range, so the scaled tiles
are exactly the dequantized operands and the only rounding is fp32 accumulation (in the tensor
core's order, not the reference's) and the final cast. NVFP4's fp32 tensor scales and the
per-tensor fp8 scales multiply the fp32 accumulator once at the end (the reference multiplies each
element by ``block_scale * tensor_scale`` instead: a relative difference of a few float32 ulps).
Not exact: scaled values beyond bf16's normal range (an E8M0 scale below about ``2**-118`` or an
overflowing product), where the GPU may flush or round what the reference keeps.

The element decoding is integer arithmetic on float32 bit patterns (no lookup tables, no sub-byte
casts): for a code with magnitude bits ``mag`` of an ``ExMy`` element with bias ``b``, a normal
value is the float32 with bits ``(mag << (23 - y)) + ((127 - b) << 23)``, a subnormal one is
``mag * 2**(1 - b - y)``; the sign bit is or-ed in. fp8 elements stored as ``float8_e4m3fn`` /
``float8_e5m2`` use the hardware conversion.

Optional route ``mma="fp8"`` (fp8 elements only: mxfp8, mxfp8_e5m2, per-tensor fp8): the stored
fp8 tiles go to the fp8 tensor cores unconverted, one dot per 32-wide scale block; its fp32 result
is multiplied by the outer product of the two blocks' E8M0 scales (a power of two: exact) and
added to the accumulator. No decode, but ``block_m * block_n`` extra multiply-adds per block, and
Hopper's fp8 MMA does not accumulate with full fp32 precision (see :func:`scaled_matmul`).

Cost model (why this is not obviously faster than bf16 on Hopper): per ``block_k`` step the bf16
route decodes ``(block_m + block_n) * block_k`` elements on the CUDA cores (about a dozen integer
and float operations each for fp4/fp6, a few for fp8's hardware conversion) next to
``2 * block_m * block_n * block_k`` tensor-core flops. An H100 SM does roughly 50x more bf16
tensor flops than 32-bit ALU operations per clock, so with 128 x 128 tiles the decode must stay
under about 2.5 operations per element to hide behind the dot; per-element Triton code does not,
and the kernel is expected to be ALU-bound (larger tiles help in proportion to
``block_m * block_n / (block_m + block_n)``).

Block scales are expanded to the tile by a broadcast and a reshape (``(bm, bk/B) -> (bm, bk/B, B)
-> (bm, bk)``), so the code tiles stay 2-D in the layout the dot wants.

Shapes that are not multiples of the tile are zero-padded by the wrapper (zero codes with unit
scales decode to exact zeros); the padded output is cropped. Aligned shapes pay nothing.

References: OCP Microscaling Formats (MX) v1.0 specification (2023); NVIDIA, "NVFP4" two-level
scaling (E4M3 block-16 scale + FP32 tensor scale), Blackwell / Transformer Engine documentation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float

from qjax import formats as F
from qjax.quantize import QArray, dequantize

__all__ = ["scaled_matmul", "scaled_matmul_reference", "supports", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "nvfp4",
                     "fp8_e4m3", "fp8_e5m2")
DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 128
DEFAULT_BLOCK_K = 64
DEFAULT_NUM_WARPS = 8
DEFAULT_NUM_STAGES = 3
DEFAULT_GROUP_M = 8
_OUT_DTYPES = (jnp.bfloat16, jnp.float32, jnp.float16)
_MMAS = ("bf16", "fp8")
_SIGN = np.uint32(0x80000000)
_NAN = np.float32(np.nan)


# --------------------------------------------------------------------------- format analysis


def _kind(fmt: F.Format) -> str | None:
    """'block' (E8M0 or E4M3 block scales along K), 'tensor' (one fp32 scale), or None."""
    s = fmt.scaling
    if s is None or not isinstance(fmt.element, F.FloatEncoding) or fmt.element.bits > 8:
        return None
    per_tensor = isinstance(s.granularity, F.PerTensor) and s.scale.name == "fp32"
    if per_tensor and s.statistic == "absmax":
        return "tensor"
    if not isinstance(s.granularity, F.Block):
        return None
    if s.scale.power_of_two and not s.tensor_scale:
        return "block"
    grid = s.scale.float_encoding if s.scale.name in ("e4m3", "ue5m3") else None
    if grid is not None and fmt.element.mantissa_bits + grid.mantissa_bits + 2 <= 8:
        return "block"  # element x scale has <= 8 significant bits: exact in bf16 (NVFP4: 2 + 4)
    return None


def supports(fmt: F.FormatLike) -> bool:
    """Whether :func:`scaled_matmul` handles ``fmt``: float elements of at most 8 bits with E8M0
    block scales (mxfp8, mxfp8_e5m2, mxfp6_*, mxfp4, ``formats.float_format``), NVFP4 (E2M1, E4M3
    block scales, optional fp32 tensor scale), or one fp32 per-tensor scale (fp8_e4m3, fp8_e5m2)."""
    return _kind(F.get(fmt)) is not None


# --------------------------------------------------------------------------- in-kernel decoding


def _bits(x):
    return lax.bitcast_convert_type(x, jnp.uint32)


def _from_bits(b):
    return lax.bitcast_convert_type(b, jnp.float32)


def _decode_codes(codes, element: F.FloatEncoding):
    """float32 values of uint8 codes of a float element of <= 8 bits (exact; see module doc)."""
    c = codes.astype(jnp.uint32)
    e, m, bias = element.exponent_bits, element.mantissa_bits, element.bias
    mag = c & np.uint32((1 << (e + m)) - 1)
    normal = _from_bits((mag << np.uint32(23 - m)) + np.uint32((127 - bias) << 23))
    subnormal = mag.astype(jnp.int32).astype(jnp.float32) * np.float32(2.0 ** (1 - bias - m))
    value = jnp.where(mag >= np.uint32(1 << m), normal, subnormal)
    if element.specials == "fn":
        value = jnp.where(mag == np.uint32((1 << (e + m)) - 1), _NAN, value)
    elif element.specials == "ieee":
        top = np.uint32(((1 << e) - 1) << m)
        value = jnp.where(mag == top, np.float32(np.inf), jnp.where(mag > top, _NAN, value))
    if element.signed:
        sign = (c << np.uint32(31 - e - m)) & _SIGN
        value = _from_bits(_bits(value) | sign)
    return value


def _element_values(codes, element):
    """float32 element values of a loaded tile (uint8 codes, or native fp8 dtypes)."""
    if codes.dtype == jnp.uint8:
        return _decode_codes(codes, element)
    return codes.astype(jnp.float32)


def _decode_block_scales(codes, encoding: F.ScaleEncoding):
    """float32 block scales from their uint8 codes: E8M0 (2**(code - 127); 255 is NaN) or an fp8
    float encoding."""
    if encoding.power_of_two:
        c = codes.astype(jnp.uint32)
        b = jnp.where(c == 0, np.uint32(0x400000), c << np.uint32(23))  # 2**-127 is subnormal
        return jnp.where(c == np.uint32(255), _NAN, _from_bits(b))
    return _decode_codes(codes, encoding.float_encoding)


def _expand(scales, axis: int, block: int):
    """Repeats each scale ``block`` times along ``axis`` (0 or 1) of a 2-D tile."""
    rows, cols = scales.shape
    if axis == 1:
        wide = jnp.broadcast_to(scales[:, :, None], (rows, cols, block))
        return wide.reshape(rows, cols * block)
    wide = jnp.broadcast_to(scales[:, None, :], (rows, block, cols))
    return wide.reshape(rows * block, cols)


# --------------------------------------------------------------------------- kernel


def _kernel(*refs, fmt, kind, block_k, k_steps, transpose_b, has_multiplier, mma):
    refs = list(refs)
    o_ref = refs.pop()
    a_ref, b_ref = refs.pop(0), refs.pop(0)
    sa_ref = sb_ref = mult_ref = None
    if kind == "block":
        sa_ref, sb_ref = refs.pop(0), refs.pop(0)
    if has_multiplier:
        mult_ref = refs.pop(0)
    element = fmt.element
    size = fmt.block_size if kind == "block" else None
    nb = block_k // size if kind == "block" else None
    block_m, block_n = o_ref.shape

    contract = (((1,), (1,)) if transpose_b else ((1,), (0,)), ((), ()))

    def body_fp8(step, acc):
        """fp8 tensor cores on the stored fp8 codes; E8M0 scales multiply each block's partial
        product (a power of two: exact) before it joins the accumulator."""
        if kind == "tensor":
            ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
            b = b_ref[:, ks] if transpose_b else b_ref[ks, :]
            return acc + lax.dot_general(a_ref[:, ks], b, contract,
                                         preferred_element_type=jnp.float32)
        for j in range(nb):
            ks = pl.ds(pl.multiple_of(step * block_k + j * size, size), size)
            b = b_ref[:, ks] if transpose_b else b_ref[ks, :]
            part = lax.dot_general(a_ref[:, ks], b, contract, preferred_element_type=jnp.float32)
            col = pl.ds(step * nb + j, 1)
            sa = _decode_block_scales(sa_ref[:, col], fmt.scaling.scale)  # (block_m, 1)
            sb = _decode_block_scales(sb_ref[:, col] if transpose_b else sb_ref[col, :],
                                      fmt.scaling.scale).reshape(1, block_n)
            acc = acc + part * (sa * sb)
        return acc

    def body(step, acc):
        ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
        a = _element_values(a_ref[:, ks], element)
        b = _element_values(b_ref[:, ks] if transpose_b else b_ref[ks, :], element)
        if kind == "block":  # scales multiply the decoded elements in float32: exact
            ss = pl.ds(pl.multiple_of(step * nb, nb), nb)
            sa = _decode_block_scales(sa_ref[:, ss], fmt.scaling.scale)
            a = a * _expand(sa, 1, size)
            if transpose_b:
                sb = _decode_block_scales(sb_ref[:, ss], fmt.scaling.scale)
                b = b * _expand(sb, 1, size)
            else:
                sb = _decode_block_scales(sb_ref[ss, :], fmt.scaling.scale)
                b = b * _expand(sb, 0, size)
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        return acc + lax.dot_general(a, b, contract, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k_steps, body_fp8 if mma == "fp8" else body,
                        jnp.zeros((block_m, block_n), jnp.float32))
    if has_multiplier:
        acc = acc * mult_ref[0]
    o_ref[...] = acc.astype(o_ref.dtype)


# --------------------------------------------------------------------------- wrapper helpers


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _as_codes(values):
    """Element storage the kernel loads: fp8 dtypes as they are, everything else uint8 codes."""
    if values.dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.uint8):
        return values
    raise TypeError(f"scaled_matmul expects uint8 codes or fp8 element storage, got "
                    f"{values.dtype}.")


def _scale_codes(scales):
    return scales if scales.dtype == jnp.uint8 else lax.bitcast_convert_type(scales, jnp.uint8)


def _one_code(encoding: F.ScaleEncoding) -> int:
    """The uint8 code of the scale 1.0 (pads K-blocks: zero elements times 1 stay exactly zero)."""
    if encoding.power_of_two:
        return 127
    enc = encoding.float_encoding
    return enc.bias << enc.mantissa_bits


def _pad_to(x, shape, value=0):
    pads = [(0, t - n) for n, t in zip(x.shape, shape)]
    if all(p == 0 for _, p in pads):
        return x
    return jnp.pad(x, pads, constant_values=np.array(value, dtype=x.dtype) if x.dtype != jnp.uint8
                   else value)


def _grouped_ij(pid, n_i, n_j, group_m):
    """Program id -> (row tile, column tile), ``group_m`` row tiles at a time (L2 reuse)."""
    width = group_m * n_j
    group = pid // width
    first = group * group_m
    rows_in_group = jnp.minimum(n_i - first, group_m)
    within = pid % width
    return first + within % rows_in_group, within // rows_in_group


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k",
                                             "num_warps", "num_stages", "group_m", "transpose_b",
                                             "mma", "interpret"))
def _scaled_matmul_jit(a: QArray, b: QArray, *, out_dtype, block_m, block_n, block_k, num_warps,
                       num_stages, group_m, transpose_b, mma, interpret):
    fmt = a.fmt
    kind = _kind(fmt)
    m, k = a.shape
    n = b.shape[0] if transpose_b else b.shape[1]
    mp, np_, kp = (-(-m // block_m) * block_m, -(-n // block_n) * block_n,
                   -(-k // block_k) * block_k)
    a_codes = _pad_to(_as_codes(a.values), (mp, kp))
    b_codes = _pad_to(_as_codes(b.values), (np_, kp) if transpose_b else (kp, np_))
    operands = [a_codes, b_codes]
    n_i, n_j = mp // block_m, np_ // block_n

    def a_map(pid):
        return _grouped_ij(pid, n_i, n_j, group_m)[0], 0

    def b_map(pid):
        j = _grouped_ij(pid, n_i, n_j, group_m)[1]
        return (j, 0) if transpose_b else (0, j)

    def o_map(pid):
        return _grouped_ij(pid, n_i, n_j, group_m)

    in_specs = [pl.BlockSpec((block_m, kp), a_map),
                pl.BlockSpec((block_n, kp) if transpose_b else (kp, block_n), b_map)]
    multiplier = None
    if kind == "block":
        size = fmt.block_size
        one = _one_code(fmt.scaling.scale)
        sa = _pad_to(_scale_codes(a.scales), (mp, kp // size), one)
        sb = _pad_to(_scale_codes(b.scales), (np_, kp // size) if transpose_b else
                     (kp // size, np_), one)
        operands += [sa, sb]
        in_specs += [pl.BlockSpec((block_m, kp // size), a_map),
                     pl.BlockSpec((block_n, kp // size) if transpose_b else
                                  (kp // size, block_n), b_map)]
        if a.tensor_scale is not None:
            multiplier = a.tensor_scale.reshape(()) * b.tensor_scale.reshape(())
    else:
        multiplier = a.scales.reshape(()).astype(jnp.float32) * b.scales.reshape(()).astype(
            jnp.float32)
    if multiplier is not None:
        operands.append(jnp.broadcast_to(multiplier.astype(jnp.float32), (2,)))
        in_specs.append(pl.BlockSpec((2,), lambda pid: (0,)))
    kernel = functools.partial(_kernel, fmt=fmt, kind=kind, block_k=block_k,
                               k_steps=kp // block_k, transpose_b=transpose_b,
                               has_multiplier=multiplier is not None, mma=mma)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(n_i * n_j,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), o_map),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"scaled_matmul_{fmt.name}",
    )(*operands)
    if (mp, np_) != (m, n):
        out = out[:m, :n]
    return out


def _check(a, b, transpose_b, out_dtype, block_m, block_n, block_k, mma):
    if not isinstance(a, QArray) or not isinstance(b, QArray):
        raise TypeError(f"scaled_matmul takes two qjax.QArray operands (qjax.quantize), got "
                        f"{type(a).__name__} and {type(b).__name__}.")
    if a.fmt != b.fmt:
        raise ValueError(f"scaled_matmul needs both operands in one format, got {a.fmt.name!r} and "
                         f"{b.fmt.name!r}.")
    fmt = a.fmt
    if not supports(fmt):
        raise ValueError(f"scaled_matmul handles formats {', '.join(SUPPORTED_FORMATS)} (and "
                         f"custom ones of those kinds, see supports()); {fmt.name!r} is not one. "
                         f"Use scaled_matmul_reference.")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"scaled_matmul takes 2-D operands, got shapes {a.shape} and {b.shape}.")
    b_layout = "(N, K) quantized along axis -1 (transpose_b=True)" if transpose_b else \
        "(K, N) quantized along axis 0 (qjax.quantize(w, fmt, axis=0))"
    if a.axis != -1:
        raise ValueError(f"a must be (M, K) quantized along its last axis (the contraction "
                         f"axis), got axis {a.axis}.")
    if b.axis != (-1 if transpose_b else -2):
        raise ValueError(f"b must be {b_layout}; got axis {b.axis}. Pass transpose_b="
                         f"{not transpose_b} if b is laid out the other way.")
    k_b = b.shape[1] if transpose_b else b.shape[0]
    if a.shape[1] != k_b:
        raise ValueError(f"contraction lengths differ: a is {a.shape}, b is {b.shape} "
                         f"(b layout {b_layout}).")
    if a.block_shape is not None and fmt.block_size is not None:
        want_b = (1, fmt.block_size) if transpose_b else (fmt.block_size, 1)
        if tuple(a.block_shape[-2:]) != (1, fmt.block_size) or tuple(b.block_shape[-2:]) != want_b:
            raise ValueError(f"scale blocks must be 1x{fmt.block_size} along K; got "
                             f"{a.block_shape} (a) and {b.block_shape} (b).")
    if mma not in _MMAS:
        raise ValueError(f"unknown mma {mma!r}; valid: {', '.join(_MMAS)}.")
    if mma == "fp8" and (fmt.element not in (F.E4M3_ELEM, F.E5M2_ELEM)
                         or not (fmt.scaling.scale.power_of_two or _kind(fmt) == "tensor")):
        raise ValueError(f"mma='fp8' feeds the stored fp8 elements to the tensor cores: it needs "
                         f"fp8 elements with E8M0 block scales or a per-tensor scale (mxfp8, "
                         f"mxfp8_e5m2, fp8_e4m3, fp8_e5m2); {fmt.name!r} is not one. Use "
                         f"mma='bf16'.")
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in _OUT_DTYPES]:
        raise ValueError(f"out_dtype must be bfloat16, float32 or float16, got {out_dtype}.")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if not _is_power_of_two(v) or v < 16:
            raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles), got {v}.")
    if fmt.block_size is not None and block_k % fmt.block_size:
        raise ValueError(f"block_k must be a multiple of the format's block size "
                         f"{fmt.block_size} ({fmt.name}), got {block_k}.")


def scaled_matmul(a: QArray, b: QArray, *, out_dtype=jnp.bfloat16,
                  block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
                  block_k: int = DEFAULT_BLOCK_K, num_warps: int = DEFAULT_NUM_WARPS,
                  num_stages: int = DEFAULT_NUM_STAGES, group_m: int = DEFAULT_GROUP_M,
                  transpose_b: bool = False, mma: str = "bf16",
                  interpret: bool = False) -> Float[Array, "m n"]:
    """``dequantize(a) @ dequantize(b)`` with fp32 accumulation, as one Pallas (Triton) kernel.

    The block scales are applied per K-block inside the kernel to the decoded operand tiles, which
    are exact in bf16 (module docstring), and fed to bf16 tensor cores with fp32 accumulation.

    Args:
      a: ``(M, K)`` QArray quantized along its last axis (``qjax.quantize(x, fmt)``).
      b: ``(K, N)`` QArray quantized along axis 0 (``qjax.quantize(w, fmt, axis=0)``); with
        ``transpose_b=True`` an ``(N, K)`` QArray quantized along its last axis, and the result is
        ``dequantize(a) @ dequantize(b).T``.
      out_dtype: bfloat16 (default), float32 or float16.
      block_m, block_n, block_k: tile sizes, powers of two >= 16; ``block_k`` a multiple of the
        format's block size. ``block_m``/``block_n`` are capped at the (power-of-two rounded) M/N.
      num_warps, num_stages, group_m: Triton launch parameters and the number of row tiles swept
        together (L2 reuse).
      transpose_b: b's layout, see ``b``.
      mma: ``"bf16"`` (default; every format, exact operands, fp32 accumulation) or ``"fp8"``
        (mxfp8, mxfp8_e5m2, fp8_e4m3, fp8_e5m2 only): the stored fp8 elements go to the fp8
        tensor cores unconverted, one ``format block``-deep dot per block whose fp32 result is
        multiplied by the product of the two E8M0 scales (exact) and added to the accumulator.
        Products are exact, but Hopper's fp8 MMA accumulates with fewer than fp32's bits (about
        14, DeepSeek-V3 technical report, arXiv:2412.19437, section 3.3.2): within each block
        for MX formats, over each ``block_k`` step for per-tensor fp8.
      interpret: run in the Pallas interpreter (any backend; CPU tests).

    Returns:
      ``(M, N)`` array of ``out_dtype``.

    Example:
      >>> a = qjax.quantize(x, "mxfp4")               # x: (M, K)
      >>> b = qjax.quantize(w, "mxfp4", axis=0)       # w: (K, N)
      >>> c = scaled_matmul(a, b)                     # ~= x_q @ w_q, bf16
    """
    _check(a, b, transpose_b, out_dtype, block_m, block_n, block_k, mma)
    m = a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    if m == 0 or n == 0 or a.shape[1] == 0:
        return jnp.zeros((m, n), out_dtype)
    block_m = min(block_m, max(16, _next_power_of_two(m)))
    block_n = min(block_n, max(16, _next_power_of_two(n)))
    return _scaled_matmul_jit(a, b, out_dtype=jnp.dtype(out_dtype), block_m=block_m,
                              block_n=block_n, block_k=block_k, num_warps=num_warps,
                              num_stages=num_stages, group_m=group_m, transpose_b=transpose_b,
                              mma=mma, interpret=interpret)


def scaled_matmul_reference(a: QArray, b: QArray, out_dtype=jnp.bfloat16, *,
                            transpose_b: bool = False) -> Float[Array, "m n"]:
    """The plain-JAX meaning of :func:`scaled_matmul`: dequantize both operands to float32 and
    multiply in float32 (``Precision.HIGHEST``), then cast.

    Args:
      a: ``(M, K)`` QArray.
      b: ``(K, N)`` QArray, or ``(N, K)`` with ``transpose_b=True``.
      out_dtype: output dtype.
      transpose_b: as in :func:`scaled_matmul`.

    Returns:
      ``(M, N)`` array of ``out_dtype``.

    Example:
      >>> c = scaled_matmul_reference(qjax.quantize(x, "nvfp4"), qjax.quantize(w, "nvfp4", axis=0))
    """
    x = dequantize(a, jnp.float32)
    w = dequantize(b, jnp.float32)
    if transpose_b:
        w = w.T
    return jnp.matmul(x, w, precision=lax.Precision.HIGHEST).astype(out_dtype)

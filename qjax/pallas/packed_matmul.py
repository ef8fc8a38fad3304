"""Small-M matmul with a packed 4-bit weight: ``y = x @ W`` reading W once, as one Pallas kernel.

For decode and rollout shapes (``M <= 128``) a matmul is memory-bound: its time is the time to
read the weight. Stored as 4-bit elements plus block scales the weight is ~3.8x smaller than in
bf16, so a kernel that reads the packed bytes and decodes them in registers can be ~3.8x faster
than XLA's bf16 ``dot`` -- if the decode keeps up with memory. This module holds that kernel for
three formats whose elements have at most 3 magnitude bits and a sign:

* MXFP4: E2M1 elements, one E8M0 (power of two) scale per 32 along K;
* NVFP4: E2M1 elements, one E4M3 scale per 16 along K, times one fp32 tensor scale;
* INT4 with group scales: symmetric int4 (-7..7), one bf16 / fp32 scale per group of 16, 32, 64 or
  128 along K (``"int4"`` is groups of 32 with bf16 scales; build others with
  ``dataclasses.replace``, see :func:`supports`).

**Weight layout** (:class:`PackedWeight`, made once at load time by :func:`pack_weight` from the
``QArray`` / ``PackedQArray`` of ``qjax.quantize(w, fmt, axis=0)``; :meth:`PackedWeight.unpack`
gives that ``QArray`` back exactly). K is zero-padded to ``Kp`` (a multiple of ``k_multiple``) and
split in two halves; byte ``data[r, n]`` holds the code of ``W[r, n]`` in its low nibble and the
code of ``W[r + Kp/2, n]`` in its high nibble. Codes are sign-magnitude: bit 3 the sign, bits 0-2
an index into the element's eight magnitudes (E2M1: the E2M1 code itself; int4: ``|q|``; symmetric
int4 never holds -8). So one ``(rows, block_n)`` load of bytes yields two K-slices of W whose
activations are two plain, contiguous column ranges of ``x`` -- no interleaving in the kernel.
N stays the contiguous axis (coalesced loads along N). ``scales`` is ``(Kp / G, N)``: uint8 codes
for E8M0 / E4M3, bf16 or fp32 values for int4, padded groups hold the scale 1.

**Kernel** (``method="dot"``): a program owns ``block_n`` columns and ``block_m >= 16`` rows of
``x`` (the wrapper zero-pads M to whole tiles and the weight's N is padded at pack time, so no load
or store is masked) and walks its K range (all of it, or ``1 / split_k`` of it) in steps of
``block_k`` (``block_k / 2`` byte rows). Two ways to apply the group scales:

* ``scale_mode="weight"`` (default for E2M1): the step's bytes are loaded as ``(groups, G,
  block_n)``, decoded to bf16, multiplied by their ``(groups, 1, block_n)`` scales in fp32 and
  rounded back to bf16 -- exact, since an E2M1 value times an E8M0 or E4M3 scale has at most 6
  significant bits -- then reshaped to ``(block_k / 2, block_n)``: one bf16 tensor-core dot per
  half and step. NVFP4's tensor scale multiplies the fp32 result.
* ``scale_mode="acc"`` (int4, any format): per group, ``(x_g @ w_g) * s_g`` is added to the fp32
  accumulator, the dot taking the unscaled elements. This keeps INT4 exact (an int4 value times a
  bf16 scale has up to 11 significant bits, more than bf16 holds) at ``block_m / G`` extra FMAs
  per weight element and one small dot per group.

With ``split_k > 1`` the programs of one column tile write fp32 partial sums that XLA adds.

``method="vector"`` (M = 1 only) skips the tensor cores: it accumulates ``w * (x * s)`` in an fp32
``(G, block_n)`` register tile with FMAs and reduces it over G at the end.

**Decoding** (``decode="asm"``, the default when compiling for the GPU): an inline-PTX routine
turns four packed bytes (eight codes) into four bf16x2 registers with 20 integer instructions:
``prmt`` (byte permute) looks the eight 3-bit magnitudes up in a byte table of the element's bf16
high and low bytes, two more ``prmt`` interleave them into bf16 pairs, and the sign bit is copied
by a ``prmt`` in sign-replicate mode plus a ``lop3``. ``decode="bits"`` decodes with plain integer
and float operations (``scaled_matmul._decode_codes``); it is what the Pallas interpreter runs, and
the PTX routine is also executed by a NumPy model of ``prmt`` in the tests (:func:`emulate_decode`)
against it.

Exactness: every decoded element is exact in bf16 and every product ``x * element`` is exact in
fp32, so the kernel computes the reference's sum in another order: group partial sums, each
rounded once by its scale product, then accumulated in fp32; the tests bound the difference by the
fp32 summation error. As in ``scaled_matmul``, an E8M0 scale below ``2**-126`` or a product that
leaves fp32's range is outside that statement.

Measured (H100, ``benchmarks/packed_matmul.py``): at M <= 16 the kernel runs at 1.0-1.25x the
speed of XLA's bf16 ``dot`` (22-31% of copy bandwidth), not the ~3.8x the bytes allow; it is bound
by instructions, not memory: the time hardly changes with the decode (the bits decode is only
~25% slower than the 2.5-instruction PTX one) and scales with the element count, about 12-25
instructions per weight element in all -- the decoded tile's trip through shared memory into the
MMA operand layout, the fp32 scaling and the conversions around it. Reaching the memory floor
needs a decode that writes the MMA operand registers directly (no layout conversion), which
Pallas' Triton backend does not expose.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float

from qjax import formats as F
from qjax.pallas.scaled_matmul import _decode_block_scales, _decode_codes
from qjax.quantize import PackedQArray, QArray, arrays_nbytes, dequantize

__all__ = ["PackedWeight", "pack_weight", "packed_matmul", "packed_matmul_reference",
           "supports", "SUPPORTED_FORMATS", "emulate_decode"]

SUPPORTED_FORMATS = ("mxfp4", "nvfp4", "int4")
DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_K = 256
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
DEFAULT_K_MULTIPLE = 256
DEFAULT_N_MULTIPLE = 64
_GROUP_SIZES = (16, 32, 64, 128)
_METHODS = ("dot", "vector")
_SCALE_MODES = ("auto", "weight", "acc")
_DECODES = ("auto", "asm", "asm_split", "bits")
_OUT_DTYPES = (jnp.bfloat16, jnp.float32)


# --------------------------------------------------------------------------- formats


def _element_kind(fmt: F.Format) -> str | None:
    """'e2m1' (MXFP4, NVFP4 and other E2M1 block formats with 8-bit float scales), 'int4'
    (symmetric int4 with bf16/fp32 group scales), or None."""
    s = fmt.scaling
    if s is None or not isinstance(s.granularity, F.Block) or s.statistic != "absmax":
        return None
    if s.granularity.size not in _GROUP_SIZES:
        return None
    if fmt.element == F.E2M1_ELEM:
        if s.scale.power_of_two and not s.tensor_scale:
            return "e2m1"
        if s.scale.name == "e4m3":
            return "e2m1"
        return None
    if fmt.element == F.IntEncoding(4) and s.scale.name in ("bf16", "fp32") and not s.tensor_scale:
        return "int4"
    return None


def supports(fmt: F.FormatLike) -> bool:
    """Whether :func:`packed_matmul` handles ``fmt``: E2M1 elements with E8M0 block scales (mxfp4)
    or E4M3 block scales and an optional fp32 tensor scale (nvfp4), or symmetric int4 with bf16 or
    fp32 group scales (int4); blocks of 16, 32, 64 or 128 along K.

    Example:
      >>> supports("nvfp4"), supports("mxfp8")
      (True, False)
      >>> int4 = F.get("int4")
      >>> int4_g128 = dataclasses.replace(int4, name="int4_g128", scaling=dataclasses.replace(
      ...     int4.scaling, granularity=F.Block(128)))
      >>> supports(int4_g128)
      True
    """
    return _element_kind(F.get(fmt)) is not None


def _unsupported(fmt: F.Format) -> ValueError:
    return ValueError(
        f"packed_matmul handles formats {', '.join(SUPPORTED_FORMATS)} (E2M1 with E8M0 or E4M3 "
        f"block scales, symmetric int4 with bf16/fp32 group scales; blocks of "
        f"{', '.join(map(str, _GROUP_SIZES))} along K); {fmt.name!r} is not one. Use "
        f"qjax.dequantize and a dense matmul.")


# --------------------------------------------------------------------------- weight layout


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _scale_one(scales):
    """The stored scale 1.0 in ``scales``' representation (for padded groups)."""
    if scales.dtype == jnp.float8_e8m0fnu:
        return 127
    if scales.dtype == jnp.float8_e4m3fn:
        return 0x38
    return 1.0


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("data", "scales", "tensor_scale"),
                   meta_fields=("fmt", "k", "n", "dtype"))
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A ``(K, N)`` weight quantized along K, in the layout :func:`packed_matmul` reads.

    Attributes:
      data: uint8 ``(Kp / 2, Np)`` (N zero-padded to ``Np``): byte ``[r, n]`` holds the 4-bit
        sign-magnitude code of ``W[r, n]`` (low nibble) and of ``W[r + Kp / 2, n]`` (high
        nibble); rows ``>= K`` and columns ``>= N`` are zero codes. Bit 3 of a code is the
        sign, bits 0-2 the magnitude index (E2M1: its code; int4: ``|q|``).
      scales: ``(Kp / G, Np)`` group scales along K: uint8 codes for E8M0 / E4M3 scales, bf16 or
        fp32 values for int4; groups past K and columns past N hold the scale 1.
      tensor_scale: fp32 ``(1,)`` second-level scale (NVFP4) or None.
      fmt: the format (static).
      k, n: the logical weight shape (static).
      dtype: the dtype the weight was quantized from (``unpack().dtype``).

    Example:
      >>> pw = pack_weight(qjax.quantize(w, "mxfp4", axis=0))    # w: (K, N)
      >>> bool(jnp.all(pw.dequantize() == qjax.dequantize(qjax.quantize(w, "mxfp4", axis=0))))
      True
    """

    data: Array
    scales: Array
    tensor_scale: Array | None
    fmt: F.Format
    k: int
    n: int
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)

    @property
    def group_size(self) -> int:
        return self.fmt.block_size

    @property
    def k_padded(self) -> int:
        return 2 * self.data.shape[0]

    @property
    def n_padded(self) -> int:
        return self.data.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight: packed elements, scales and tensor scale."""
        return arrays_nbytes(self.data, self.scales, self.tensor_scale)

    def unpack(self) -> QArray:
        """The ``QArray`` this was packed from (``qjax.quantize(w, fmt, axis=0)``), exactly."""
        return _unpack_weight(self)

    def dequantize(self, dtype=None) -> Array:
        """``qjax.dequantize(self.unpack(), dtype)``."""
        return dequantize(self.unpack(), dtype)


def pack_weight(w: QArray | PackedQArray, *, k_multiple: int = DEFAULT_K_MULTIPLE,
                n_multiple: int = DEFAULT_N_MULTIPLE) -> PackedWeight:
    """Converts a quantized ``(K, N)`` weight to the layout :func:`packed_matmul` reads (once, at
    load time).

    Args:
      w: ``qjax.quantize(w, fmt, axis=0)`` of a ``(K, N)`` weight (or its ``.pack()``), ``fmt`` one
        of :data:`SUPPORTED_FORMATS` or a format :func:`supports` accepts.
      k_multiple: K is zero-padded to a multiple of this power of two (at least twice the group
        size). :func:`packed_matmul` needs ``block_k`` to divide the padded K (``/ split_k``); it
        shrinks ``block_k`` where it does not.
      n_multiple: N is zero-padded to a multiple of this power of two; ``block_n`` is shrunk to
        divide the padded N (so the kernel never masks: 256 lets every ``block_n`` run).

    Returns:
      A :class:`PackedWeight`; ``pack_weight(q).unpack()`` equals ``q`` leaf for leaf.

    Example:
      >>> pw = pack_weight(qjax.quantize(w, "nvfp4", axis=0))
      >>> pw.data.shape, pw.data.dtype                          # (K / 2, N) for K % 256 == 0
      ((2048, 1024), dtype('uint8'))
    """
    if isinstance(w, PackedQArray):
        w = w.unpack()
    if not isinstance(w, QArray):
        raise ValueError(f"pack_weight takes the qjax.QArray (or PackedQArray) of "
                         f"qjax.quantize(w, fmt, axis=0); got {type(w).__name__}.")
    fmt = w.fmt
    kind = _element_kind(fmt)
    if kind is None:
        raise _unsupported(fmt)
    if w.ndim != 2 or w.axis != -2:
        raise ValueError(f"pack_weight needs a 2-D (K, N) weight quantized along K (axis 0: "
                         f"qjax.quantize(w, fmt, axis=0)); got shape {w.shape}, axis {w.axis}.")
    size = fmt.block_size
    if tuple(w.block_shape) != (size, 1):
        raise ValueError(f"scale blocks must be {size}x1 along K; got {w.block_shape}.")
    for name, v in (("k_multiple", k_multiple), ("n_multiple", n_multiple)):
        if not _is_power_of_two(v):
            raise ValueError(f"{name} must be a power of two, got {v}.")
    return _pack_weight_jit(w, max(k_multiple, 2 * size), max(n_multiple, 16), kind)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _pack_weight_jit(w: QArray, unit: int, n_unit: int, kind: str) -> PackedWeight:
    k, n = w.shape
    size = w.fmt.block_size
    kp = -(-k // unit) * unit
    np_ = -(-n // n_unit) * n_unit
    if kind == "e2m1":
        codes = w.values.astype(jnp.uint8)  # E2M1 codes are sign-magnitude already
    else:
        q = w.values.astype(jnp.int32)
        codes = (jnp.abs(q) | jnp.where(q < 0, 8, 0)).astype(jnp.uint8)
    codes = jnp.pad(codes, [(0, kp - k), (0, np_ - n)])
    half = kp // 2
    data = codes[:half] | (codes[half:] << 4)
    scales = w.scales
    one = _scale_one(scales)
    if scales.dtype in (jnp.float8_e8m0fnu, jnp.float8_e4m3fn):
        scales = lax.bitcast_convert_type(scales, jnp.uint8)
    scales = jnp.pad(scales, [(0, kp // size - scales.shape[0]), (0, np_ - n)],
                     constant_values=np.array(one, scales.dtype))
    tensor_scale = None if w.tensor_scale is None else \
        w.tensor_scale.reshape(1).astype(jnp.float32)
    return PackedWeight(data, scales, tensor_scale, w.fmt, k, n, w.dtype)


@jax.jit
def _unpack_weight(pw: PackedWeight) -> QArray:
    fmt = pw.fmt
    size = fmt.block_size
    codes = jnp.concatenate([pw.data & 0xF, pw.data >> 4], axis=0)[:pw.k, :pw.n]
    if _element_kind(fmt) == "e2m1":
        values = codes
    else:
        magnitude = (codes & 7).astype(jnp.int8)
        values = jnp.where((codes & 8) != 0, -magnitude, magnitude)
    scales = pw.scales[: -(-pw.k // size), :pw.n]
    if fmt.scaling.scale.power_of_two:
        scales = lax.bitcast_convert_type(scales, jnp.float8_e8m0fnu)
    elif fmt.scaling.scale.name == "e4m3":
        scales = lax.bitcast_convert_type(scales, jnp.float8_e4m3fn)
    tensor_scale = None if pw.tensor_scale is None else pw.tensor_scale.reshape(1, 1)
    return QArray(values, scales, tensor_scale, fmt, -2, (size, 1), pw.dtype)


# --------------------------------------------------------------------------- decoding


def _magnitudes(kind: str) -> np.ndarray:
    """bf16 bit patterns of the eight magnitudes a 3-bit index selects."""
    values = [0, 0.5, 1, 1.5, 2, 3, 4, 6] if kind == "e2m1" else list(range(8))
    return np.asarray(values, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def _decode_program(kind: str, part: str = "both"):
    """The PTX decode routine as a list of ``(op, dst, *sources)``: :func:`_ptx` prints it,
    :func:`emulate_decode` runs it. Four packed bytes in, bf16x2 registers out, element ``i`` of a
    register pair being the nibble of byte ``i``.

    ``part="both"``: outputs ``$0, $1`` the low nibbles, ``$2, $3`` the high nibbles, input ``$4``
    (20 instructions for 8 codes). ``"low"`` / ``"high"``: outputs ``$0, $1``, input ``$2`` (14
    instructions for 4 codes; for JAX versions whose inline-asm op has one output).
    """
    table = _magnitudes(kind).astype(np.uint32)
    high, low = table >> 8, table & 0xFF

    def word(bytes4):
        return int(sum(int(b) << (8 * i) for i, b in enumerate(bytes4)))

    program = [
        # The input is copied first: an output may be given the input's register.
        ("mov", "r", "$4" if part == "both" else "$2"),
        ("mov", "ha", word(high[:4])), ("mov", "hb", word(high[4:])),
        ("mov", "la", word(low[:4])), ("mov", "lb", word(low[4:])),
        ("shl", "t", "r", 4),  # the msb of byte i of t is the sign of low nibble i
    ]
    if part == "both":
        # prmt selectors are nibbles: (lo0, hi0, lo1, hi1) magnitudes, then (lo2, hi2, lo3, hi3)
        program += [("and", "s0", "r", 0x7777), ("shr", "s1", "r", 16),
                    ("and", "s1", "s1", 0x7777)]
        pairs = (("s0", "0", (("$0", 0x6240, 0x9888), ("$2", 0x7351, 0xDCCC))),
                 ("s1", "1", (("$1", 0x6240, 0xBAAA), ("$3", 0x7351, 0xFEEE))))
    else:  # selectors (c0, 0, c1, 0) of the two codes of one nibble in bytes 0-1, then 2-3
        shift = 0 if part == "low" else 4
        program += [("shr", "s0", "r", shift), ("and", "s0", "s0", 0x0707),
                    ("shr", "s1", "r", 16 + shift), ("and", "s1", "s1", 0x0707)]
        signs = (0x9888, 0xBAAA) if part == "low" else (0xDCCC, 0xFEEE)
        pairs = (("s0", "0", (("$0", 0x6240, signs[0]),)),
                 ("s1", "1", (("$1", 0x6240, signs[1]),)))
    for selector, i, outputs in pairs:
        program += [("prmt", "h" + i, "ha", "hb", selector),  # table high bytes of the codes
                    ("prmt", "l" + i, "la", "lb", selector)]  # table low bytes
        for out, interleave, sign in outputs:
            program += [
                ("prmt", out, "l" + i, "h" + i, interleave),  # (low byte, high byte) x 2: bf16x2
                # sign-replicate selectors give 0xFF/0x00 bytes from each code's sign bit
                ("prmt", "m", "t", "r", sign), ("orand", out, out, "m", 0x80008000)]
    return program


def _ptx(program) -> str:
    def operand(v):
        if isinstance(v, int):
            return f"{v:#x}"
        return v if v.startswith("$") else "pk_" + v

    names = sorted({operand(d) for _, d, *_ in program if not d.startswith("$")})
    lines = ["{", f".reg .b32 {', '.join(names)};"]
    for op, dst, *src in program:
        dst, src = operand(dst), [operand(v) for v in src]
        if op == "orand":  # dst = a | (b & c): lop3 with truth table 0xF0 | (0xCC & 0xAA)
            lines.append(f"lop3.b32 {dst}, {src[0]}, {src[1]}, {src[2]}, 0xF8;")
        else:
            lines.append(f"{op}.b32 {dst}, {', '.join(src)};")
    lines.append("}")
    return "\n".join(lines)


def _prmt(a, b, selector):
    """PTX ``prmt.b32`` (default mode) on NumPy uint32 arrays."""
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for j in range(4):
        nibble = (selector >> (4 * j)) & 0xF
        index = nibble & 7
        byte = np.choose(index, source) if np.ndim(index) else source[int(index)]
        if np.ndim(nibble) == 0 and nibble & 8:
            byte = np.where(byte & 0x80, np.uint32(0xFF), np.uint32(0))
        out = out | (byte.astype(np.uint32) << np.uint32(8 * j))
    return out


def _run_program(program, words):
    regs = {"$4": words, "$2": words}
    for op, dst, *src in program:
        v = [regs[a] if isinstance(a, str) else np.uint32(a) for a in src]
        if op == "mov":
            regs[dst] = np.broadcast_to(v[0], words.shape).astype(np.uint32)
        elif op == "and":
            regs[dst] = v[0] & v[1]
        elif op == "shr":
            regs[dst] = v[0] >> v[1]
        elif op == "shl":
            regs[dst] = (v[0] << v[1]) & np.uint32(0xFFFFFFFF)
        elif op == "prmt":
            regs[dst] = _prmt(v[0], v[1], int(src[2]) if isinstance(src[2], int) else v[2])
        elif op == "orand":
            regs[dst] = v[0] | (v[1] & v[2])
        else:
            raise AssertionError(op)
    return regs


def emulate_decode(packed: np.ndarray, kind: str, part: str = "both"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Runs the PTX decode routine of ``decode="asm"`` (``part="both"``) or of
    ``decode="asm_split"`` (``part="split"``: the ``"low"`` and ``"high"`` routines) in NumPy, with
    a model of ``prmt``, ``lop3`` and the shifts, for tests without a GPU.

    Args:
      packed: uint8 array whose size is a multiple of 4 (packed bytes, low nibble first).
      kind: ``"e2m1"`` or ``"int4"``.
      part: ``"both"`` or ``"split"``.

    Returns:
      ``(low, high)``: the bf16 bit patterns (uint16) of the low and high nibbles, shaped like
      ``packed``.
    """
    words = np.ascontiguousarray(packed, np.uint8).reshape(-1, 4).view("<u4")[:, 0]
    words = words.astype(np.uint32)

    def halves(regs, a, b):
        pair = np.stack([regs[a], regs[b]], -1).astype("<u4")
        return pair.view("<u2").reshape(packed.shape)

    if part == "both":
        regs = _run_program(_decode_program(kind), words)
        return halves(regs, "$0", "$1"), halves(regs, "$2", "$3")
    low = _run_program(_decode_program(kind, "low"), words)
    high = _run_program(_decode_program(kind, "high"), words)
    return halves(low, "$0", "$1"), halves(high, "$0", "$1")


def _make_two_output_asm():
    """A copy of Pallas' ``elementwise_inline_asm`` primitive whose Triton lowering returns each
    result of a multi-result asm op (JAX 0.12's returns their list as one value). Uses JAX
    internals; None where they differ, and ``decode="asm"`` then runs the split routines."""
    try:
        from jax._src import core as jax_core
        from jax._src.pallas.triton import lowering as triton_lowering
        from jax._src.pallas.triton import primitives as triton_primitives

        base_rule = triton_lowering.triton_lowering_rules[
            triton_primitives.elementwise_inline_asm_p]
    except (ImportError, AttributeError, KeyError):
        return None
    primitive = jax_core.Primitive("qjax_packed_decode_asm")
    primitive.multiple_results = True

    @primitive.def_abstract_eval
    def _abstract_eval(*avals, result_shape_dtypes, **_):
        return [jax_core.ShapedArray(r.shape, r.dtype) for r in result_shape_dtypes]

    def _lowering(ctx, *args, **params):
        results = base_rule(ctx, *args, **params)
        if len(results) == 1 and len(ctx.avals_out) > 1:
            results = list(results[0])
        return results

    triton_lowering.register_lowering(primitive)(_lowering)
    return primitive


_TWO_OUTPUT_ASM = _make_two_output_asm()


def _decode_asm(packed, kind):
    shape = jax.ShapeDtypeStruct(packed.shape, jnp.bfloat16)
    if _TWO_OUTPUT_ASM is not None:
        low, high = _TWO_OUTPUT_ASM.bind(
            packed, asm=_ptx(_decode_program(kind)), constraints="=r,=r,=r,=r,r", pack=4,
            result_shape_dtypes=(shape, shape))
        return low, high
    return _decode_asm_split(packed, kind)


def _decode_asm_split(packed, kind):
    out = []
    for part in ("low", "high"):
        (value,) = pltriton.elementwise_inline_asm(
            _ptx(_decode_program(kind, part)), args=[packed], constraints="=r,=r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, jnp.bfloat16)])
        out.append(value)
    return tuple(out)


def _code_values(codes, kind):
    """float32 values of 4-bit sign-magnitude codes (uint32)."""
    if kind == "e2m1":
        return _decode_codes(codes, F.E2M1_ELEM)
    magnitude = (codes & np.uint32(7)).astype(jnp.int32).astype(jnp.float32)
    sign = (codes & np.uint32(8)) << np.uint32(28)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(magnitude, jnp.uint32) | sign,
                                    jnp.float32)


def _decode_bits(packed, kind):
    p = packed.astype(jnp.uint32)
    low = _code_values(p & np.uint32(0xF), kind)
    high = _code_values(p >> np.uint32(4), kind)
    return low.astype(jnp.bfloat16), high.astype(jnp.bfloat16)


# --------------------------------------------------------------------------- kernel


def _kernel(*refs, kind, scale_encoding, has_tensor_scale, method, scale_mode, decode, group,
            rows_per_split, rows_per_step, steps, half):
    refs = list(refs)
    o_ref = refs.pop()
    x_ref, w_ref, s_ref = refs[:3]
    t_ref = refs[3] if has_tensor_scale else None
    split = pl.program_id(2)
    groups_per_step = rows_per_step // group
    first_group = split * (rows_per_split // group)
    half_groups = half // group
    block_n = w_ref.shape[-1]
    decoder = {"asm": _decode_asm, "asm_split": _decode_asm_split, "bits": _decode_bits}[decode]

    def scales(codes, tensor_scale):
        if scale_encoding.name in ("bf16", "fp32"):
            s = codes.astype(jnp.float32)
        else:
            s = _decode_block_scales(codes, scale_encoding)
        return s * t_ref[0] if tensor_scale else s

    def body_acc(step, acc):
        """Scales on the fp32 partial product of each group (exact for every format)."""
        for j in range(groups_per_step):
            g = first_group + step * groups_per_step + j
            low, high = decoder(w_ref[pl.ds(pl.multiple_of(g * group, group), group), :], kind)
            for g_x, w in ((g, low), (g + half_groups, high)):
                cols = pl.ds(pl.multiple_of(g_x * group, group), group)
                s = scales(s_ref[pl.ds(g_x, 1), :], has_tensor_scale)  # (1, block_n)
                if method == "dot":
                    part = jnp.dot(x_ref[:, cols], w, preferred_element_type=jnp.float32)
                    acc = acc + part * s
                else:  # x is (Kp, 1): one activation per row of the weight tile
                    acc = acc + w.astype(jnp.float32) * (x_ref[cols, :].astype(jnp.float32) * s)
        return acc

    def body_weight(step, acc):
        """Scales on the decoded (groups, group, block_n) weight tile, exact in bf16 for E2M1
        elements; one dot per half and step. The tensor scale multiplies the result."""
        g = first_group + step * groups_per_step
        low, high = decoder(w_ref[pl.ds(g, groups_per_step), :, :], kind)
        for g_x, w in ((g, low), (g + half_groups, high)):
            s = scales(s_ref[pl.ds(g_x, groups_per_step), :, :], False)  # (groups, 1, block_n)
            w = (w.astype(jnp.float32) * s).astype(jnp.bfloat16).reshape(rows_per_step, block_n)
            cols = pl.ds(pl.multiple_of(g_x * group, group), rows_per_step)
            if method == "dot":
                acc = acc + jnp.dot(x_ref[:, cols], w, preferred_element_type=jnp.float32)
            else:
                acc = acc + w.astype(jnp.float32) * x_ref[cols, :].astype(jnp.float32)
        return acc

    rows = x_ref.shape[0] if method == "dot" else (group if scale_mode == "acc" else
                                                   rows_per_step)
    acc = lax.fori_loop(0, steps, body_acc if scale_mode == "acc" else body_weight,
                        jnp.zeros((rows, block_n), jnp.float32))
    if method == "vector":
        acc = jnp.sum(acc, axis=0, keepdims=True)
    if scale_mode == "weight" and has_tensor_scale:
        acc = acc * t_ref[0]
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k",
                                             "split_k", "num_warps", "num_stages", "method",
                                             "scale_mode", "decode", "interpret"))
def _packed_matmul_jit(x, w: PackedWeight, *, out_dtype, block_m, block_n, block_k, split_k,
                       num_warps, num_stages, method, scale_mode, decode, interpret):
    fmt = w.fmt
    kind = _element_kind(fmt)
    group = fmt.block_size
    m = x.shape[0]
    np_, kp = w.n_padded, w.k_padded
    half = kp // 2
    # Rows padded to whole tiles (zeros): the kernel never masks a load or a store.
    mp = m if method == "vector" else -(-m // block_m) * block_m
    x = x.astype(jnp.bfloat16)
    if x.shape != (mp, kp):
        x = jnp.pad(x, [(0, mp - m), (0, kp - x.shape[1])])
    rows_per_split = half // split_k
    rows_per_step = block_k // 2
    n_j, n_i = np_ // block_n, mp // block_m
    if method == "vector":
        x = x.reshape(kp, 1)
        x_spec = pl.BlockSpec((kp, 1), lambda j, i, s: (0, 0))
        n_i = 1
    else:
        x_spec = pl.BlockSpec((block_m, kp), lambda j, i, s: (i, 0))
    if scale_mode == "acc":
        data, scales = w.data, w.scales
        w_spec = pl.BlockSpec((half, block_n), lambda j, i, s: (0, j))
        s_spec = pl.BlockSpec((kp // group, block_n), lambda j, i, s: (0, j))
    else:  # free reshapes: whole groups along a leading axis
        data = w.data.reshape(half // group, group, np_)
        scales = w.scales.reshape(kp // group, 1, np_)
        w_spec = pl.BlockSpec((half // group, group, block_n), lambda j, i, s: (0, 0, j))
        s_spec = pl.BlockSpec((kp // group, 1, block_n), lambda j, i, s: (0, 0, j))
    operands = [x, data, scales]
    in_specs = [x_spec, w_spec, s_spec]
    if w.tensor_scale is not None:
        operands.append(jnp.broadcast_to(w.tensor_scale.astype(jnp.float32), (2,)))
        in_specs.append(pl.BlockSpec((2,), lambda j, i, s: (0,)))
    rows_out = 1 if method == "vector" else block_m
    if split_k == 1:
        out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
        out_spec = pl.BlockSpec((rows_out, block_n), lambda j, i, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split_k, mp, np_), jnp.float32)
        out_spec = pl.BlockSpec((None, rows_out, block_n), lambda j, i, s: (s, i, j))
    kernel = functools.partial(
        _kernel, kind=kind, scale_encoding=fmt.scaling.scale,
        has_tensor_scale=w.tensor_scale is not None, method=method, scale_mode=scale_mode,
        decode=decode, group=group, rows_per_split=rows_per_split, rows_per_step=rows_per_step,
        steps=rows_per_split // rows_per_step, half=half)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(n_j, n_i, split_k),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"packed_matmul_{fmt.name}",
    )(*operands)
    if split_k > 1:
        out = jnp.sum(out, axis=0).astype(out_dtype)
    if out.shape != (m, w.n):
        out = out[:m, :w.n]
    return out


# Against _shared_memory_estimate: measured on an H100 (Triton 3.6), launches asked for 0.78x to
# 1.35x the estimate; the limit is 227 KB. Configurations that ran: estimates up to 156 KB.
_SHARED_BUDGET = 160 * 1024


def _shared_memory_estimate(block_m, block_n, rows_per_step, num_stages):
    """Bytes of shared memory a configuration is expected to need: per pipeline stage the two bf16
    x tiles and the byte tile, plus the two decoded bf16 tiles on their way to the dot."""
    per_stage = 4 * block_m * rows_per_step + rows_per_step * block_n
    return num_stages * per_stage + 4 * rows_per_step * block_n


def _fit_shared_memory(block_m, block_n, rows_per_step, group_size, num_stages):
    """Shrinks a configuration until :func:`_shared_memory_estimate` fits the budget: Triton
    stages the x and byte tiles ``num_stages`` deep and converts the decoded tiles to the dot
    layout through shared memory; past ~227 KB the launch fails. The K step shrinks first (down
    to one group), then the pipeline depth (down to 2), then ``block_m`` (down to 16; more
    programs then read the weight). Returns ``(rows_per_step, num_stages, block_m)``."""
    def fits():
        estimate = _shared_memory_estimate(block_m, block_n, rows_per_step, num_stages)
        return estimate <= _SHARED_BUDGET

    while not fits() and rows_per_step > group_size:
        rows_per_step //= 2
    while not fits() and num_stages > 2:
        num_stages -= 1
    while not fits() and block_m > 16:
        block_m //= 2
    return rows_per_step, num_stages, block_m


def _check(x, w, out_dtype, block_m, block_n, block_k, split_k, method, scale_mode, decode):
    if not isinstance(w, PackedWeight):
        raise ValueError(f"packed_matmul takes the weight as a PackedWeight (pack_weight(qjax."
                         f"quantize(w, fmt, axis=0))), got {type(w).__name__}.")
    if _element_kind(w.fmt) is None:
        raise _unsupported(w.fmt)
    if x.ndim < 1 or x.shape[-1] != w.k:
        raise ValueError(f"contraction lengths differ: x is {x.shape} (K last), the weight is "
                         f"(K, N) = {w.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array (bfloat16; float32/float16 are cast), got "
                         f"{x.dtype}.")
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in _OUT_DTYPES]:
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}.")
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(_METHODS)}.")
    if decode not in _DECODES:
        raise ValueError(f"unknown decode {decode!r}; valid: {', '.join(_DECODES)}.")
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; valid: {', '.join(_SCALE_MODES)}.")
    if scale_mode == "weight" and _element_kind(w.fmt) != "e2m1":
        raise ValueError(f"scale_mode='weight' scales the decoded weights in bf16, exact for E2M1 "
                         f"elements only; {w.fmt.name!r} has int4 elements (an int4 value times "
                         f"its scale needs up to 11 bits). Use scale_mode='acc' or 'auto'.")
    group = w.group_size
    for name, v, low in (("block_m", block_m, 16), ("block_n", block_n, 16),
                         ("block_k", block_k, 2 * group)):
        if v is not None and (not _is_power_of_two(v) or v < low):
            raise ValueError(f"{name} must be a power of two >= {low} ({w.fmt.name}: twice its "
                             f"group size for block_k), got {v}.")
    if not _is_power_of_two(split_k) or w.k_padded // 2 % (split_k * group):
        raise ValueError(f"split_k must be a power of two dividing the padded K / 2 = "
                         f"{w.k_padded // 2} into whole groups of {group}, got {split_k}.")


def packed_matmul(x: Float[Array, "*batch k"], w: PackedWeight, *, out_dtype=jnp.bfloat16,
                  block_m: int | None = None, block_n: int = DEFAULT_BLOCK_N,
                  block_k: int = DEFAULT_BLOCK_K, split_k: int = 1,
                  num_warps: int = DEFAULT_NUM_WARPS, num_stages: int = DEFAULT_NUM_STAGES,
                  method: str = "dot", scale_mode: str = "auto", decode: str = "auto",
                  interpret: bool = False) -> Float[Array, "*batch n"]:
    """``x @ dequantize(w)`` with fp32 accumulation, reading the packed weight once.

    Args:
      x: ``(..., K)`` activations, bfloat16 (float32 / float16 are cast to bfloat16 first).
      w: the :class:`PackedWeight` of a ``(K, N)`` weight (:func:`pack_weight`).
      out_dtype: bfloat16 (default) or float32.
      block_m: rows of ``x`` per program (power of two >= 16; default: M rounded up to a power of
        two, at least 16, at most 128). Rows past M are masked.
      block_n: weight columns per program (power of two >= 16).
      block_k: K elements per loop step (power of two, at least twice the group size); shrunk to
        divide the padded K / split_k, and while the tiles would need too much shared memory.
      split_k: programs per column tile along K (power of two); > 1 writes fp32 partial sums that
        XLA adds (more programs for small N).
      num_warps, num_stages: Triton launch parameters.
      method: ``"dot"`` (bf16 tensor-core dots, any M) or ``"vector"`` (fp32 FMAs, M = 1 only).
      scale_mode: ``"acc"`` (each group's fp32 partial product times its scale; every format),
        ``"weight"`` (scaled bf16 weights, one dot per step; E2M1 formats, whose scaled elements
        are exact in bf16), or ``"auto"``: weight for E2M1, acc for int4.
      decode: ``"asm"`` (inline PTX byte-table decode, GPU only; one routine for both nibbles),
        ``"asm_split"`` (one routine per nibble, through the public ``elementwise_inline_asm``),
        ``"bits"`` (integer and float operations), or ``"auto"``: asm when compiling for the GPU,
        bits in the interpreter.
      interpret: run in the Pallas interpreter (any backend; CPU tests).

    Returns:
      ``(..., N)`` array of ``out_dtype``.

    Example:
      >>> pw = pack_weight(qjax.quantize(w, "mxfp4", axis=0))    # once, at load time
      >>> y = packed_matmul(x, pw)                               # x: (M, K) bf16 -> (M, N) bf16
    """
    x = jnp.asarray(x)
    _check(x, w, out_dtype, block_m, block_n, block_k, split_k, method, scale_mode, decode)
    batch = x.shape[:-1]
    m = math.prod(batch)
    if method == "vector" and m != 1:
        raise ValueError(f"method='vector' computes one row (M = 1); x has {m} rows. Use "
                         f"method='dot'.")
    if m == 0 or w.n == 0:
        return jnp.zeros((*batch, w.n), out_dtype)
    if scale_mode == "auto":
        scale_mode = "weight" if _element_kind(w.fmt) == "e2m1" else "acc"
    block_m = block_m or min(128, max(16, _next_power_of_two(m)))
    while w.n_padded % block_n:
        block_n //= 2
    # The PTX routine takes 4 bytes per call, so each thread must hold a multiple of 4 bytes of
    # the (group, block_n) tile: at least 4 per thread of the program.
    asm_fits = w.group_size * block_n >= 4 * 32 * num_warps
    if block_n < 16:
        raise ValueError(f"the padded N = {w.n_padded} has no power-of-two divisor >= 16 below "
                         f"block_n; pack the weight with a larger n_multiple.")
    if decode == "auto":
        decode = "asm" if not interpret and asm_fits else "bits"
    if decode.startswith("asm") and interpret:
        raise ValueError(f"decode={decode!r} is inline PTX and cannot run in the interpreter; use "
                         f"decode='bits' or 'auto'.")
    if decode.startswith("asm") and not asm_fits:
        raise ValueError(f"decode={decode!r} needs group size x block_n >= 128 x num_warps (4 "
                         f"bytes per thread); got {w.group_size} x {block_n} with {num_warps} "
                         f"warps. Raise block_n, lower num_warps, or use decode='bits'.")
    rows_per_split = w.k_padded // 2 // split_k
    rows_per_step = block_k // 2
    while rows_per_split % rows_per_step:
        rows_per_step //= 2
    x_rows = 1 if method == "vector" else block_m  # the vector method reads one row at a time
    rows_per_step, num_stages, x_rows = _fit_shared_memory(x_rows, block_n, rows_per_step,
                                                           w.group_size, num_stages)
    block_m = block_m if method == "vector" else x_rows
    out = _packed_matmul_jit(x.reshape(m, w.k), w, out_dtype=jnp.dtype(out_dtype),
                             block_m=block_m, block_n=block_n, block_k=2 * rows_per_step,
                             split_k=split_k, num_warps=num_warps, num_stages=num_stages,
                             method=method, scale_mode=scale_mode, decode=decode,
                             interpret=interpret)
    return out.reshape(*batch, w.n)


def packed_matmul_reference(x: Float[Array, "*batch k"], w: PackedWeight | QArray,
                            out_dtype=jnp.bfloat16) -> Float[Array, "*batch n"]:
    """The plain-JAX meaning of :func:`packed_matmul`: ``x`` rounded to bf16, the weight
    dequantized to fp32 (``qjax.dequantize``), one fp32 ``HIGHEST``-precision matmul, then the cast.

    Args:
      x: ``(..., K)`` activations.
      w: the :class:`PackedWeight`, or the ``QArray`` it was packed from.
      out_dtype: output dtype.

    Returns:
      ``(..., N)`` array of ``out_dtype``.

    Example:
      >>> y_ref = packed_matmul_reference(x, pw, jnp.float32)
    """
    q = w.unpack() if isinstance(w, PackedWeight) else w
    wf = dequantize(q, jnp.float32)
    xf = jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)
    return jnp.matmul(xf, wf, precision=lax.Precision.HIGHEST).astype(out_dtype)

"""One-pass AdamW with 8-bit blockwise moments (int8 or fp8) and bf16 weights: one Pallas (Triton)
kernel per tensor.

``qjax.optim.adamw(lr, state_fmt="int8", params="bf16_sr")`` composed from optax links compiles
to about thirteen XLA kernels per tensor (dequantize, Adam, weight decay, the learning rate, the
stochastic rounding of the weights with threefry bits, and per moment a block absmax, an 8-step
binary search over the code table and the requantization). Here each program loads a tile of
``blocks_per_program`` quantization blocks of the gradient, the weights and both moments' codes,
scales and block info, and in registers: decodes the moments, runs optax's ``scale_by_adam``
(bias correction included), adds the decoupled weight decay, scales by ``-lr``, rounds the new
weight stochastically to bf16, takes the per-block absmax and sign flag of the new moments and
encodes them with stochastic rounding between the two neighbouring codes. Every byte is read
once and written once (about 10 B/param: bf16 gradient and weight, two code bytes, 5/256 of
scales and info in; weight, codes, scales and info out).

Stored layout: exactly :class:`qjax.optim.QuantizedTensor` with ``fmt="int8"`` (uint8 indices
into the sorted 256-entry dynamic code, ``block_info`` 0 = signed / 1 = unsigned table, float32
block absmax), so checkpoints and the composable path read and write the same state.

**Decoding without a table.** The dynamic code (:func:`qjax.optim.codes.dynamic_code`) is a
decade times a linear fraction. Index ``J`` (``1 <= J < 256``) of decade ``i`` (``e = floor(log2
J)``, ``i = e - unsigned``) has the value ``N / (2**(8 + unsigned) * 5**(7 - i))`` with the integer
``N = 18 J + 9 - 16 * 2**e``, and every float32 table entry is that rational correctly rounded
(checked for all 509 magnitudes). With ``c = 5**(i - 7) / 256`` split into ``c_hi`` (13
significant bits, so ``N * c_hi`` is exact) and ``c_lo``, ``N * c_hi + N * c_lo`` rounds to the
table entry for every code, with or without the compiler contracting it into an FMA (both checked
exhaustively by the tests), so decoded values are exactly ``dequantize_tensor``'s.
``decode="gather"`` loads the entry from the table instead (a gather from a 2 KiB array).

**Encoding without a search.** For ``v = |x| / absmax`` the decade follows from six comparisons,
and inside a decade the index is linear in ``v``: ``J(v) = (v * 2**(8+unsigned) * 5**(7-i) + 16 *
2**e - 9) / 18`` (both constants of the decade come from a 28-entry extension of the code table).
Its floor is the lower neighbour; across a decade boundary ``J(v)`` is continuous, so a ``v``
classified into the wrong decade by rounding still gets the right neighbour. The two neighbours'
values are then loaded from the code table, and the upper one is taken with probability ``(x -
lo) / (hi - lo)``, the formula of :func:`qjax.optim.codes.nearest_code` (float32 rounding of the
probability aside; the floor can be one off only within ``~2e-5`` code gaps of a code, where
either choice is within that distance of ``x``). Signed tables lack ``-m_0`` (the smallest
magnitude, see ``codes``): a negative ``|v| < m_1`` rounds between 0 and ``-m_1``. In non-negative
blocks a positive value never takes code 0 (the second-moment guard of :mod:`qjax.optim.state`).

**Random bits, generated in the kernel.** Materialised random arrays would double the bytes
moved, so each element draws two 32-bit words from a counter-based hash: ``h(idx * 0x9E3779B9 ^
k)`` with ``h`` the "lowbias32" integer finaliser (two multiplies, three xor-shifts) and ``idx``
the element's flat index in the tensor. ``k`` (one per tensor and stream) mixes the seed words of
both optimizer keys, the tensor's number and the stream number. Word 1: 16 bits for the weight
(``bits(w + u) + r & 0xFFFF``, truncated: unbiased stochastic rounding to bf16) and 16 bits for the
first moment; word 2: 23 bits for the second moment (whose EMA with ``b2 = 0.999`` would amplify a
per-step rounding bias 1000-fold, so it gets the finer uniform).

**Exactness against the reference.** :func:`adamw_8bit_reference` computes the same function in
plain JAX (table lookups for decoding; the same hash and encode formulas). Every float operation
of the Adam step and the encoding is one IEEE-rounded operation on both sides: ``mul.rn``,
``add.rn``, ``div.rn``, ``sqrt.rn``, ``rcp.rn`` in the kernel (never contracted into FMAs), and
in plain JAX each result behind an ``optimization_barrier``, because XLA's simplifier otherwise
changes the arithmetic: it was seen contracting products into FMAs, folding ``(y + 2**23) -
2**23`` to ``y``, turning a division by a broadcast scalar into a product with its reciprocal and
``(a / b) / c`` into ``a / (b * c)``. So the kernel on the GPU is bit-identical to the reference
on the CPU, to the interpreter and to the same steps in NumPy float32. (The reference compiled by
XLA for the GPU may still differ in the last bits.)

**FP8 moments** (``fmt="fp8"``: E4M3 codes, COAT's range expansion for non-negative blocks, see
:mod:`qjax.optim.state`). The codes travel as their uint8 bit patterns (a bitcast) and are decoded
from the bits (:func:`decode_fp8`, exact); the new moments are encoded with
``qjax.optim.state``'s formulas (block absmax, smallest nonzero magnitude, ``8 k = floor(8 log2
R_E4M3 / log2 R_block)``, ``448 (|x| / absmax)**k``) and rounded to E4M3 stochastically with the
bit-level rounding of :mod:`qjax.pallas.fake_quant`. Given the same random bits the codes, scales
and exponents are bit-identical to :func:`qjax.optim.quantize_tensor`'s (tested on the CPU). Each
moment takes a whole 32-bit word (E4M3's rounding uses up to 20 low bits), so the first moment
draws a third hash word. ``x**p`` is ``exp2(p log2 x)`` (decoding and encoding expanded blocks;
libdevice's ``powf`` cost 2.4 ms more per step on the 268M-parameter benchmark) and ``log2`` also
chooses ``k``. These are libdevice's in the kernel and XLA's in the reference and may differ in
the last bit, which moves a code or a weight's rounding where the value sits on a boundary, so
fp8 is compared with its reference to that tolerance, not bit for bit.

Shapes: the last axis is cut into blocks as ``QuantizedTensor`` does; a power-of-two block that
divides the last axis is a free reshape. Otherwise (a ragged last block, or a tensor smaller than
one block whose length is no power of two) the wrapper zero-pads to whole power-of-two blocks and
the kernel masks the padding out (its index arithmetic uses the true length): correct, but the
padding and cropping cost extra passes over that tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Float, UInt8, UInt32

from qjax import formats as _formats
from qjax.optim import codes as _codes
from qjax.optim import state as _state
from qjax.pallas import fake_quant as _fq
from qjax.pallas import quantize as _pq
from qjax.quantize import hash32

__all__ = ["AdamwKernelConfig", "Hyper", "adamw_8bit_pallas", "adamw_8bit_reference", "decode_int8",
           "decode_fp8", "hyperparameters", "stream_keys", "PARAM_MODES", "STATE_FORMATS"]

PARAM_MODES = ("bf16_sr", "fp32")
STATE_FORMATS = ("int8", "fp8")
_GOLDEN = np.uint32(0x9E3779B9)
_TWO23 = np.float32(8388608.0)
_MAGIC = np.uint32(0x4B000000)  # bits of 2**23: (k | MAGIC) as float is 2**23 + k, k < 2**23
_ONE_BITS = np.uint32(0x3F800000)
_ABS = np.uint32(0x7FFFFFFF)
_INF, _NAN = _fq._INF, _fq._NAN
_E4M3_MIN_SUBNORMAL_BITS = np.uint32(0x3B000000)  # 2**-9
# The numerator of COAT's 8 k = floor(8 log2(R_E4M3) / log2(R_block)), as the chain rounds it.
_FP8_LOG_TARGET = np.float32(_state._K_STEPS * np.log2(_state._COAT_TARGET_RANGE))
_MU_STREAM = np.uint32(0x27D4EB2F)  # fp8 first moments draw a third word: hash32(k1 ^ this)

# Hyperparameter vector layout (float32, padded to 16 for the kernel).
_H = {"one_minus_b1": 0, "b1": 1, "one_minus_b2": 2, "b2": 3, "bc1": 4, "bc2": 5, "eps": 6,
      "weight_decay": 7, "neg_lr": 8}


def _decade_constants():
    """c(i) = 5**(i - 7) / 256 for decades i = 0..6 as (c_hi with 13 significant bits, c_lo)."""
    hi, lo = [], []
    for i in range(7):
        c = Fraction(1, 5 ** (7 - i) * 256)
        m, ex = math.frexp(float(c))
        c_hi = math.ldexp(round(m * 2**13), ex - 13)
        hi.append(np.float32(c_hi))
        lo.append(np.float32(float(c - Fraction(c_hi))))
    return tuple(hi), tuple(lo)


_C_HI, _C_LO = _decade_constants()
_DECADES = 512  # where the encoder's per-decade constants start in _code_table()
_THRESHOLDS = tuple(np.float32(10.0 ** (d - 7)) for d in range(1, 7))  # decade d starts here


@dataclasses.dataclass(frozen=True)
class AdamwKernelConfig:
    """Launch parameters of the fused kernel.

    Attributes:
      blocks_per_program: quantization blocks per program (a power of two).
      num_warps: Triton warps per program; None: 4 for int8 moments, 8 for fp8 (whose encoding
        has more arithmetic per element: 8x8 and 4x8 were about 10% faster than 4x4 for fp8 on an
        H100 at 268M parameters, 2026-12-07).
      num_stages: Triton pipelining depth (None: Pallas' default).
      decode: ``"gather"`` (table loads; the default: 3.71 ms against 4.90 ms for ``"arith"``
        on an H200 at 268M parameters, 2026-11-23) or ``"arith"`` (exact arithmetic decoding).
        Both decode to the same bits; the encoder loads from the table either way.

    The int8 default 4 blocks x 4 warps (8 elements per thread, 72 registers): on an H200 at 268M
    parameters (2026-11-23, benchmarks/adamw_kernel_costs.py) 2x2 and 8x8 were within 6% of it
    in two runs, 8x4 (the earlier default, 117 registers) 11-19% slower.
    """

    blocks_per_program: int = 4
    num_warps: int | None = None
    num_stages: int | None = None
    decode: str = "gather"

    def warps_for(self, state_fmt: str) -> int:
        """The warps to launch for moments in ``state_fmt``."""
        if self.num_warps is not None:
            return self.num_warps
        return 8 if state_fmt == "fp8" else 4

    def __post_init__(self):
        b = self.blocks_per_program
        if b < 1 or b & (b - 1):
            raise ValueError(f"blocks_per_program must be a power of two, got {b}.")
        if self.decode not in ("arith", "gather"):
            raise ValueError(f"unknown decode {self.decode!r}; valid: 'arith', 'gather'.")


class Hyper:
    """Names of the entries of the float32 hyperparameter vector (see :func:`hyperparameters`)."""

    index = _H


# --------------------------------------------------------------------------- scalar helpers (plain JAX)


def stream_keys(state_words: UInt32[Array, "2"], param_words: UInt32[Array, "2"],
                tensor_id: int) -> UInt32[Array, "2"]:
    """The two per-tensor stream keys of the in-kernel hash.

    Args:
      state_words: two uint32 seed words from the state's stochastic-rounding key.
      param_words: two uint32 seed words from the weights' key (zeros without bf16 weights).
      tensor_id: the tensor's number in its pytree.

    Returns:
      uint32 ``[k1, k2]``: word 1 rounds the weight and the first moment, word 2 the second.

    Example:
      >>> k = stream_keys(jnp.array([1, 2], jnp.uint32), jnp.zeros(2, jnp.uint32), 0)
      >>> k.shape, k.dtype
      ((2,), dtype('uint32'))
    """
    s = jnp.asarray(state_words, jnp.uint32)
    p = jnp.asarray(param_words, jnp.uint32)
    out = []
    for stream in (1, 2):
        k = hash32(jnp.uint32(np.uint32((tensor_id * 0x9E3779B9 + stream * 0x632BE5AB) & 0xFFFFFFFF)) ^ s[0])
        k = hash32(k ^ s[1])
        k = hash32(k ^ p[0])
        out.append(hash32(k ^ p[1]))
    return jnp.stack(out)


def hyperparameters(*, b1, b2, eps, weight_decay, neg_lr, count_inc,
                    decay_dtype=jnp.float32) -> Float[Array, "16"]:
    """The float32 scalars of one step, computed with optax's own expressions and dtypes.

    ``(1 - b1) * g + b1 * m``, the bias corrections ``1 - b1**count``, ``sqrt(nu_hat) + eps``,
    ``g + weight_decay * p`` and ``step_size * g``: each scalar is formed as optax forms it (Python
    floats or injected arrays, whatever their dtype) and then held as the float32 that meets the
    float32 updates. ``weight_decay`` is rounded to ``decay_dtype``, the dtype of the product
    ``weight_decay * p`` in optax (bf16 for a Python float and bf16 weights).

    Returns:
      A float32 vector of 16 (see :class:`Hyper`).
    """
    def f32(x):
        return jnp.asarray(x).astype(jnp.float32)

    vals = [None] * 16
    vals[_H["one_minus_b1"]] = f32(1 - b1)
    vals[_H["b1"]] = f32(b1)
    vals[_H["one_minus_b2"]] = f32(1 - b2)
    vals[_H["b2"]] = f32(b2)
    vals[_H["bc1"]] = f32(1 - b1**count_inc)
    vals[_H["bc2"]] = f32(1 - b2**count_inc)
    vals[_H["eps"]] = f32(eps)
    vals[_H["weight_decay"]] = jnp.asarray(weight_decay, decay_dtype).astype(jnp.float32)
    vals[_H["neg_lr"]] = f32(neg_lr)
    return jnp.stack([jnp.zeros((), jnp.float32) if v is None else v for v in vals])


# --------------------------------------------------------------------------- element math (kernel-safe)


def _bits(x):
    return lax.bitcast_convert_type(x, jnp.uint32)


def _f32(b):
    return lax.bitcast_convert_type(b, jnp.float32)


def _small_int_to_f32(k):
    """float32 of int32/uint32 ``0 <= k < 2**23`` without a conversion instruction."""
    return _f32(k.astype(jnp.uint32) | _MAGIC) - _TWO23


class _Ops:
    """Float ops with explicit IEEE rounding, never contracted into FMAs: inline PTX on the GPU,
    plain JAX (products behind an optimization barrier) in the interpreter and the reference."""

    def __init__(self, asm: bool):
        self.asm = asm

    def _ptx(self, op, *args):
        shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
        args = [jnp.broadcast_to(jnp.asarray(a, jnp.float32), shape) for a in args]
        regs = ", ".join(f"${k}" for k in range(len(args) + 1))
        (out,) = pltriton.elementwise_inline_asm(
            f"{op} {regs};", args=args, constraints=",".join(["=r"] + ["r"] * len(args)), pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
        return out

    def mul(self, a, b):
        # XLA:CPU contracts a product and a following add into an FMA inside a fusion (seen in
        # the interpreter); the barrier keeps the product a separately rounded value.
        return self._ptx("mul.rn.f32", a, b) if self.asm else lax.optimization_barrier(a * b)

    def add(self, a, b):
        # Behind a barrier too: XLA:CPU on some hosts simplified ``(y + 2**23) - 2**23`` to ``y``
        # (the floor in _encode), which the GPU kernel does not.
        return self._ptx("add.rn.f32", a, b) if self.asm else lax.optimization_barrier(a + b)

    def div(self, a, b):
        if self.asm:
            return self._ptx("div.rn.f32", a, b)
        # XLA's simplifier rewrites a division by a broadcast scalar into a product with its
        # reciprocal and (a / b) / c into a / (b * c), neither correctly rounded: the divisor is
        # materialised at full shape and both it and the quotient go behind barriers.
        shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
        return lax.optimization_barrier(a / lax.optimization_barrier(jnp.broadcast_to(b, shape)))

    def sqrt(self, a):
        return self._ptx("sqrt.rn.f32", a) if self.asm else lax.optimization_barrier(jnp.sqrt(a))

    def rcp(self, a):
        return self._ptx("rcp.rn.f32", a) if self.asm else self.div(np.float32(1), a)


def _select(i, values):
    """``values[i]`` for int32 ``i`` in ``[0, len)`` by a chain of selects (no gather)."""
    out = jnp.full(jnp.shape(i), values[0], jnp.float32)
    for k in range(1, len(values)):
        out = jnp.where(i >= k, values[k], out)
    return out


def decode_int8(code: UInt8[Array, "..."], unsigned) -> Float[Array, "..."]:
    """The dynamic-code table value of each uint8 ``code``, computed (no table), exactly.

    Args:
      code: uint8 (or int32) code indices.
      unsigned: bool per element (broadcastable): True for the unsigned table.

    Returns:
      float32 values, equal to ``codes.dynamic_code(8, not unsigned)[code]``.

    Example:
      >>> t = codes.dynamic_code(8, True)
      >>> bool(jnp.all(decode_int8(jnp.arange(256), False) == t))
      True
    """
    code = jnp.asarray(code).astype(jnp.int32)
    s = jnp.asarray(unsigned).astype(jnp.int32)
    neg = (s == 0) & (code < 127)
    q = jnp.where(s == 1, code, jnp.where(neg, 128 - code, code - 127))
    j = q + s  # 1..255 on magnitudes; 0 is zero, 128 (signed) / 256 (unsigned) is 1.0
    jc = jnp.minimum(jnp.maximum(j, 1), 255)  # (lax.clamp has no Triton lowering)
    e = (_bits(_small_int_to_f32(jc)) >> 23).astype(jnp.int32) - 127
    n = 18 * jc + 9 - jnp.left_shift(16, e)
    nf = _small_int_to_f32(jnp.maximum(n, 0))
    i = jnp.minimum(jnp.maximum(e - s, 0), 6)
    value = nf * _select(i, _C_HI) + nf * _select(i, _C_LO)
    value = value * jnp.where(s == 1, np.float32(0.5), np.float32(1.0))
    value = jnp.where(q == 0, np.float32(0), jnp.where(j == 128 + 128 * s, np.float32(1), value))
    return jnp.where(neg, -value, value)


def _decade_constants_of(i, s, lookup):
    """The encoder's ``K(i) * 2**s`` and ``16 * 2**(i + s) - 9`` for decade ``i`` and unsigned
    flag ``s`` (int32, broadcast): two table loads. (A module-level function so that
    benchmarks/adamw_kernel_costs.py can time alternatives.)"""
    decade = _DECADES + i + 7 * s
    return lookup(decade), lookup(decade + 14)


def _neighbours(lo_index, lookup):
    """The code values at table index ``lo_index`` and the next one: two table loads."""
    return lookup(lo_index), lookup(lo_index + 1)


def _encode(x, absmax, unsigned, u, ops, lookup):
    """uint8 codes of float32 ``x`` in blocks with ``absmax`` (broadcast) and the unsigned flag,
    stochastically rounded with uniforms ``u`` in [0, 1) (see the module docstring). ``lookup``
    maps int32 indices into :func:`_code_table` to its values."""
    a = _f32(_bits(x) & _ABS)
    negative = (_bits(x) >> 31) == 1
    r = jnp.where(absmax > 0, ops.rcp(jnp.where(absmax > 0, absmax, np.float32(1))), np.float32(0))
    v = a * r
    s = unsigned.astype(jnp.int32)
    i = jnp.zeros(v.shape, jnp.int32)
    for t in _THRESHOLDS:
        i = i + (v >= t).astype(jnp.int32)
    scale, offset = _decade_constants_of(i, s, lookup)
    y = ops.mul(v, scale)  # v in N units of decade i
    # Both steps through ops: a plain product followed by an add may become one FMA on the GPU
    # and move the floor below across an integer.
    j_real = ops.mul(ops.add(y, offset), np.float32(1 / 18))
    t = ops.add(j_real, _TWO23)  # round to integer, then step down if it rounded up: an exact floor
    q_lo = (_bits(t) - _MAGIC).astype(jnp.int32) - ((t - _TWO23) > j_real).astype(jnp.int32) - s
    # The table index of the signed value's lower neighbour: signed tables hold -m(q) at 128 - q
    # for q >= 2 (no -m_0: a negative value below m_1 rounds between -m_1 and 0).
    lo_index = jnp.where(s == 1, q_lo, jnp.where(negative, 127 - jnp.maximum(q_lo, 1), 127 + q_lo))
    lo_index = jnp.minimum(jnp.maximum(lo_index, 0), 254) + 256 * s
    lo, hi = _neighbours(lo_index, lookup)
    sv = jnp.where(negative, -v, v)
    take_hi = (u * (hi - lo) < sv - lo) | (sv >= hi)
    code = lo_index - 256 * s + take_hi.astype(jnp.int32)
    code = jnp.where((s == 1) & (a > 0) & (code == 0), 1, code)  # a positive second moment never rounds to 0
    return code.astype(jnp.uint8)


def decode_fp8(code: UInt8[Array, "..."]) -> Float[Array, "..."]:
    """The float32 value of each E4M3 (``float8_e4m3fn``) bit pattern, from its bits, exactly.

    Args:
      code: uint8 (or int32) bit patterns.

    Returns:
      float32 values, equal to ``code.view(float8_e4m3fn).astype(float32)`` (NaN for 0x7F, 0xFF).

    Example:
      >>> decode_fp8(jnp.array([0x38, 0x01, 0xFE], jnp.uint8))
      Array([ 1.000000e+00,  1.953125e-03, -4.480000e+02], dtype=float32)
    """
    c = jnp.asarray(code).astype(jnp.uint32)
    e, m = (c >> 3) & 15, c & 7
    # NaN is chosen among the bit patterns: Triton cannot bitcast a constant.
    normal = _f32(jnp.where((c & 0x7F) == 0x7F, _NAN, ((e + 120) << 23) | (m << 20)))
    subnormal = _small_int_to_f32(m) * np.float32(2.0**-9)  # exact
    value = jnp.where(e > 0, normal, subnormal)
    return jnp.where((c >> 7) == 1, -value, value)


def _fp8_steps(absmax, min_nonzero, unsigned, ops):
    """COAT's ``8 k`` per block (float32; 8 = plain E4M3), as ``qjax.optim.state`` chooses it."""
    log_range = jnp.log2(ops.div(absmax, min_nonzero))
    steps = jnp.floor(ops.div(_FP8_LOG_TARGET, log_range))
    steps = jnp.where(steps != steps, np.float32(_state._K_STEPS), steps)
    steps = jnp.minimum(jnp.maximum(steps, np.float32(1)), np.float32(255))
    return jnp.where(unsigned & (absmax > 0), steps, np.float32(_state._K_STEPS))


def _pow(x, p):
    """``x ** p`` (COAT's expansion and its inverse: ``0 <= x <= 1``, ``p > 0``)."""
    return _state._coat_power(x, p)


def _per_block(steps, plain, expanded):
    """``plain`` in the blocks stored plain (``steps == 8``), ``expanded()`` in the others.

    ``expanded`` (the pow) runs only in tiles that hold an expanded block: first moments are
    signed, so never expanded. The flag is a max over int32 because Pallas' Triton lowering has
    no ``reduce_and``.
    """
    any_expanded = jnp.max((steps != _state._K_STEPS).astype(jnp.int32)) > 0
    return lax.cond(any_expanded, lambda: jnp.where(steps == _state._K_STEPS, plain, expanded()),
                    lambda: plain)


def _decode_fp8_moment(code, scale, steps, ops):
    """Moment values of E4M3 codes in blocks with ``scale`` (absmax) and ``steps`` (broadcast):
    ``qjax.optim.dequantize_tensor``'s formula, ``q * (absmax / 448)`` or ``absmax * (q / 448) **
    (8 / steps)``."""
    q = decode_fp8(code)
    plain = ops.mul(q, ops.div(scale, _state._E4M3_MAX))
    return _per_block(steps, plain, lambda: ops.mul(scale, _pow(
        ops.div(q, _state._E4M3_MAX), ops.div(np.float32(_state._K_STEPS), steps))))


def _encode_fp8(x, absmax, steps, unsigned, random_bits, ops):
    """uint8 E4M3 codes of float32 ``x`` in blocks with ``absmax``, ``steps`` and the unsigned
    flag (broadcast), stochastically rounded with ``random_bits``: ``qjax.optim.state``'s
    encoding (COAT's range expansion ``448 (|x| / absmax) ** (steps / 8)`` where ``steps != 8``)."""
    scale = ops.div(absmax, _state._E4M3_MAX)
    plain = jnp.where(scale > 0, ops.div(x, jnp.where(scale > 0, scale, np.float32(1))), np.float32(0))
    ratio = jnp.where(absmax > 0, ops.div(_f32(_bits(x) & _ABS), jnp.where(absmax > 0, absmax, np.float32(1))),
                      np.float32(0))
    k = ops.div(steps, np.float32(_state._K_STEPS))
    y = _per_block(steps, plain, lambda: ops.mul(_state._E4M3_MAX, _pow(ratio, k)))
    q = _fq._round_generic(_bits(y), _formats.E4M3_ELEM, 0, "stochastic", random_bits)
    guard = unsigned & (x > 0) & (q == 0)  # a positive second moment never rounds to 0
    q = jnp.where(guard, _E4M3_MIN_SUBNORMAL_BITS, q)
    return _pq._encode(q, _formats.E4M3_ELEM).astype(jnp.uint8)


def _uniform23(r):
    return _f32((r >> 9) | _ONE_BITS) - np.float32(1)


def _uniform16(r):
    return _f32(((r >> 16) << 7) | _ONE_BITS) - np.float32(1)


def _step(g, w, mu_old, nu_old, h, ops, *, param_mode, decay, decay_bf16):
    """Adam, decoupled weight decay and -lr, in optax's order: the float32 update ``u``."""
    mu = ops.add(ops.mul(h[_H["one_minus_b1"]], g), ops.mul(h[_H["b1"]], mu_old))
    nu = ops.add(ops.mul(h[_H["one_minus_b2"]], g * g), ops.mul(h[_H["b2"]], nu_old))
    mu_hat = ops.div(mu, h[_H["bc1"]])
    nu_hat = ops.div(nu, h[_H["bc2"]])
    u = ops.div(mu_hat, ops.add(ops.sqrt(nu_hat), h[_H["eps"]]))
    if decay:
        d = ops.mul(h[_H["weight_decay"]], w)
        if decay_bf16:  # optax's `s * p` with a Python float and bf16 weights is a bf16 product
            d = d.astype(jnp.bfloat16).astype(jnp.float32)
        u = ops.add(u, d)
    u = ops.mul(h[_H["neg_lr"]], u)
    return u, mu, nu


def _new_param(w, u, r1, ops, param_mode):
    if param_mode == "fp32":
        return u  # the optax update; apply_updates adds it
    t = _bits(ops.add(w, u))
    return _f32((t + (r1 & np.uint32(0xFFFF))) & np.uint32(0xFFFF0000)).astype(jnp.bfloat16)


def _block_stats(x, valid):
    """Block absmax (NaN-propagating, on bit patterns) and the no-negative flag, along axis -1."""
    b = _bits(x) & _ABS
    neg = (x < 0) | (x != x)
    if valid is not None:
        b = jnp.where(valid, b, np.uint32(0))
        neg = neg & valid
    absmax = _f32(jnp.max(b, axis=-1))
    unsigned = jnp.max(neg.astype(jnp.int32), axis=-1) == 0
    return absmax, unsigned


def _block_min_nonzero(x, valid):
    """Smallest nonzero magnitude per block along axis -1 (Inf if none; NaN is skipped)."""
    b = _bits(x) & _ABS
    keep = (b > 0) & (b <= _INF)
    if valid is not None:
        keep = keep & valid
    return _f32(jnp.min(jnp.where(keep, b, _INF), axis=-1))


# --------------------------------------------------------------------------- kernel


def _load(ref, mask):
    if mask is None:
        return ref[...]
    if hasattr(pltriton, "load"):
        return pltriton.load(ref, mask=mask, other=0)
    return pl.load(ref, (slice(None),) * len(ref.shape), mask=mask, other=0)


def _store(ref, value, mask):
    if mask is None:
        ref[...] = value
    elif hasattr(pltriton, "store"):
        pltriton.store(ref, value, mask=mask)
    else:
        pl.store(ref, (slice(None),) * len(ref.shape), value, mask=mask)


def _element_index(g_blocks, bs_p, geometry):
    """uint32 flat index (in the unpadded tensor) of each element of a (G, bs_p) tile, and the
    validity mask (None when nothing is padded)."""
    n, bs, nb, total_blocks = geometry
    blk = pl.program_id(0) * g_blocks + lax.broadcasted_iota(jnp.int32, (g_blocks, bs_p), 0)
    j = lax.broadcasted_iota(jnp.int32, (g_blocks, bs_p), 1)
    if bs_p == bs and n == nb * bs:
        idx = blk * bs + j
        valid = None if total_blocks % g_blocks == 0 else blk < total_blocks
        return idx.astype(jnp.uint32), valid
    row, b = blk // nb, blk % nb
    col = b * bs + j
    valid = (j < bs) & (col < n) & (blk < total_blocks)
    return (row * n + col).astype(jnp.uint32), valid


def _kernel(h_ref, k_ref, table_ref, g_ref, p_ref, mc_ref, ms_ref, mi_ref, nc_ref, ns_ref, ni_ref,
            po_ref, mco_ref, mso_ref, mio_ref, nco_ref, nso_ref, nio_ref, *,
            geometry, state_fmt, param_mode, decay, decay_bf16, decode, asm):
    ops = _Ops(asm)
    g_blocks, bs_p = g_ref.shape
    idx, valid = _element_index(g_blocks, bs_p, geometry)
    total_blocks = geometry[3]
    row_mask = None
    if total_blocks % g_blocks:
        row_mask = pl.program_id(0) * g_blocks + lax.iota(jnp.int32, g_blocks) < total_blocks
    tile_mask = None if row_mask is None else jnp.broadcast_to(row_mask[:, None], (g_blocks, bs_p))
    hv = [h_ref[k] for k in range(16)]

    g = _load(g_ref, tile_mask).astype(jnp.float32)
    w = _load(p_ref, tile_mask).astype(jnp.float32)
    m_info = _load(mi_ref, row_mask)[:, None]
    n_info = _load(ni_ref, row_mask)[:, None]
    m_codes = _load(mc_ref, tile_mask)
    n_codes = _load(nc_ref, tile_mask)
    m_scale = _load(ms_ref, row_mask)[:, None]
    n_scale = _load(ns_ref, row_mask)[:, None]
    lookup = lambda index: table_ref[index]
    mu_old, nu_old = _decode_moments(m_codes, m_scale, m_info, n_codes, n_scale, n_info,
                                     state_fmt, decode, lookup, ops)
    if valid is not None:
        zero = np.float32(0)
        g, w = jnp.where(valid, g, zero), jnp.where(valid, w, zero)
        mu_old, nu_old = jnp.where(valid, mu_old, zero), jnp.where(valid, nu_old, zero)

    u, mu, nu = _step(g, w, mu_old, nu_old, hv, ops, param_mode=param_mode, decay=decay,
                      decay_bf16=decay_bf16)
    r1, r2, r3 = _random_words(idx, k_ref[0], k_ref[1], state_fmt)
    _store(po_ref, _new_param(w, u, r1, ops, param_mode).astype(po_ref.dtype), tile_mask)
    for x, bits, first, c_ref, s_ref, i_ref in ((mu, r3, True, mco_ref, mso_ref, mio_ref),
                                                (nu, r2, False, nco_ref, nso_ref, nio_ref)):
        codes, absmax, info = _encode_moment(x, valid, bits, first, state_fmt, lookup, ops)
        _store(c_ref, codes, tile_mask)
        _store(s_ref, absmax, row_mask)
        _store(i_ref, info, row_mask)


def _decode_moments(m_codes, m_scale, m_info, n_codes, n_scale, n_info, state_fmt, decode,
                    lookup, ops):
    """float32 first and second moments from their codes, block scales and block info."""
    if state_fmt == "fp8":
        steps = lambda info: info.astype(jnp.int32).astype(jnp.float32)
        return (_decode_fp8_moment(m_codes, m_scale, steps(m_info), ops),
                _decode_fp8_moment(n_codes, n_scale, steps(n_info), ops))
    m_unsigned, n_unsigned = m_info == 1, n_info == 1
    if decode == "gather":
        m_table = lookup(m_codes.astype(jnp.int32) + 256 * m_unsigned.astype(jnp.int32))
        n_table = lookup(n_codes.astype(jnp.int32) + 256 * n_unsigned.astype(jnp.int32))
    else:
        m_table = decode_int8(m_codes, m_unsigned)
        n_table = decode_int8(n_codes, n_unsigned)
    return m_table * m_scale, n_table * n_scale


def _random_words(idx, k1, k2, state_fmt):
    """The per-element random words: (weight and int8 first moment, second moment, first moment)."""
    m = idx * _GOLDEN
    r1 = hash32(m ^ k1)
    r2 = hash32(m ^ k2)
    # The int8 encoder needs 16 bits for the first moment (the high half of r1, whose low half
    # rounds the weight); E4M3's rounding takes up to 20 low bits, so fp8 draws a third word.
    r3 = hash32(m ^ hash32(k1 ^ _MU_STREAM)) if state_fmt == "fp8" else r1
    return r1, r2, r3


def _encode_moment(x, valid, bits, first, state_fmt, lookup, ops):
    """(codes, block absmax, block info) of a new moment ``x`` (blocks along axis -1); ``first``:
    the first moment."""
    absmax, unsigned = _block_stats(x, valid)
    if state_fmt == "fp8":
        steps = _fp8_steps(absmax, _block_min_nonzero(x, valid), unsigned, ops)
        codes = _encode_fp8(x, absmax[..., None], steps[..., None], unsigned[..., None], bits, ops)
        return codes, absmax, steps.astype(jnp.int32).astype(jnp.uint8)
    # int8: the first moment rounds with the high 16 bits of r1, the second with 23 bits of r2
    uniform = _uniform16(bits) if first else _uniform23(bits)
    codes = _encode(x, absmax[..., None], unsigned[..., None], uniform, ops, lookup)
    return codes, absmax, unsigned.astype(jnp.uint8)


# --------------------------------------------------------------------------- wrapper


def _code_table() -> np.ndarray:
    """One float32 table: the signed (indices 0-255) and unsigned (256-511) dynamic codes, then
    per decade ``i`` and unsigned flag ``s`` the encoder's constants ``K(i) * 2**s`` (at
    ``_DECADES + i + 7 s``) and ``16 * 2**(i + s) - 9`` (14 further), all exact."""
    k = [256 * 5 ** (7 - i) * 2**s for s in (0, 1) for i in range(7)]
    offset = [16 * 2 ** (i + s) - 9 for s in (0, 1) for i in range(7)]
    return np.concatenate([_codes.dynamic_code(8, True), _codes.dynamic_code(8, False),
                           np.array(k + offset, np.float32)])


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _geometry(shape, block_size):
    n = shape[-1]
    rows = math.prod(shape[:-1])
    nb = -(-n // block_size)
    return n, block_size, nb, rows * nb


def _to_tiles(x, block_size, bs_p):
    """(..., n) -> (rows * nb, bs_p), zero padded where the blocks are ragged."""
    n = x.shape[-1]
    x = x.reshape(-1, n)
    nb = -(-n // block_size)
    if nb * block_size != n:
        x = jnp.pad(x, ((0, 0), (0, nb * block_size - n)))
    x = x.reshape(-1, nb, block_size)
    if bs_p != block_size:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, bs_p - block_size)))
    return x.reshape(-1, bs_p)


def _from_tiles(y, shape, block_size):
    n = shape[-1]
    nb = -(-n // block_size)
    y = y.reshape(-1, nb, y.shape[-1])[..., :block_size].reshape(-1, nb * block_size)[:, :n]
    return y.reshape(shape)


def _code_bytes(codes):
    """The codes as uint8 (E4M3 values by their bit patterns: a bitcast, no pass)."""
    return codes if codes.dtype == jnp.uint8 else lax.bitcast_convert_type(codes, jnp.uint8)


def _stored_codes(code_bytes, state_fmt):
    """The kernel's uint8 codes in the dtype :class:`~qjax.optim.QuantizedTensor` stores."""
    if state_fmt == "fp8":
        return lax.bitcast_convert_type(code_bytes, jnp.float8_e4m3fn)
    return code_bytes


@functools.partial(jax.jit, static_argnames=("block_size", "state_fmt", "param_mode", "decay",
                                             "decay_bf16", "config", "interpret", "param_in_place"))
def _fused(grad, param, m_codes, m_scales, m_info, n_codes, n_scales, n_info, hyper, keys, *,
           block_size, state_fmt, param_mode, decay, decay_bf16, config, interpret, param_in_place):
    shape = param.shape
    geometry = _geometry(shape, block_size)
    bs_p = _next_power_of_two(block_size)
    total_blocks = geometry[3]
    g_blocks = min(config.blocks_per_program, _next_power_of_two(total_blocks))
    grid = (pl.cdiv(total_blocks, g_blocks),)
    tile = pl.BlockSpec((g_blocks, bs_p), lambda i: (i, 0))
    row = pl.BlockSpec((g_blocks,), lambda i: (i,))
    whole16 = pl.BlockSpec((16,), lambda i: (0,))
    whole2 = pl.BlockSpec((2,), lambda i: (0,))
    table = _code_table()
    table = jnp.asarray(np.pad(table, (0, _next_power_of_two(table.size) - table.size)))
    table_spec = pl.BlockSpec(table.shape, lambda i: (0,))  # (Triton blocks: powers of two)
    tiles = lambda x: _to_tiles(x, block_size, bs_p)
    flat = lambda x: x.reshape(-1)
    out_dtype = jnp.bfloat16 if param_mode == "bf16_sr" else jnp.float32
    moment = [jax.ShapeDtypeStruct((total_blocks, bs_p), jnp.uint8),
              jax.ShapeDtypeStruct((total_blocks,), jnp.float32),
              jax.ShapeDtypeStruct((total_blocks,), jnp.uint8)]
    out_shape = [jax.ShapeDtypeStruct((total_blocks, bs_p), out_dtype), *moment, *moment]
    kernel = functools.partial(_kernel, geometry=geometry, state_fmt=state_fmt,
                               param_mode=param_mode, decay=decay, decay_bf16=decay_bf16,
                               decode=config.decode, asm=not interpret)
    # Outputs overwrite their inputs' buffers (input index: output index). Without this XLA gives
    # the kernel fresh buffers and then copies them into the donated state: the step was 8-21%
    # slower on an H200, depending on the launch configuration.
    aliases = {5: 1, 6: 2, 7: 3, 8: 4, 9: 5, 10: 6}
    if param_in_place:
        aliases[4] = 0
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[whole16, whole2, table_spec, tile, tile, tile, row, row, tile, row, row],
        out_specs=[tile, tile, row, row, tile, row, row],
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=config.warps_for(state_fmt),
                                                num_stages=config.num_stages),
        interpret=interpret,
        name="adamw_8bit",
    )(hyper, keys, table, tiles(grad), tiles(param), tiles(_code_bytes(m_codes)), flat(m_scales),
      flat(m_info), tiles(_code_bytes(n_codes)), flat(n_scales), flat(n_info))
    p_out, mc, ms, mi, nc, ns, ni = outs
    scale_shape = shape[:-1] + (geometry[2],)
    stored = lambda c: _stored_codes(_from_tiles(c, shape, block_size), state_fmt)
    return (_from_tiles(p_out, shape, block_size),
            (stored(mc), ms.reshape(scale_shape), mi.reshape(scale_shape)),
            (stored(nc), ns.reshape(scale_shape), ni.reshape(scale_shape)))


def _check(grad, param, mu, nu, param_mode):
    from qjax.optim.state import QuantizedTensor

    if param_mode not in PARAM_MODES:
        raise ValueError(f"unknown param_mode {param_mode!r}; valid: {', '.join(map(repr, PARAM_MODES))}.")
    want = jnp.bfloat16 if param_mode == "bf16_sr" else jnp.float32
    if param.dtype != want:
        raise ValueError(f"param_mode={param_mode!r} needs {jnp.dtype(want).name} params, got {param.dtype}.")
    code_dtype = {"int8": jnp.uint8, "fp8": jnp.float8_e4m3fn}
    for name, q in (("mu", mu), ("nu", nu)):
        if (not isinstance(q, QuantizedTensor) or q.fmt not in STATE_FORMATS
                or q.codes.dtype != code_dtype[q.fmt]):
            raise ValueError(f"{name} must be an int8 or fp8 QuantizedTensor (qjax.optim."
                             f"quantize_tensor(..., 'int8' or 'fp8')), got {type(q).__name__} "
                             f"{getattr(q, 'fmt', '')}.")
        if q.fmt != mu.fmt:
            raise ValueError(f"mu and nu must have the same format, got {mu.fmt!r} and {q.fmt!r}.")
        if q.shape != param.shape or q.block_size != mu.block_size:
            raise ValueError(f"{name} has shape {q.shape} / block {q.block_size}; the param has "
                             f"shape {param.shape} and mu block {mu.block_size}.")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {grad.shape} differs from the param shape {param.shape}.")
    bs = mu.block_size
    if bs != param.shape[-1] and bs & (bs - 1):
        raise ValueError(f"the fused kernel needs a power-of-two block size (or one block per row); "
                         f"got {bs}.")


def supports(param, mu, nu, param_mode: str = "bf16_sr") -> bool:
    """Whether :func:`adamw_8bit_pallas` handles this leaf (else use the composable path)."""
    if param is None or getattr(param, "ndim", 0) < 1 or param.size == 0:
        return False
    try:
        _check(param, param, mu, nu, param_mode)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


def adamw_8bit_pallas(grad: Float[Array, "..."], param: Float[Array, "..."], mu, nu,
               hyper: Float[Array, "16"], keys: UInt32[Array, "2"], *, param_mode: str = "bf16_sr",
               decay: bool = True, decay_bf16: bool = False,
               config: AdamwKernelConfig = AdamwKernelConfig(), param_in_place: bool = False,
               interpret: bool = False):
    """One fused AdamW step of one tensor with int8 or fp8 moments (the Pallas kernel).

    Args:
      grad: the gradient (any float dtype; used as float32).
      param: bf16 weights (``param_mode="bf16_sr"``) or float32 weights (``"fp32"``).
      mu, nu: the moments as :class:`~qjax.optim.QuantizedTensor` of the param's shape, both
        ``"int8"`` or both ``"fp8"``.
      hyper: float32 scalars from :func:`hyperparameters`.
      keys: the two uint32 stream keys from :func:`stream_keys`.
      param_mode: ``"bf16_sr"``: returns the new bf16 weights, stochastically rounded; ``"fp32"``:
        returns the float32 optax update ``-lr * (adam + wd * p)``.
      decay: whether weight decay applies to this tensor (the optax mask).
      decay_bf16: whether optax forms ``weight_decay * p`` in bf16 (Python-float decay, bf16 p).
      config: launch parameters (:class:`AdamwKernelConfig`).
      param_in_place: write the new weights into ``param``'s buffer (``"bf16_sr"`` only). Pays
        when ``param`` is dead after the call (a donated training state); if it is still used,
        XLA copies it first. The moments are always updated in their buffers.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      ``(new_param_or_update, new_mu, new_nu)`` with the moments as ``QuantizedTensor``.

    Example:
      >>> from qjax.optim import quantize_tensor
      >>> p = jnp.ones((4, 256), jnp.bfloat16)
      >>> mu = nu = quantize_tensor(jnp.zeros((4, 256)), "int8")
      >>> h = hyperparameters(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, neg_lr=-1e-3,
      ...                     count_inc=1)
      >>> new_p, mu, nu = adamw_8bit_pallas(jnp.ones((4, 256)), p, mu, nu, h, jnp.arange(2, dtype=jnp.uint32),
      ...                                   interpret=True)
      >>> new_p.dtype, mu.codes.dtype
      (dtype(bfloat16), dtype('uint8'))
    """
    _check(grad, param, mu, nu, param_mode)
    out, m, n = _fused(grad, param, mu.codes, mu.scales, mu.block_info, nu.codes, nu.scales,
                       nu.block_info, hyper, keys, block_size=mu.block_size, state_fmt=mu.fmt,
                       param_mode=param_mode,
                       decay=decay, decay_bf16=decay_bf16, config=config, interpret=interpret,
                       param_in_place=param_in_place and param_mode == "bf16_sr")
    return (out, dataclasses.replace(mu, codes=m[0], scales=m[1], block_info=m[2]),
            dataclasses.replace(nu, codes=n[0], scales=n[1], block_info=n[2]))


# --------------------------------------------------------------------------- reference


def adamw_8bit_reference(grad: Float[Array, "..."], param: Float[Array, "..."], mu, nu,
                         hyper: Float[Array, "16"], keys: UInt32[Array, "2"], *,
                         param_mode: str = "bf16_sr", decay: bool = True,
                         decay_bf16: bool = False):
    """:func:`adamw_8bit_pallas` in plain JAX on whole arrays (table lookups for decoding).

    Same arguments and results as :func:`adamw_8bit_pallas` (without the launch parameters). Run on the
    CPU, it is bit-identical to the kernel in the interpreter, and for int8 moments to the kernel on
    the GPU (fp8: to the last bits of ``pow`` and ``log2``, see the module docstring).

    Example:
      >>> from qjax.optim import quantize_tensor
      >>> p = jnp.ones((2, 300), jnp.bfloat16)
      >>> mu = nu = quantize_tensor(jnp.zeros((2, 300)), "int8")
      >>> h = hyperparameters(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, neg_lr=-1e-3,
      ...                     count_inc=1)
      >>> new_p, mu, nu = adamw_8bit_reference(jnp.ones((2, 300)), p, mu, nu, h,
      ...                                      jnp.arange(2, dtype=jnp.uint32))
      >>> mu.scales.shape
      (2, 2)
    """
    from qjax.optim.state import _from_blocks, _to_blocks

    _check(grad, param, mu, nu, param_mode)
    ops = _Ops(False)
    shape, bs, fmt = param.shape, mu.block_size, mu.fmt
    n = shape[-1]
    blocks = lambda x: _to_blocks(x, bs)
    table = jnp.asarray(_code_table())
    lookup = lambda index: table[index]
    # Padding past the last element decodes to something; it is masked before the block
    # statistics and cropped from every output, so what it is does not matter.
    m_old, n_old = _decode_moments(blocks(_code_bytes(mu.codes)), mu.scales[..., None],
                                   mu.block_info[..., None], blocks(_code_bytes(nu.codes)),
                                   nu.scales[..., None], nu.block_info[..., None], fmt, "gather",
                                   lookup, ops)
    g = blocks(grad.astype(jnp.float32))
    w = blocks(param.astype(jnp.float32))
    h = [hyper[k] for k in range(16)]
    u, m_new, n_new = _step(g, w, m_old, n_old, h, ops, param_mode=param_mode, decay=decay,
                            decay_bf16=decay_bf16)
    idx = blocks(jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape))
    r1, r2, r3 = _random_words(idx, keys[0], keys[1], fmt)
    out = _from_blocks(_new_param(w, u, r1, ops, param_mode), n)
    valid = blocks(jnp.ones(shape, jnp.bool_))
    results = []
    for x, bits, first, q in ((m_new, r3, True, mu), (n_new, r2, False, nu)):
        c, absmax, info = _encode_moment(x, valid, bits, first, fmt, lookup, ops)
        results.append(dataclasses.replace(q, codes=_stored_codes(_from_blocks(c, n), fmt),
                                           scales=absmax, block_info=info))
    return out, results[0], results[1]

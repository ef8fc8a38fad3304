"""Quantized optimizer state: blockwise 8-bit / FP8 / 4-bit storage of param-shaped state leaves.

:func:`quantize_state` wraps any optax ``GradientTransformation``. Between steps, every float leaf
of the inner state that has the shape of a parameter and at least ``min_size`` elements is stored
as a :class:`QuantizedTensor`; ``update`` dequantizes those leaves to their original dtype, runs the
inner update, and quantizes the new leaves again. Everything else (step counts, small tensors,
leaves not shaped like a parameter, e.g. Adafactor's factored rows and columns) passes through.

Layout (all formats): blocks of ``block_size`` consecutive elements along the **last** axis (a
last axis shorter than the block is one block), so codes keep the parameter's shape and shard like
it. Per block: a float32 ``scale`` (the block absmax) and a uint8 ``block_info``.

Which code a block uses (signed or unsigned) is decided per block from its values: a block with no
negative element is quantized with the non-negative code. Why not from the leaf's role (Adam's
``mu`` vs ``nu``)? Optax states are free-form pytrees whose field names are no contract (``nu``,
``sum_of_squares``, ``grad_sq``, ``v_row`` ...), but "all values >= 0" is exactly the property the
unsigned code needs, it holds by construction for every second-moment-like leaf (so all of their
blocks take it), and a first-moment block that happens to be non-negative gains the finer code too.
It costs one min-reduction in the pass that already computes the absmax, and the flag lives in
``block_info``.

Formats (``fmt``):

``"int8"``
  Dynamic code of Dettmers et al. (:func:`~qjax.optim.codes.dynamic_code`), signed for blocks with
  a negative element, unsigned otherwise; ``block_info`` = 0 (signed) / 1 (unsigned).
``"fp8"``
  FP8 E4M3 element. Blocks with a negative element: plain E4M3 with scale ``absmax / 448``.
  Non-negative blocks (second moments): E4M3 with COAT's dynamic range expansion (Xi et al.,
  *COAT*, ICLR 2025): ``f(x) = x**k`` with ``k = floor(8 log2(R_E4M3) / log2(R_block)) / 8``,
  ``R_block = absmax / min nonzero``, ``R_E4M3 = 448**2 / 2`` (the constant of the authors' CUDA
  kernel), so the block's range fills E4M3's. COAT divides by the centre ``sqrt(min * max)`` before
  expanding and stores it; the centre cancels (``q = 448 (|x|/absmax)**k`` either way) so only
  ``absmax`` (float32) and ``k`` (``block_info = 8 k``, uint8; 8 means plain) are stored. Decode:
  ``x = absmax * (q / 448)**(1/k)``.
``"int4"``
  Two codes per byte along the last axis, blocks of 128 by default. Blocks with a negative element:
  the 4-bit dynamic code (signed), as Li et al. (*Memory Efficient Optimizers with 4-bit States*,
  2023) use for the first moment. Non-negative blocks: the square code ``{(k/15)**2}``, i.e. a
  uniform grid on ``sqrt(nu)``, the quantity Adam divides by (Li et al. use a linear grid with
  rank-1 normalisation; with block scales a linear grid maps everything below 1/30 of the block max
  to one code, which in our tests overestimated ``sqrt(nu)`` by up to 34% on average in a layer).

Rounding (``rounding``) is stochastic by default, nearest on request.

* ``"nearest"``: exact nearest code (binary search, then the nearer neighbour, ties to the
  smaller magnitude). The error of an element is a deterministic function of its value, at most
  half the local code gap (relative to the block absmax: 0.35% near 1 for int8, 3.6% near 1 for
  E4M3, 6.4% for the 4-bit square code). One-shot errors average to ~0 over a block, but
  requantizing an exponential moving average every step *freezes* every element whose per-step
  change is below half its code gap: Adam's ``nu`` moves 0.1% per step with ``b2 = 0.999`` while
  the 8-bit code's gaps are 0.7-7% of a value, so ``nu`` lags (most visibly while it warms up,
  the first ~1/(1-b2) steps) and Adam's effective step size drifts.
* ``"stochastic"``: one of the two neighbouring codes (fp8: E4M3 neighbours), the upper with
  probability (distance to the lower) / gap, so the stored value is unbiased and the EMA is right
  on average. Costs a PRNG key in the state and random bits per element per step: the
  counter-hash words of ``qjax.stochastic_bits``, which XLA fuses into the rounding (as every
  stochastic rounding in qjax draws them).

Measured on the CPU convergence task of ``tests/test_optim.py`` (final loss vs float32 Adam
state, 200 steps): nearest int8 -1.6%, fp8 -1.1%, int4 +23%; stochastic int8 -0.10%, fp8 -0.17%,
int4 -1.24% (``python benchmarks/optim_update.py --convergence`` prints the table). With a
constant low learning rate (3e-4) nearest drifts further (int8 -6.7%, fp8 -6.2%), stochastic stays
within 0.5% (int4: 3.2%).

One rule guards the second moment: in a non-negative block a positive value never rounds to the
code ``0`` (it takes the smallest positive code). Adam divides by ``sqrt(nu)``; a tiny positive
``nu`` rounded to 0 would turn a small update into ``mu / eps``. Exact zeros stay zero.

Example:
  >>> import optax
  >>> opt = quantize_state(optax.adam(1e-3), "int8")
  >>> params = {"w": jnp.ones((64, 256))}
  >>> state = opt.init(params)
  >>> type(state.inner_state[0].mu["w"]).__name__
  'QuantizedTensor'
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Key, UInt32

from qjax import formats as F
from qjax.optim import codes
from qjax.quantize import round_to_element, stochastic_bits

StateFormatName = Literal["int8", "fp8", "int4"]
STATE_FORMATS: tuple[str, ...] = ("int8", "fp8", "int4")
DEFAULT_BLOCK_SIZE = {"int8": 256, "fp8": 256, "int4": 128}

_E4M3_MAX = float(F.E4M3_ELEM.max)  # 448
_E4M3_MIN_SUBNORMAL = float(F.E4M3_ELEM.min_subnormal)  # 2**-9
_COAT_TARGET_RANGE = _E4M3_MAX**2 / 2  # COAT kernel's ratio upper bound
_K_STEPS = 8  # k is a multiple of 1/8, stored as the uint8 8*k (8 = plain, k = 1)


def _int_tables(fmt: str) -> np.ndarray:
    """Row 0: signed code, row 1: unsigned code."""
    if fmt == "int8":
        return np.stack([codes.dynamic_code(8, True), codes.dynamic_code(8, False)])
    return np.stack([codes.dynamic_code(4, True), codes.square_code(4)])


def check_format(fmt: str) -> str:
    """Returns ``fmt`` if it is a state format name, else raises a ValueError naming the choices."""
    if fmt not in STATE_FORMATS:
        raise ValueError(f"unknown state format {fmt!r}; valid: {', '.join(map(repr, STATE_FORMATS))}.")
    return fmt


# --------------------------------------------------------------------------- storage


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("codes", "scales", "block_info"),
                   meta_fields=("fmt", "shape", "dtype", "block_size"))
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A blockwise-quantized state tensor (a pytree: three arrays plus static metadata).

    Attributes:
      codes: ``uint8`` code indices shaped like the tensor (``"int8"``), ``float8_e4m3fn`` values
        shaped like the tensor (``"fp8"``), or ``uint8`` with two 4-bit codes per byte along the
        last axis, low nibble first (``"int4"``, last axis ``ceil(n / 2)``).
      scales: ``float32`` block absmax, shape ``(*shape[:-1], n_blocks)``.
      block_info: ``uint8`` per block: 0 signed / 1 unsigned code (int formats); ``8 k`` (fp8).
      fmt: ``"int8"``, ``"fp8"`` or ``"int4"``.
      shape: the tensor's shape.
      dtype: the dtype :func:`dequantize_tensor` returns.
      block_size: elements per block along the last axis.
    """

    codes: Array
    scales: Array
    block_info: Array
    fmt: str
    shape: tuple[int, ...]
    dtype: np.dtype
    block_size: int

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes, scales and block info."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.codes, self.scales, self.block_info))


def _to_blocks(x, block_size):
    """(..., n) -> (..., n_blocks, block_size), zero padded."""
    n = x.shape[-1]
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], n_blocks, block_size)


def _from_blocks(y, n):
    return y.reshape(*y.shape[:-2], -1)[..., :n]


def _pack_nibbles(c):
    """uint8 codes < 16 along the last axis -> bytes, element 2i in the low nibble of byte i."""
    if c.shape[-1] % 2:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, 1)])
    c = c.reshape(*c.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).astype(jnp.uint8)


def _unpack_nibbles(b, n):
    c = jnp.stack([b & 0xF, b >> 4], axis=-1)
    return c.reshape(*b.shape[:-1], -1)[..., :n]


def _block_size_for(shape, fmt, block_size):
    block_size = DEFAULT_BLOCK_SIZE[fmt] if block_size is None else int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}.")
    return max(1, min(block_size, shape[-1]))


def quantize_tensor(x: Float[Array, "..."], fmt: StateFormatName = "int8", *,
                    block_size: int | None = None,
                    key: Key[Array, ""] | None = None) -> QuantizedTensor:
    """Quantizes one state tensor blockwise (see the module docstring for the formats).

    Args:
      x: a float array of rank >= 1.
      fmt: ``"int8"``, ``"fp8"`` or ``"int4"``.
      block_size: elements per block along the last axis; ``None`` = 256 (int8, fp8) / 128 (int4).
      key: a PRNG key for stochastic rounding between the two neighbouring codes (unbiased);
        ``None`` = nearest.

    Returns:
      A :class:`QuantizedTensor`; :func:`dequantize_tensor` inverts it.

    Example:
      >>> q = quantize_tensor(jnp.linspace(-1.0, 1.0, 512), "int8")
      >>> q.codes.dtype, q.scales.shape
      (dtype('uint8'), (2,))
    """
    check_format(fmt)
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("quantize_tensor needs an array of rank >= 1; got a scalar.")
    bs = _block_size_for(x.shape, fmt, block_size)
    n = x.shape[-1]
    xb = _to_blocks(x.astype(jnp.float32), bs)
    absmax = jnp.max(jnp.abs(xb), axis=-1)
    nonnegative = jnp.all(xb >= 0, axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
    if fmt == "fp8":
        random_bits = None if key is None else stochastic_bits(key, xb.shape)
        values, info = _encode_fp8(xb, absmax, nonnegative, random_bits)
        stored = _from_blocks(values, n).astype(jnp.float8_e4m3fn)
    else:
        table_index = nonnegative.astype(jnp.int32)[..., None]
        uniform = None if key is None else _uniform(stochastic_bits(key, xb.shape))
        index = codes.nearest_code(xb / safe, _int_tables(fmt), table_index,
                                   positive_nonzero=nonnegative[..., None], uniform=uniform)
        stored = _from_blocks(index.astype(jnp.uint8), n)
        if fmt == "int4":
            stored = _pack_nibbles(stored)
        info = nonnegative.astype(jnp.uint8)
    return QuantizedTensor(stored, absmax, info, fmt, tuple(x.shape), np.dtype(x.dtype), bs)


def _uniform(bits):
    """Uniform float32 samples in [0, 1) from the top 24 of 32 random bits (exact in float32)."""
    return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def _expansion_code(xb, absmax, nonnegative):
    """COAT's k per block, as the uint8 8k; 8 (k = 1) for blocks with a negative value."""
    magnitude = jnp.abs(xb)
    min_nonzero = jnp.min(jnp.where(magnitude > 0, magnitude, jnp.inf), axis=-1)
    log_range = jnp.log2(absmax / min_nonzero)  # 0 for a single distinct magnitude -> k max
    steps = jnp.floor(_K_STEPS * np.log2(_COAT_TARGET_RANGE) / log_range)
    steps = jnp.clip(jnp.nan_to_num(steps, nan=_K_STEPS, posinf=255), 1, 255)
    return jnp.where(nonnegative & (absmax > 0), steps, _K_STEPS).astype(jnp.uint8)


def _coat_power(x, p):
    """``x ** p`` for ``0 <= x <= 1``, ``p > 0``: COAT's expansion (``p = k``) and its inverse.

    ``exp2(p log2 x)`` (exact at 0 and 1, within ~1e-5 relative elsewhere, far below an E4M3 step)
    rather than ``pow``: in the fused kernel libdevice's ``powf`` took 4.2 of 10.5 ms and this
    form 1.8 ms (H100, 2026-12-07, benchmarks/adamw_kernel_costs.py --state-fmt fp8). The chain
    uses the same form so that both give the same codes.
    """
    return jnp.exp2(p * jnp.log2(x))


def _encode_fp8(xb, absmax, nonnegative, random_bits=None):
    info = _expansion_code(xb, absmax, nonnegative)
    k = info.astype(jnp.float32)[..., None] / _K_STEPS
    scale = (absmax / _E4M3_MAX)[..., None]
    plain = jnp.where(scale > 0, xb / jnp.where(scale > 0, scale, 1.0), 0.0)
    ratio = jnp.where(absmax[..., None] > 0, jnp.abs(xb) / jnp.where(absmax > 0, absmax, 1.0)[..., None], 0.0)
    expanded = _E4M3_MAX * _coat_power(ratio, k)
    y = jnp.where(info[..., None] == _K_STEPS, plain, expanded)
    rounding = "nearest" if random_bits is None else "stochastic"
    q = round_to_element(y, F.E4M3_ELEM, rounding=rounding, random_bits=random_bits)
    guard = nonnegative[..., None] & (xb > 0) & (q == 0)
    q = jnp.where(guard, np.float32(_E4M3_MIN_SUBNORMAL), q)
    return q, info


def dequantize_tensor(q: QuantizedTensor, dtype=None) -> Array:
    """Decodes a :class:`QuantizedTensor`.

    Args:
      q: the quantized tensor.
      dtype: output dtype; defaults to the dtype that was quantized.

    Returns:
      An array of ``q.shape``.

    Example:
      >>> x = jnp.array([0.5, -1.0, 0.25, 0.0])
      >>> [round(v, 4) for v in dequantize_tensor(quantize_tensor(x, "int8")).tolist()]
      [0.5008, -1.0, 0.2477, 0.0]
    """
    dtype = q.dtype if dtype is None else dtype
    n = q.shape[-1]
    bs = q.block_size
    scale = q.scales[..., None]
    if q.fmt == "fp8":
        qb = _to_blocks(q.codes.astype(jnp.float32), bs)
        k = q.block_info.astype(jnp.float32)[..., None] / _K_STEPS
        plain = qb * (scale / _E4M3_MAX)
        expanded = scale * _coat_power(qb / _E4M3_MAX, 1.0 / k)
        values = jnp.where(q.block_info[..., None] == _K_STEPS, plain, expanded)
    else:
        index = q.codes if q.fmt == "int8" else _unpack_nibbles(q.codes, n)
        index = _to_blocks(index, bs)
        table_index = q.block_info.astype(jnp.int32)[..., None]
        values = codes.lookup(index, _int_tables(q.fmt), table_index) * scale
    return _from_blocks(values, n).astype(dtype)


# --------------------------------------------------------------------------- the wrapper


class QuantizedOptState(NamedTuple):
    """State of :func:`quantize_state`.

    Attributes:
      inner_state: the inner transformation's state, large param-shaped leaves quantized.
      key: raw PRNG key data (uint32) for ``rounding="stochastic"``; ``None`` for nearest.
    """

    inner_state: Any
    key: UInt32[Array, "..."] | None


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedTensor)


def _param_shapes(params) -> set[tuple[int, ...]]:
    return {tuple(np.shape(p)) for p in jax.tree.leaves(params)}


def _should_quantize(leaf, param_shapes, min_size) -> bool:
    shape = tuple(np.shape(leaf))
    dtype = getattr(leaf, "dtype", None)
    return (dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(shape) >= 1
            and int(np.prod(shape)) >= min_size and shape in param_shapes)


def _requantize(old, new, key=None):
    """Quantizes ``new`` like ``old`` if ``old`` is quantized; keeps the dtype recorded at init
    (the inner update may have promoted the leaf)."""
    if not _is_quantized(old):
        return new
    q = quantize_tensor(new, old.fmt, block_size=old.block_size, key=key)
    return dataclasses.replace(q, dtype=old.dtype)


def quantize_state(inner: optax.GradientTransformation, fmt: StateFormatName = "int8", *,
                   block_size: int | None = None, min_size: int = 4096,
                   rounding: Literal["stochastic", "nearest"] = "stochastic", seed: int = 0,
                   prng_impl: str | None = None) -> optax.GradientTransformationExtraArgs:
    """Stores the large param-shaped float leaves of ``inner``'s state blockwise-quantized.

    Args:
      inner: any optax transformation (``optax.adam(...)``, ``optax.scale_by_adam()``, a chain ...).
      fmt: ``"int8"`` (dynamic 8-bit code), ``"fp8"`` (E4M3, COAT range expansion for non-negative
        blocks) or ``"int4"`` (4-bit dynamic / square code, two per byte).
      block_size: elements per block along the last axis; ``None`` = 256 (int8, fp8), 128 (int4).
        (With ``optax.inject_hyperparams`` pass it in ``static_args``.)
      min_size: leaves with fewer elements stay in full precision.
      rounding: ``"stochastic"`` (default) or ``"nearest"``. Stochastic rounding picks one of the
        two neighbouring codes with the probabilities that make the stored value unbiased, so an
        EMA whose per-step change is below the code gap (Adam's ``nu`` moves 0.1% per step with
        ``b2 = 0.999``; the 8-bit code's gaps are 0.7-7% of a value) is neither frozen nor biased.
        It costs a PRNG key in the state and random bits per element per step.
      seed, prng_impl: the stochastic-rounding key and its PRNG implementation (used to split it
        every step; the random bits themselves are ``qjax.stochastic_bits`` for any ``prng_impl``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`QuantizedOptState`.
      ``update`` needs the same arguments as ``inner.update``.

    Raises:
      ValueError: unknown ``fmt`` or ``rounding``, or a non-positive ``block_size``.

    Example:
      >>> import optax
      >>> opt = quantize_state(optax.scale_by_adam(), "fp8")
      >>> params = {"w": jnp.ones((16, 512)), "b": jnp.zeros(16)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update(params, state)
      >>> jax.tree.structure(updates) == jax.tree.structure(params)
      True
    """
    check_format(fmt)
    if block_size is not None and int(block_size) < 1:
        raise ValueError(f"block_size must be a positive integer or None, got {block_size}.")
    if rounding not in ("stochastic", "nearest"):
        raise ValueError(f"unknown rounding {rounding!r}; valid: 'stochastic', 'nearest'.")
    inner = optax.with_extra_args_support(inner)
    stochastic = rounding == "stochastic"

    def init_fn(params):
        shapes = _param_shapes(params)
        state = inner.init(params)
        # The barrier stops XLA from constant-folding the quantization of the (constant) initial
        # state, which takes minutes at the size of a model.
        state = jax.tree.map(
            lambda x: quantize_tensor(jax.lax.optimization_barrier(x), fmt, block_size=block_size)
            if _should_quantize(x, shapes, min_size) else x, state)
        key = (jax.random.key_data(jax.random.key(seed, impl=prng_impl)) if stochastic
               else None)
        return QuantizedOptState(state, key)

    def update_fn(updates, state, params=None, **extra_args):
        dense = jax.tree.map(lambda x: dequantize_tensor(x) if _is_quantized(x) else x,
                             state.inner_state, is_leaf=_is_quantized)
        updates, new_dense = inner.update(updates, dense, params, **extra_args)
        old_leaves, treedef = jax.tree.flatten(state.inner_state, is_leaf=_is_quantized)
        new_leaves = treedef.flatten_up_to(new_dense)
        new_key, keys = state.key, [None] * len(old_leaves)
        if stochastic:
            key = jax.random.wrap_key_data(state.key, impl=prng_impl)
            key, *keys = jax.random.split(key, len(old_leaves) + 1)
            new_key = jax.random.key_data(key)
        new_state = treedef.unflatten(
            [_requantize(o, n, k) for o, n, k in zip(old_leaves, new_leaves, keys)])
        return updates, QuantizedOptState(new_state, new_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

"""Blockwise (randomized) Hadamard transforms for low-precision GEMMs.

Low-precision training recipes (QuEST, Quartet, Tseng et al.'s "Training LLMs with MXFP4",
NVIDIA's NVFP4 pretraining recipe) rotate *both* operands of a GEMM along the contraction axis by
the same orthonormal block-diagonal Hadamard matrix ``R = I ⊗ (H_b · diag(s))`` before quantizing
them. Because ``R`` is orthogonal, ``(X R)(Rᵀ W) = X W`` exactly, so only quantization error
changes -- and the rotation spreads outliers evenly over each block, which shrinks the block scale
and the relative error of the quantized values.

* :func:`hadamard` applies ``H_b · diag(signs)`` to each run of ``block_size`` consecutive
  elements along ``axis``; :func:`inverse_hadamard` applies its inverse ``diag(signs) · H_b``.
  Apply ``hadamard`` with the same ``block_size`` and ``signs`` to both GEMM operands, each along
  its own contraction axis (``axis=-1`` of the activations, ``axis=0`` of a ``(K, N)`` weight).
* ``H_b`` is the orthonormal Sylvester (natural-order) Hadamard matrix
  ``H_b[i, j] = (-1)^popcount(i & j) / sqrt(b)``, :func:`hadamard_matrix`. It is symmetric and its
  own inverse, so without ``signs`` ``hadamard`` and ``inverse_hadamard`` are the same function.
* :func:`random_signs` draws the Rademacher vector ``signs`` of the randomized transform.

Numerics: float32 and float64 inputs are transformed in their own precision; every other float
dtype (bfloat16, float16, float8...) is upcast to float32, transformed, and rounded back once to
the input dtype. The output dtype always equals the input dtype.

Implementation: blocks of at most :data:`DENSE_MAX_BLOCK_SIZE` elements are multiplied by the dense
``b x b`` matrix (one GEMM, ``2b`` flops per element, at ``Precision.HIGHEST`` so GPUs do not drop
to TF32); larger blocks use the fast Walsh-Hadamard butterfly, ``log2(b)`` stages of add/subtract
(``log2(b)`` flops per element). Both paths are plain JAX, so they compose with ``jit``, ``vmap``,
``grad`` (the transform is linear: its VJP is its transpose ``diag(signs) · H_b``), ``scan`` and
``checkpoint``.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Key

# Largest block size transformed by the dense-matrix GEMM; larger blocks use the butterfly.
# Chosen on CPU: XLA:CPU on 2 shared cores (about +-30% noise), jit, float32 (4096, 4096) input
# with signs, min of 9-15 runs. Milliseconds, dense GEMM / butterfly:
#
#   block size      4      16      64     128     256     512    1024    2048    4096
#   axis=-1     24/47  48/114  53/123  63/164 137/216 163/192 318/241 633/204 1225/256
#   axis=0          -       - 120/169 175/148 173/196 285/172 396/210       - 1111/217
#
# The GEMM (2b flops per element) wins up to b = 256 (but for one noisy point) and the butterfly
# (log2(b) memory passes) from b = 1024; at b = 512 it depends on the axis. One check on an H100
# (same shape, float32 and bfloat16 input) put the crossover between 512 and 1024 there (b = 512:
# 0.54 / 0.69 ms along axis -1), so 256 is conservative on that GPU.
# test_dense_and_butterfly_paths_agree checks that the two paths agree.
DENSE_MAX_BLOCK_SIZE = 256

_BLOCK_RULE = "a power of two >= 2 (2, 4, 8, 16, ..., 4096, ...)"


# --------------------------------------------------------------------------- argument checks


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool ({value}).")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).") from None


def _check_block_size(block_size) -> int:
    block_size = _as_int(block_size, "block_size")
    if block_size < 2 or not _is_power_of_two(block_size):
        raise ValueError(f"block_size must be {_BLOCK_RULE}; got {block_size}.")
    return block_size


def _largest_power_of_two_divisor(n: int) -> int:
    return n & -n if n > 0 else 0


def _normalize_axis(axis, ndim: int) -> int:
    axis = _as_int(axis, "axis")
    if not -ndim <= axis < ndim:
        valid = f"{-ndim} .. {ndim - 1}" if ndim else "none: the input is a scalar"
        raise ValueError(f"axis {axis} is out of range for an array of rank {ndim} "
                         f"(valid: {valid}).")
    return axis % ndim


def _resolve_block_size(block_size, length: int, axis: int) -> int:
    hint = _largest_power_of_two_divisor(length)
    hint = f" The largest allowed block size that divides {length} is {hint}." if hint >= 2 else ""
    if block_size is None:
        if length < 2 or not _is_power_of_two(length):
            raise ValueError(
                f"block_size=None transforms the whole axis, so its length must be {_BLOCK_RULE}; "
                f"axis {axis} has length {length}. Pass a block_size that divides it.{hint}")
        return length
    block_size = _check_block_size(block_size)
    if length % block_size:
        raise ValueError(
            f"axis {axis} has length {length}, which is not a multiple of block_size={block_size}; "
            f"the axis length must be a whole number of blocks (block_size must be {_BLOCK_RULE} "
            f"that divides the axis length).{hint}")
    return block_size


def _compute_dtype(dtype) -> np.dtype:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"the Hadamard transform needs a floating-point input, got dtype {dtype}.")
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


# --------------------------------------------------------------------------- the two code paths


@functools.lru_cache(maxsize=16)
def _sylvester_signs(n: int) -> np.ndarray:
    """The unnormalized ±1 Sylvester Hadamard matrix of order ``n`` (int8, read-only)."""
    signs = np.ones((1, 1), np.int8)
    while signs.shape[0] < n:
        signs = np.block([[signs, signs], [signs, -signs]])
    signs.setflags(write=False)
    return signs


def _build_sylvester_matrix(n: int, dtype: np.dtype) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` as a read-only NumPy array."""
    scale = np.asarray(1.0 / math.sqrt(n)).astype(dtype)  # rounded once to dtype
    matrix = np.where(_sylvester_signs(n) > 0, scale, -scale)  # ±(rounded scale) is exact
    matrix.setflags(write=False)
    return matrix


_cached_sylvester_matrix = functools.lru_cache(maxsize=64)(_build_sylvester_matrix)


def _sylvester_matrix(n: int, dtype: np.dtype) -> np.ndarray:
    # Cache the small matrices the dense path uses on every trace; build large ones on demand.
    return (_cached_sylvester_matrix if n <= 1024 else _build_sylvester_matrix)(n, np.dtype(dtype))


def _dense_path(blocks, signs, inverse: bool, narrow: bool = False):
    """Transforms axis 2 of ``blocks`` (shape (pre, n_blocks, b, post)) by one GEMM with H_b.

    ``narrow``: ``blocks`` are bfloat16/float16 and the result float32: the GEMM multiplies them by
    the unnormalized ±1 matrix in their own dtype (exact products, float32 accumulation: tensor
    cores on a GPU) and the ``1/sqrt(b)`` is applied once to the float32 sums."""
    pre, n_blocks, b, post = blocks.shape
    # Row form: out[i] = sum_j matrix[j, i] * block[j]. H is symmetric, so matrix = H without signs;
    # forward H diag(s) gives matrix[j, i] = s_j H[j, i], inverse diag(s) H gives H[j, i] s_i.
    if narrow:
        matrix = jnp.asarray(_sylvester_signs(b), blocks.dtype)
        options = dict(preferred_element_type=jnp.float32)
    else:
        matrix = jnp.asarray(_sylvester_matrix(b, blocks.dtype))
        options = dict(precision=lax.Precision.HIGHEST)
    if signs is not None:
        matrix = matrix * (signs[None, :] if inverse else signs[:, None])
    if post == 1:  # the transformed axis is the minor one: a plain (rows, b) @ (b, b) GEMM
        out = jnp.matmul(blocks.reshape(pre * n_blocks, b), matrix, **options)
    elif narrow:  # XLA:CPU has no batched bf16 x bf16 -> f32 GEMM; the upcast one is the same
        gemm = lambda m, v: jnp.matmul(m.T, v, **options)  # noqa: E731
        out = lax.platform_dependent(
            matrix, blocks.reshape(pre * n_blocks, b, post), cuda=gemm,
            default=lambda m, v: gemm(m.astype(jnp.float32), v.astype(jnp.float32)))
    else:  # out[r, i, q] = sum_j matrix[j, i] * blocks[r, j, q]
        out = jnp.matmul(matrix.T, blocks.reshape(pre * n_blocks, b, post), **options)
    if narrow:
        out = out * np.float32(1.0 / math.sqrt(b))
    return out.reshape(blocks.shape)


def _butterfly_path(blocks, signs, inverse: bool):
    """Transforms axis 2 of ``blocks`` (shape (pre, n_blocks, b, post)) by the fast Walsh-Hadamard
    butterfly: stage ``s`` (of ``log2(b)``) replaces each pair of elements whose in-block indices
    differ only in bit ``s`` by their (sum, difference). The product of the stages is the Sylvester
    matrix ``H_2 ⊗ ... ⊗ H_2`` (unnormalized); the ``1/sqrt(b)`` is applied once at the end.
    """
    b = blocks.shape[2]
    post = blocks.shape[3]
    if signs is not None and not inverse:
        blocks = blocks * signs[:, None]
    y = blocks
    for stage in range(b.bit_length() - 1):
        # In row-major order the pair partners sit low * post elements apart, so one reshape to
        # (everything before bit s, bit s, everything after) exposes them as the middle axis.
        low = 1 << stage
        y = y.reshape(-1, 2, low * post)
        # split/concatenate rather than index/stack: they are each other's transposes, so the
        # autodiff VJP is again this butterfly (index/stack's VJP pads and adds: 1.6x slower).
        first, second = lax.split(y, (1, 1), axis=1)
        y = lax.concatenate([first + second, first - second], dimension=1)
    y = y.reshape(blocks.shape) * (1.0 / math.sqrt(b))  # weak-typed: keeps the compute dtype
    if signs is not None and inverse:
        y = y * signs[:, None]
    return y


def _transform(x, axis, block_size, signs, inverse: bool, path=None, out_dtype=None):
    """Checks the arguments (shapes only), then runs the jitted transform."""
    x = jnp.asarray(x)
    _compute_dtype(x.dtype)
    axis = _normalize_axis(axis, x.ndim)
    block_size = _resolve_block_size(block_size, x.shape[axis], axis)
    if signs is not None:
        signs = jnp.asarray(signs)
        if signs.shape != (block_size,):
            raise ValueError(f"signs must have shape (block_size,) = ({block_size},); "
                             f"got shape {signs.shape}.")
    if path is None:
        path = _dense_path if block_size <= DENSE_MAX_BLOCK_SIZE else _butterfly_path
    if out_dtype is not None:
        out_dtype = np.dtype(out_dtype)
        if not jnp.issubdtype(out_dtype, jnp.floating):
            raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}.")
    return _jitted_transform(x, signs, axis=axis, block_size=block_size, inverse=inverse,
                             path=path, out_dtype=out_dtype)


# Jitted so that eager calls compile once per configuration instead of dispatching every butterfly
# stage as its own op; inside an outer jit/vmap/grad it is simply inlined.
@functools.partial(jax.jit, static_argnames=("axis", "block_size", "inverse", "path", "out_dtype"))
def _jitted_transform(x, signs, *, axis: int, block_size: int, inverse: bool, path, out_dtype):
    out_dtype = x.dtype if out_dtype is None else out_dtype
    narrow = (path is _dense_path and x.dtype in (jnp.bfloat16, jnp.float16)
              and out_dtype == jnp.float32)
    compute_dtype = x.dtype if narrow else _compute_dtype(x.dtype)
    if signs is not None:
        signs = signs.astype(compute_dtype)
    pre = math.prod(x.shape[:axis])
    post = math.prod(x.shape[axis + 1:])
    blocks = x.astype(compute_dtype).reshape(pre, x.shape[axis] // block_size, block_size, post)
    out = path(blocks, signs, inverse, narrow=True) if narrow else path(blocks, signs, inverse)
    return out.reshape(x.shape).astype(out_dtype)


# --------------------------------------------------------------------------- public API


def hadamard_matrix(n: int, dtype=jnp.float32) -> Float[Array, "n n"]:
    """The dense orthonormal Sylvester Hadamard matrix of order ``n``.

    ``H[i, j] = (-1)^popcount(i & j) / sqrt(n)``, built by the Sylvester recursion
    ``H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2)``. It is symmetric and orthogonal (``H @ H = I``).
    This is the matrix :func:`hadamard` applies to each block (without ``signs``).

    Args:
      n: the order, a power of two (``n = 1`` gives ``[[1]]``).
      dtype: a float dtype; the entries are ``±1/sqrt(n)`` rounded once to it.

    Returns:
      An ``(n, n)`` array of ``dtype``.

    Example:
      >>> hadamard_matrix(2)
      Array([[ 0.70710677,  0.70710677],
             [ 0.70710677, -0.70710677]], dtype=float32)
    """
    n = _as_int(n, "n")
    if not _is_power_of_two(n):
        raise ValueError(f"n must be a power of two (1, 2, 4, 8, ...); got {n}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a float dtype, got {dtype}.")
    return jnp.asarray(_sylvester_matrix(n, jnp.dtype(dtype)))


def random_signs(key: Key[Array, ""], block_size: int,
                 dtype=jnp.float32) -> Float[Array, "block_size"]:
    """A Rademacher vector (independent, equally likely ±1) for the randomized Hadamard transform.

    The same key always gives the same signs; use one vector for both operands of a GEMM.

    Args:
      key: a JAX PRNG key (``jax.random.key(seed)``; legacy ``PRNGKey`` keys work too).
      block_size: the length, the ``block_size`` of the transform (a power of two >= 2).
      dtype: a float dtype for the values (exactly ``-1`` or ``+1``).

    Returns:
      A ``(block_size,)`` array of ``dtype``.

    Example:
      >>> signs = random_signs(jax.random.key(0), 16)
      >>> signs.shape, sorted(set(np.asarray(signs).tolist()))
      ((16,), [-1.0, 1.0])
    """
    block_size = _check_block_size(block_size)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a float dtype, got {dtype}.")
    return jax.random.rademacher(key, (block_size,), dtype=jnp.int8).astype(dtype)


def hadamard(x: Float[Array, "..."], *, axis: int = -1, block_size: int | None = None,
             signs: Float[Array, "block_size"] | None = None,
             out_dtype=None) -> Float[Array, "..."]:
    """Orthonormal (randomized) Hadamard transform of consecutive blocks along ``axis``.

    Splits ``axis`` into blocks of ``block_size`` consecutive elements and maps each block ``v``
    to ``H_b @ (signs * v)``, with ``H_b = hadamard_matrix(block_size)``. The transform preserves
    norms; :func:`inverse_hadamard` undoes it. Rotating both GEMM operands along the contraction
    axis with the same ``block_size`` and ``signs`` leaves the product unchanged.

    Args:
      x: a float array of any rank. float32/float64 are transformed in their own precision, other
        float dtypes (bfloat16, float16, ...) in float32 and rounded back once.
      axis: the axis to transform (negative counts from the end); for a GEMM operand, its
        contraction axis.
      block_size: the block length, a power of two >= 2 that divides ``x.shape[axis]``. ``None``
        transforms the whole axis as one block (its length must then be a power of two).
      signs: an optional ``(block_size,)`` vector of ±1 (:func:`random_signs`), applied to each
        block before ``H_b`` (the randomized Hadamard transform). Values are not checked; anything
        other than ±1 makes the transform non-orthogonal.
      out_dtype: the result's dtype (default: ``x``'s). A bfloat16/float16 ``x`` with float32
        ``out_dtype`` and ``block_size <= DENSE_MAX_BLOCK_SIZE`` is multiplied in its own dtype by
        the ±1 matrix, with float32 accumulation (exact products; tensor cores on a GPU), and the
        sums are scaled by ``1/sqrt(block_size)``: what a quantized GEMM's backward operands use.

    Returns:
      The transformed array, with the shape of ``x`` and dtype ``out_dtype``.

    Raises:
      ValueError: ``block_size`` is not a power of two >= 2, the axis length is not a multiple
        of it, ``signs`` has the wrong shape, or ``axis`` is out of range.
      TypeError: ``x`` is not a floating-point array, or ``out_dtype`` not a float dtype.

    Example:
      >>> hadamard(jnp.array([1.0, 0.0, 0.0, 0.0]))
      Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
      >>> rng = np.random.default_rng(0)
      >>> x = rng.standard_normal((8, 64), np.float32)   # activations (M, K)
      >>> w = rng.standard_normal((64, 16), np.float32)  # weight (K, N)
      >>> s = random_signs(jax.random.key(0), 32)
      >>> xr = hadamard(x, axis=1, block_size=32, signs=s)
      >>> wr = hadamard(w, axis=0, block_size=32, signs=s)
      >>> np.allclose(xr @ wr, x @ w, atol=1e-4)
      True
    """
    return _transform(x, axis, block_size, signs, inverse=False, out_dtype=out_dtype)


def inverse_hadamard(x: Float[Array, "..."], *, axis: int = -1, block_size: int | None = None,
                     signs: Float[Array, "block_size"] | None = None,
                     out_dtype=None) -> Float[Array, "..."]:
    """The inverse of :func:`hadamard` with the same arguments: each block ``v`` maps to
    ``signs * (H_b @ v)``.

    ``inverse_hadamard(hadamard(x, **kw), **kw) == x`` up to rounding. Without ``signs`` it equals
    :func:`hadamard` (``H_b`` is symmetric and orthogonal). It is also the transpose of
    :func:`hadamard`, i.e. what a gradient through ``hadamard`` applies to the cotangent.

    Args:
      x: a float array of any rank (same dtype rules as :func:`hadamard`).
      axis: the axis to transform (negative counts from the end).
      block_size: the block length, a power of two >= 2 that divides ``x.shape[axis]``, or
        ``None`` for the whole axis.
      signs: the optional ``(block_size,)`` ±1 vector that was passed to :func:`hadamard`; applied
        after ``H_b``.
      out_dtype: the result's dtype, as for :func:`hadamard` (bfloat16/float16 ``x`` with float32
        ``out_dtype``: one GEMM in ``x``'s dtype with float32 accumulation).

    Returns:
      The transformed array, with the shape of ``x`` and dtype ``out_dtype`` (default ``x``'s).

    Raises:
      ValueError: as for :func:`hadamard`.
      TypeError: ``x`` is not a floating-point array.

    Example:
      >>> x = np.random.default_rng(0).standard_normal((4, 64), np.float32)
      >>> s = random_signs(jax.random.key(1), 16)
      >>> y = hadamard(x, block_size=16, signs=s)
      >>> np.allclose(inverse_hadamard(y, block_size=16, signs=s), x, atol=1e-6)
      True
    """
    return _transform(x, axis, block_size, signs, inverse=True, out_dtype=out_dtype)


__all__ = [
    "DENSE_MAX_BLOCK_SIZE",
    "hadamard",
    "hadamard_matrix",
    "inverse_hadamard",
    "random_signs",
]

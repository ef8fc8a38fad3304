"""Code tables for blockwise optimizer-state quantization, and the exact nearest-code search.

A *code table* is a sorted float32 vector of ``2**bits`` values in ``[-1, 1]``; an element is
stored as the index of the table entry nearest to ``x / absmax`` of its block.

Tables:

* :func:`dynamic_code` -- the dynamic ("dynamic tree") code of Dettmers et al., *8-bit Optimizers
  via Block-wise Quantization* (ICLR 2022). Each magnitude is a decade ``10**-e`` (``e`` = number
  of leading zero bits) times a linear fraction in ``(0.1, 1)``: the fewer the leading zeros, the
  more fraction bits, so large values get fine steps and small values a wide range (8 bits reach
  ``10**-6``). The signed code spends one bit on the sign; the unsigned code spends it on one more
  fraction bit per decade (twice the resolution).
* :func:`square_code` -- ``{(k / (2**bits - 1))**2}``: a uniform grid on the square root, used for
  4-bit non-negative blocks (second moments, which Adam uses through ``sqrt(nu)``: the grid is
  uniform in the quantity that matters, and reaches 1/225 of the block max instead of 1/15).

One deliberate change from the reference construction: the reference signed table has ``+1`` but
not ``-1`` (its most negative value is ``-0.9929``), so a block whose largest magnitude is negative
loses 0.7% on that element. Here ``-1`` is in the table and the smallest negative magnitude
(``-5.5e-7`` at 8 bits) is the one left out: the table stays 256 entries, exactly symmetric at the
top where it matters.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer


def _dynamic_magnitudes(bits: int, signed: bool) -> np.ndarray:
    """The fraction-times-decade magnitudes of the dynamic code (float64, ascending)."""
    decades = bits - 1  # at most bits-1 zero bits before the indicator bit
    magnitudes = []
    for i in range(decades):
        # Decade 10**(i - decades + 1) holds 2**i fractions (2**(i+1) unsigned): the midpoints of an
        # even split of [0.1, 1] into that many intervals.
        count = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, count + 1)
        magnitudes.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - decades + 1))
    return np.sort(np.concatenate(magnitudes))


@functools.cache
def dynamic_code(bits: int = 8, signed: bool = True) -> np.ndarray:
    """The dynamic (non-linear) code of 8-bit optimizers, as a sorted float32 table.

    Args:
      bits: code width (4 or 8 are used; any 3..8 works).
      signed: signed table (first moments) or unsigned table (second moments, any block >= 0).

    Returns:
      A sorted ``np.ndarray`` of ``2**bits`` distinct float32 values in ``[-1, 1]`` (``[0, 1]``
      unsigned), containing ``0`` and ``1`` (and ``-1`` when signed).

    Example:
      >>> t = dynamic_code(8, signed=False)
      >>> len(t), float(t[0]), float(t[-1]), round(float(t[1]), 12)
      (256, 0.0, 1.0, 3.25e-07)
    """
    if not 3 <= bits <= 8:
        raise ValueError(f"dynamic_code: bits must be in [3, 8], got {bits}.")
    magnitudes = _dynamic_magnitudes(bits, signed)
    if signed:
        values = np.concatenate([[0.0, 1.0, -1.0], magnitudes, -magnitudes[1:]])
    else:
        values = np.concatenate([[0.0, 1.0], magnitudes])
    table = np.sort(values).astype(np.float32)
    assert table.size == 2**bits and np.unique(table).size == 2**bits, table
    table.setflags(write=False)
    return table


@functools.cache
def square_code(bits: int = 4) -> np.ndarray:
    """The unsigned code ``{(k / (2**bits - 1))**2}`` as a sorted float32 table.

    Example:
      >>> [round(v, 4) for v in square_code(2).tolist()]
      [0.0, 0.1111, 0.4444, 1.0]
    """
    table = ((np.arange(2**bits, dtype=np.float64) / (2**bits - 1)) ** 2).astype(np.float32)
    table.setflags(write=False)
    return table


def nearest_code(v: Float[Array, "..."], tables: np.ndarray, table_index: Integer[Array, "..."],
                 *, positive_nonzero: Integer[Array, "..."] | bool = False,
                 uniform: Float[Array, "..."] | None = None) -> Integer[Array, "..."]:
    """Index of the table entry nearest to ``v``, by binary search, in one of several tables.

    ``tables`` stacks tables of equal power-of-two length ``n``; element ``v[i]`` is searched in
    ``tables[table_index[i]]``. A branchless binary search finds the first entry ``>= v`` (what
    ``jnp.searchsorted`` returns, kept in range), then the nearer of it and the entry below wins;
    a tie goes to the entry of smaller magnitude. The search is exact: only comparisons of ``v``
    with table values, no arithmetic on ``v`` beyond the two distances.

    Args:
      v: float32 values, normally in the table's range (values outside map to the end entries).
      tables: ``(m, n)`` float32, each row sorted ascending.
      table_index: int32 row of ``tables`` for each element (broadcastable to ``v``).
      positive_nonzero: where true, a positive ``v`` never maps to the entry ``0`` (it takes the
        smallest positive entry instead); see :mod:`qjax.optim.state` for why.
      uniform: optional uniform ``[0, 1)`` samples shaped like ``v``: stochastic rounding instead
        of nearest, i.e. the upper neighbour with probability ``(v - lo) / (hi - lo)``, so that
        ``E[table[index]] = v`` inside the table's range.

    Returns:
      int32 indices in ``[0, n)`` into the chosen row.

    Example:
      >>> t = np.array([[-1.0, 0.0, 0.5, 1.0]], np.float32)
      >>> nearest_code(jnp.array([0.2, 0.3, 0.25, -2.0]), t, jnp.zeros((), jnp.int32)).tolist()
      [1, 2, 1, 0]
    """
    tables = np.asarray(tables, np.float32)
    rows, n = tables.shape
    if n & (n - 1):
        raise ValueError(f"nearest_code: table length must be a power of two, got {n}.")
    flat = jnp.asarray(tables.reshape(-1))
    base = jnp.asarray(table_index, jnp.int32) * n
    # pos = number of entries < v (capped at n - 1): the classic branchless lower-bound search.
    pos = jnp.zeros(jnp.broadcast_shapes(v.shape, base.shape), jnp.int32)
    step = n // 2
    while step >= 1:
        probe = flat[base + pos + (step - 1)]
        pos = jnp.where(probe < v, pos + step, pos)
        step //= 2
    hi = jnp.clip(pos, 1, n - 1)
    lo = hi - 1
    t_hi, t_lo = flat[base + hi], flat[base + lo]
    d_hi, d_lo = t_hi - v, v - t_lo
    if uniform is None:
        take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (jnp.abs(t_hi) < jnp.abs(t_lo)))
    else:
        take_hi = (uniform * (t_hi - t_lo) < d_lo) | (d_hi <= 0)
    index = jnp.where(take_hi, hi, lo)
    if positive_nonzero is not False:
        zero_at = jnp.asarray(np.argmin(np.abs(tables), axis=1).astype(np.int32))[table_index]
        bump = jnp.asarray(positive_nonzero) & (v > 0) & (index == zero_at)
        index = jnp.where(bump, index + 1, index)
    return index


def lookup(index: Integer[Array, "..."], tables: np.ndarray,
           table_index: Integer[Array, "..."]) -> Float[Array, "..."]:
    """``tables[table_index, index]`` as float32 (the inverse of :func:`nearest_code`)."""
    tables = np.asarray(tables, np.float32)
    flat = jnp.asarray(tables.reshape(-1))
    return flat[jnp.asarray(table_index, jnp.int32) * tables.shape[1] + index.astype(jnp.int32)]

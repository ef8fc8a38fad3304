"""Storage accounting: the bytes an optimizer state (and the params) really occupy."""

from __future__ import annotations

import jax
import numpy as np


def _leaf_bytes(x) -> int:
    if x is None or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return 0
    dtype = x.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # typed key arrays: count the key data
        data = jax.eval_shape(jax.random.key_data, x)
        return int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    return int(np.prod(x.shape)) * np.dtype(dtype).itemsize


def state_bytes(tree) -> int:
    """Bytes of every array in ``tree``: codes, scales, block info, keys, buffers, counts.

    Works on concrete arrays and on ``jax.ShapeDtypeStruct`` trees (``jax.eval_shape(opt.init,
    params)``), so the figure for a large model costs no memory.

    Args:
      tree: an optimizer state (or any pytree of arrays).

    Returns:
      The total size in bytes (``size * itemsize`` summed over leaves; Python scalars count 0).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state_bytes(optax.adam(1e-3).init({"w": jnp.zeros((1000,))}))
      8004
    """
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def param_count(params) -> int:
    """Number of scalar parameters in ``params``."""
    return sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params))


def bytes_per_param(state, params, *, include_params: bool = False) -> float:
    """Bytes of ``state`` (plus ``params`` when ``include_params``) per scalar parameter.

    Args:
      state: an optimizer state (arrays or ``ShapeDtypeStruct``).
      params: the parameters (arrays or ``ShapeDtypeStruct``).
      include_params: add the parameters' own storage (bf16 weights: 2 bytes each).

    Returns:
      ``(state_bytes(state) [+ state_bytes(params)]) / param_count(params)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.zeros((1000, 1000))}
      >>> round(bytes_per_param(optax.adam(1e-3).init(params), params, include_params=True), 3)
      12.0
    """
    total = state_bytes(state) + (state_bytes(params) if include_params else 0)
    return total / param_count(params)

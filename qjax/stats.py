"""Numerics statistics of quantization: SNR, clipping, flush-to-zero, amax; the noise check.

Everything here is a pure function of an array and a format (it builds only on
:mod:`qjax.quantize`); the Flax layers in :mod:`qjax.nn` / :mod:`qjax.nnx` call
:func:`quantization_stats` on their GEMM operands when ``collect_stats=True`` and ``sow`` the
result into the ``"qjax_stats"`` collection. :func:`flatten_stats` turns that collection into a
flat ``{"path/operand/stat": value}`` dict for logging.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from qjax import formats as F
from qjax.quantize import QArray, ScaleMode, _element_storage, quantize

STATS_COLLECTION = "qjax_stats"

# Chmiel et al., "FP4 All the Way: Fully Quantized Training of LLMs" (arXiv:2505.19115):
# quantized training stops helping once the gradient norm falls below about sqrt(3) times the
# norm of the quantization noise.
FP4_ALL_THE_WAY_THRESHOLD = math.sqrt(3.0)


def _group_top(x, q: QArray, fmt: F.Format):
    """The largest magnitude each element's group can represent (element max times its scale)."""
    if fmt.scaling is None:
        return jnp.full(x.shape, fmt.element.max, jnp.float32)
    top = _element_storage(jnp.full(x.shape, fmt.element.max, jnp.float32), fmt.element)
    return dataclasses.replace(q, values=top).dequantize(jnp.float32)


def quantization_stats(x: Float[Array, "..."], fmt: F.FormatLike, *, axis: int = -1,
                       scale_mode: ScaleMode = "floor") -> dict[str, Array]:
    """Statistics of quantizing ``x`` to ``fmt`` with round-to-nearest.

    Args:
      x: the array (a GEMM operand).
      fmt: a format name or :class:`~qjax.formats.Format`.
      axis: the axis blocks run along (the operand's contraction axis).
      scale_mode: as :func:`qjax.quantize`.

    Returns:
      A dict of float32 scalars: ``snr_db`` (``10 log10(sum x^2 / sum (x - q)^2)``, ``inf`` when
      exact), ``clipped`` (fraction of elements whose magnitude exceeds the largest value their
      group can represent, so they saturate), ``flushed`` (fraction of non-zero elements that
      quantize to zero), ``amax`` (``max |x|``) and ``noise_norm`` (``||x - q||_2``).

    Example:
      >>> s = quantization_stats(jax.random.normal(jax.random.key(0), (64, 64)), "mxfp4")
      >>> float(s["snr_db"]) > 10
      True
    """
    x = jax.lax.stop_gradient(jnp.asarray(x))
    fmt = F.get(fmt)
    q = quantize(x, fmt, axis=axis, scale_mode=scale_mode)
    xf = x.astype(jnp.float32)
    qf = q.dequantize(jnp.float32)
    noise = jnp.sum(jnp.square(xf - qf))
    signal = jnp.sum(jnp.square(xf))
    snr_db = jnp.where(noise > 0, 10.0 * jnp.log10(signal / jnp.where(noise > 0, noise, 1.0)),
                       jnp.inf)
    size = np.float32(max(x.size, 1))
    clipped = jnp.sum(jnp.abs(xf) > _group_top(xf, q, fmt)) / size
    flushed = jnp.sum((xf != 0) & (qf == 0)) / size
    return {"snr_db": snr_db.astype(jnp.float32), "clipped": clipped.astype(jnp.float32),
            "flushed": flushed.astype(jnp.float32), "amax": jnp.max(jnp.abs(xf)),
            "noise_norm": jnp.sqrt(noise)}


def flatten_stats(stats, prefix: str = "") -> dict[str, Array]:
    """Flattens a (nested) ``"qjax_stats"`` collection into ``{"a/b/operand/stat": value}``.

    Args:
      stats: the collection as returned by ``apply(..., mutable=["qjax_stats"])`` (the inner dict,
        or the whole variables dict with a ``"qjax_stats"`` key), or an NNX ``nnx.state`` of the
        stats variables (pure dict or State).
      prefix: prepended to every key.

    Returns:
      A flat dict of arrays keyed by ``/``-joined paths.

    Example:
      >>> flatten_stats({"Dense_0": {"qjax": {"lhs": {"amax": 1.0}}}})
      {'Dense_0/qjax/lhs/amax': 1.0}
    """
    if hasattr(stats, "to_pure_dict"):  # a flax.nnx State
        from flax import nnx  # lazy: only NNX users pass one

        stats = nnx.to_pure_dict(stats)
    if isinstance(stats, dict) and STATS_COLLECTION in stats:
        stats = stats[STATS_COLLECTION]
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        flat["/".join(([prefix] if prefix else []) + names)] = leaf
    return flat


def noise_to_gradient_check(grad_norm: Float[Array, ""], noise_norm: Float[Array, ""], *,
                            threshold: float = FP4_ALL_THE_WAY_THRESHOLD) -> dict[str, Array]:
    """The "FP4 All the Way" criterion: is the gradient still larger than the quantization noise?

    Chmiel et al. (arXiv:2505.19115, Sec. 5) find that quantized training stops making progress
    once ``||grad|| < sqrt(3) * ||quantization noise||``; past that point switch to higher precision
    (their quantization-aware fine-tuning phase).

    Args:
      grad_norm: the L2 norm of the full-precision gradient (e.g. ``optax.global_norm(grads)``).
      noise_norm: the L2 norm of the quantization noise of the same gradient (for example
        ``quantization_stats(g, fmt)["noise_norm"]`` summed in quadrature over the tensors).
      threshold: the ratio below which low precision stops helping (``sqrt(3)`` in the paper).

    Returns:
      ``{"ratio": grad_norm / noise_norm, "low_precision_effective": ratio >= threshold}``.

    Example:
      >>> noise_to_gradient_check(jnp.float32(1.0), jnp.float32(0.1))["low_precision_effective"]
      Array(True, dtype=bool)
    """
    grad_norm = jnp.asarray(grad_norm, jnp.float32)
    noise_norm = jnp.asarray(noise_norm, jnp.float32)
    ratio = jnp.where(noise_norm > 0, grad_norm / jnp.where(noise_norm > 0, noise_norm, 1.0),
                      jnp.inf)
    return {"ratio": ratio, "low_precision_effective": ratio >= threshold}


def gradient_noise_check(grads, fmt: F.FormatLike, *, axis: int = -1,
                         threshold: float = FP4_ALL_THE_WAY_THRESHOLD) -> dict[str, Array]:
    """:func:`noise_to_gradient_check` for a whole gradient pytree quantized to ``fmt``.

    Args:
      grads: a pytree of gradient arrays.
      fmt: the format the gradients are quantized to in the backward pass.
      axis: the axis blocks run along (rank-1 leaves use their only axis).
      threshold: as :func:`noise_to_gradient_check`.

    Returns:
      As :func:`noise_to_gradient_check`, plus ``grad_norm`` and ``noise_norm``.

    Example:
      >>> g = {"w": jax.random.normal(jax.random.key(0), (32, 32))}
      >>> bool(gradient_noise_check(g, "mxfp8")["low_precision_effective"])
      True
    """
    leaves = [jnp.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    grad_sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves)
    noise_sq = sum(jnp.square(quantization_stats(g, fmt, axis=axis if g.ndim > 1 else -1)
                              ["noise_norm"]) for g in leaves)
    out = noise_to_gradient_check(jnp.sqrt(grad_sq), jnp.sqrt(noise_sq), threshold=threshold)
    return {**out, "grad_norm": jnp.sqrt(grad_sq), "noise_norm": jnp.sqrt(noise_sq)}

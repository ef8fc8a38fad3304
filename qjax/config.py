"""Library-wide switches.

``use_kernels(False)`` makes every op that would dispatch to a fused Pallas kernel on the GPU
(``qjax.fake_quant``, ``qjax.quantize``, the rotated bf16 and the NVFP4 operands of
``qjax.ops.dot_general``, the fused ``qjax.optim.adamw`` update) take its plain-JAX reference path
instead: for debugging, for A/B comparisons and benchmarks. The choice is made when a function is
traced, so it applies to functions traced inside the context. JAX caches traces per Python function
(``jax.jit(f)`` made twice shares them), so entering the context clears JAX's caches when it
changes the setting: everything traced inside is traced afresh, and a function jitted and compiled
inside keeps its kernel-free executable when called after it (A/B timing). A function first traced
inside and jitted anew after the context may still reuse that trace: jit a fresh function there
(``jax.jit(lambda *a: f(*a))``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_KERNELS = contextvars.ContextVar("qjax_kernels", default=True)


def kernels_enabled() -> bool:
    """Whether ops may dispatch to fused Pallas kernels (default ``True``)."""
    return _KERNELS.get()


def single_gpu() -> bool:
    """Whether JAX runs on exactly one GPU: where the kernels are dispatched (arrays sharded over
    several devices would need a ``shard_map`` around them)."""
    return jax.default_backend() == "gpu" and jax.device_count() == 1


@contextlib.contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Context manager: allow (``True``) or forbid (``False``) the fused Pallas kernels.

    Args:
      enabled: whether ops traced inside the context may use the kernels.

    Example:
      >>> x = jnp.linspace(-1.0, 1.0, 64)
      >>> with qjax.use_kernels(False):
      ...     y = qjax.fake_quant(x, "mxfp4")   # XLA's version, on any backend
      >>> y.shape
      (64,)
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"use_kernels takes True or False, got {enabled!r}.")
    changed = enabled != _KERNELS.get()
    token = _KERNELS.set(enabled)
    if changed:
        jax.clear_caches()
    try:
        yield
    finally:
        _KERNELS.reset(token)

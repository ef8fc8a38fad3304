"""Shared timing helpers for the benchmark scripts (median of many runs after warm-up)."""

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, warmup: int = 3, repeats: int = 30, calls_per_repeat: int = 10) -> float:
    """Median wall time of one call of ``fn(*args)``; each repeat queues ``calls_per_repeat``
    asynchronous calls and waits for the last, so dispatch overlaps device work."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls_per_repeat):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls_per_repeat)
    return statistics.median(samples)


def environment() -> str:
    import datetime
    import platform

    device = jax.devices()[0]
    return (f"{datetime.date.today()} | {device.device_kind} | JAX {jax.__version__} | "
            f"Python {platform.python_version()}")


def same_bits(tree_a, tree_b) -> bool:
    """Whether two pytrees of arrays (e.g. two QArrays) hold the same bits, leaf by leaf."""
    def bits(a):
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
        return a if a.dtype == width else jax.lax.bitcast_convert_type(a, width)

    return all(bool(jnp.all(bits(a) == bits(b)))
               for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True))

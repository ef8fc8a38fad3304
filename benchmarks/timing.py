"""Shared timing helpers for the benchmark scripts (median of many runs after warm-up)."""

import collections
import gzip
import json
import pathlib
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


def top_kernels(trace_file: pathlib.Path, steps: int, count: int) -> list[tuple[float, int, str]]:
    """(ms per step, launches per step, name) of the longest device kernels in a perfetto trace."""
    events = json.loads(gzip.open(trace_file).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and "/device:" in e["args"]["name"]}
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and e["pid"] in devices:
            totals[e["name"]][0] += e.get("dur", 0.0)
            totals[e["name"]][1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [(us / 1e3 / steps, n // steps, name) for name, (us, n) in ranked]

"""Where the fused AdamW kernel on the GPU differs from its reference run on the CPU (issue 7).

    python benchmarks/adamw_kernel_diff.py

For one random tensor: per output (new weight, mu/nu codes, scales, block info) the number of
differing elements and the largest difference (in codes, or in float32 ulps for floats).
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_pallas_adamw import _inputs  # noqa: E402

from qjax.pallas import adamw_8bit as K  # noqa: E402


def _describe(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype == jnp.bfloat16:
        got, want = got.astype(np.float32), want.astype(np.float32)
    differ = got != want
    if not differ.any():
        print(f"{name:18s} identical ({got.size} elements)")
        return
    if got.dtype.kind == "f":
        ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
        worst = f"max {ulps.max()} float32 ulps (bf16 ulp = 65536)"
    else:
        worst = f"max |code difference| {np.abs(got.astype(np.int64) - want.astype(np.int64)).max()}"
    index = np.argwhere(differ)[:3].tolist()
    print(f"{name:18s} {differ.sum()} of {got.size} differ; {worst}; e.g. at {index}: "
          f"{got[differ][:3]} vs {want[differ][:3]}")


def main():
    for shape, mode in [((64, 4096), "bf16_sr"), ((16, 2048), "fp32")]:
        dtype = jnp.bfloat16 if mode == "bf16_sr" else jnp.float32
        args = _inputs(shape, 11, dtype)
        kw = dict(param_mode=mode, decay_bf16=mode == "bf16_sr")
        got = jax.device_get(K.adamw_8bit_pallas(*args, **kw))
        cpu = jax.devices("cpu")[0]
        with jax.default_device(cpu):
            want = jax.device_get(jax.jit(functools.partial(K.adamw_8bit_reference, **kw))(
                *jax.device_put(args, cpu)))
        print(f"--- {shape} {mode}")
        names = ["param", "mu codes", "mu scales", "mu info", "nu codes", "nu scales", "nu info"]
        for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
            _describe(name, g, w)


if __name__ == "__main__":
    main()

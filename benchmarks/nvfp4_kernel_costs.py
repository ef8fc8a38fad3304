"""What each part of the NVFP4 fake-quant kernel costs on the GPU (issue 6), against `x * 2`.

    python benchmarks/nvfp4_kernel_costs.py [--size 8192] [--configs 8x512x4,16x256x4]

On a bf16 (size, size) array, quantized along the last axis, RTN and SR: `x * 2` (one read, one
write), XLA's tensor amax alone (one read), XLA's `qjax.fake_quant(x, "nvfp4")`, the kernel
(`fake_quant_pallas`, as the GEMM operands take it: bf16 values without the tensor scale) at each
tile configuration (block_rows x block_cols x num_warps), and ablations at the first one. An
ablation swaps one part for a trivial stand-in of the same shapes (results are wrong, only the
time means something): ``no tensor amax`` (the XLA reduction before the kernel replaced by a
constant), ``cheap block scale`` (no E4M3 rounding of the block scales), ``cheap reciprocal`` (the
divisor itself), ``cheap rounding`` (no rounding of the elements; SR keeps one random bit), ``io
only`` (all four). The difference to the full kernel is that part's cost. Medians over many runs
after warm-up (``timing.median_seconds``), all in one run.
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax.pallas import fake_quant as FQ
from timing import environment, median_seconds


def _no_tensor_amax(x, fmt):
    return jnp.array([1.0, 1.0], jnp.float32) * (x.size % 3 + 1)


def _cheap_block_scale(amax_bits, fmt, tensor_scale, tensor_reciprocal):
    value = FQ._from_bits(amax_bits) * np.float32(1 / 6)
    return value, value if tensor_scale is None else value * tensor_scale


def _cheap_reciprocal(d, **_):
    return d


def _cheap_round_nearest(b, element, scale_exponent, **_):
    return b


def _cheap_round_stochastic(b, element, scale_exponent, random_bits, **_):
    return b ^ (random_bits & 1)


ABLATIONS = {
    "no tensor amax": {"_tensor_amax_scale": _no_tensor_amax},
    "cheap block scale": {"_float_scale": _cheap_block_scale},
    "cheap reciprocal": {"_reciprocal_fast": _cheap_reciprocal},
    "cheap rounding": {"_round_nearest": _cheap_round_nearest,
                       "_round_stochastic": _cheap_round_stochastic},
}
ABLATIONS["io only"] = {k: v for patch in ABLATIONS.values() for k, v in patch.items()}


@contextlib.contextmanager
def patched(replacements):
    saved = {name: getattr(FQ, name) for name in replacements}
    for name, fn in replacements.items():
        setattr(FQ, name, fn)
    jax.clear_caches()  # the kernel wrapper is a module-level jit: retrace under the patch
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(FQ, name, fn)
        jax.clear_caches()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--configs", default="8x512x4,16x256x4,32x256x4,8x256x4,4x1024x4,16x512x8")
    args = parser.parse_args()
    n = args.size
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    x = (x * 2.0 ** jax.random.randint(jax.random.key(1), (n, 1), -8, 8)).astype(jnp.bfloat16)
    key = jax.random.key(2)
    t_copy = median_seconds(jax.jit(lambda x: x * 2), x)
    print(f"{environment()} | ({n}, {n}) bf16 | x * 2: {t_copy * 1e6:.1f} us | jax {jax.__version__}")
    rows = []

    def add(label, rounding, fn, *operands):
        t = median_seconds(jax.jit(fn), *operands)
        rows.append((label, rounding, t))
        print(f"  {label} {rounding}: {t * 1e6:.1f} us ({t / t_copy:.2f}x)", flush=True)

    add("tensor amax (XLA reduction)", "", lambda x: jnp.max(jnp.abs(x)), x)
    add("mxfp4 kernel", "nearest", lambda x: FQ.fake_quant_pallas(x, "mxfp4"), x)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    for rounding in ("nearest", "stochastic"):
        k = key if rounding == "stochastic" else None
        with qjax.use_kernels(False):
            add("XLA qjax.fake_quant", rounding,
                lambda x, k: qjax.fake_quant(x, "nvfp4", rounding=rounding, key=k), x, k)
        expected = None
        for r, c, w in configs:
            def kernel(x, k, r=r, c=c, w=w):
                return FQ.fake_quant_pallas(x, "nvfp4", rounding=rounding, key=k, block_rows=r,
                                            block_cols=c, num_warps=w, out_dtype=jnp.bfloat16,
                                            split_tensor_scale=True)[0]

            got = np.asarray(jax.jit(kernel)(x, k)).view(np.uint16)
            expected = got if expected is None else expected
            assert np.array_equal(got, expected), f"{r}x{c}x{w} differs from {configs[0]}"
            add(f"kernel {r}x{c}x{w}", rounding, kernel, x, k)
        r, c, w = configs[0]
        for name, replacements in ABLATIONS.items():
            with patched(replacements):
                add(f"kernel {r}x{c}x{w}, {name}", rounding,
                    lambda x, k: FQ.fake_quant_pallas(
                        x, "nvfp4", rounding=rounding, key=k, block_rows=r, block_cols=c,
                        num_warps=w, out_dtype=jnp.bfloat16, split_tensor_scale=True)[0], x, k)
    print(f"\n{environment()} | ({n}, {n}) bf16 | jax {jax.__version__}")
    print("| part | rounding | us | / x*2 |")
    print("|---|---|---|---|")
    print(f"| x * 2 | | {t_copy * 1e6:.1f} | 1.00 |")
    for label, rounding, t in rows:
        print(f"| {label} | {rounding} | {t * 1e6:.1f} | {t / t_copy:.2f} |")


if __name__ == "__main__":
    main()

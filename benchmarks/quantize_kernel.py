"""Block configurations of the fused quantize kernel (qjax/pallas/quantize.py) against `x * 2`.

    python benchmarks/quantize_kernel.py [--size 8192] [--formats mxfp4,mxfp8]

Each configuration is checked bit for bit against XLA's `qjax.quantize` first.
"""

import argparse

import jax
import jax.numpy as jnp

import qjax
from qjax.pallas import quantize_pallas
from timing import environment, median_seconds, same_bits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--formats", default="mxfp4,mxfp8")
    parser.add_argument("--configs", default="8x512x4,4x1024x4,16x512x8,4x2048x8,32x256x4")
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.bfloat16)
    t_copy = median_seconds(jax.jit(lambda x: x * 2), x)
    print(f"{environment()} | {args.size}x{args.size} bf16 | x * 2: {t_copy * 1e6:.1f} us")
    print("| format | XLA quantize (us) | config rows x cols x warps | kernel (us) | kernel / x*2 | bit-identical |")
    print("|---|---|---|---|---|---|")
    for name in args.formats.split(","):
        with qjax.use_kernels(False):
            xla = jax.jit(lambda x, name=name: qjax.quantize(x, name))
            reference = xla(x)
        t_xla = median_seconds(xla, x)
        for config in args.configs.split(","):
            rows, cols, warps = map(int, config.split("x"))
            fn = jax.jit(lambda x, name=name, rows=rows, cols=cols, warps=warps: quantize_pallas(
                x, name, block_rows=rows, block_cols=cols, num_warps=warps,
                interpret=jax.default_backend() != "gpu"))  # CPU: a smoke run of the script
            out = fn(x)
            same = same_bits(out, reference)
            t = median_seconds(fn, x)
            print(f"| {name} | {t_xla * 1e6:.1f} | {config} | {t * 1e6:.1f} | {t / t_copy:.2f} | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()

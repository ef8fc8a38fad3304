"""fake_quant / quantize / dequantize throughput against an elementwise read+write of the same array.

    python benchmarks/quantize_bandwidth.py [--size 8192] [--formats mxfp4,nvfp4,mxfp8,fp8_e4m3]

The baseline is ``x * 2`` on the same bf16 array under jit: one read and one write, the floor for
any elementwise pass. Ratios are measured in the same run.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp

import qjax
from timing import environment, median_seconds, same_bits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--formats", default="mxfp4,nvfp4,mxfp8,mxfp6_e3m2,fp8_e4m3,int8")
    args = parser.parse_args()
    n = args.size
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    nbytes = x.size * x.dtype.itemsize

    copy = jax.jit(lambda x: x * 2)
    t_copy = median_seconds(copy, x)
    rows = [("x * 2 (read+write)", t_copy, 2 * nbytes)]
    for name in args.formats.split(","):
        fq = jax.jit(lambda x, name=name: qjax.fake_quant(x, name))
        rows.append((f"fake_quant {name}", median_seconds(fq, x), 2 * nbytes))
        q = jax.jit(lambda x, name=name: qjax.quantize(x, name))
        packed = q(x)
        out_bytes = packed.values.size * packed.values.dtype.itemsize + packed.scales.size * packed.scales.dtype.itemsize
        rows.append((f"quantize {name}", median_seconds(q, x), nbytes + out_bytes))
        with qjax.use_kernels(False):  # XLA's version, where the line above used a kernel
            q_xla = jax.jit(lambda x, name=name: qjax.quantize(x, name))
            reference = q_xla(x)
        same = same_bits(packed, reference)
        rows.append((f"quantize {name}, XLA only (use_kernels(False)); same bits as above: {same}",
                     median_seconds(q_xla, x), nbytes + out_bytes))
        dq = jax.jit(lambda q: q.dequantize())
        rows.append((f"dequantize {name}", median_seconds(dq, packed), nbytes + out_bytes))
        fusions = fq.lower(x).compile().as_text().count("fusion(")
        print(f"{name}: fake_quant compiles to {fusions} fusion call(s)")

    print(f"\n{environment()} | array {n}x{n} bf16")
    print("| op | time (us) | ratio to x*2 | GB/s (bytes that must move) |")
    print("|---|---|---|---|")
    results = []
    for label, t, moved in rows:
        print(f"| {label} | {t * 1e6:.1f} | {t / t_copy:.2f} | {moved / t / 1e9:.0f} |")
        results.append({"op": label, "seconds": t, "ratio": t / t_copy, "bytes": moved})
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "quantize_bandwidth.json"), "w") as f:
            json.dump({"environment": environment(), "size": n, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()

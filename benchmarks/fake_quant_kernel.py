"""The fused Pallas fake-quant kernel against XLA's ``qjax.fake_quant`` and an elementwise read+write.

    python benchmarks/fake_quant_kernel.py [--size 8192] [--formats mxfp4,mxfp8,mxfp6_e3m2,nvfp4]
                                           [--sweep mxfp4] [--configs 16x512x4,8x1024x4] [--axis 0]

Each format is first checked bit for bit against ``jax.jit(qjax.fake_quant)`` on the benchmark
array (bf16, random normal with per-row scales), then timed: ``x * 2`` under jit (one read and one
write, the floor of any elementwise pass), ``jax.jit(qjax.fake_quant)``, and the kernel for each
block configuration (block_rows x block_cols x num_warps). The ``--sweep`` formats are timed on every
configuration, the others on the three fastest of the sweep plus the default. Medians over many runs
after warm-up (``timing.median_seconds``), all in one run. JSON goes to ``$OUT`` when set.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax.pallas import fake_quant as fq_kernel
from qjax.pallas import fake_quant_pallas
from timing import environment, median_seconds

SWEEP = ("8x512x4,16x512x4,16x512x8,32x256x4,8x1024x4,8x1024x8,16x1024x8,32x512x8,4x2048x8,"
         "64x256x8,2x2048x4")


def parse(config):
    rows, cols, warps = (int(v) for v in config.split("x"))
    return rows, cols, warps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--formats", default="mxfp4,mxfp8,mxfp6_e3m2,mxint8,int4,nvfp4")
    parser.add_argument("--sweep", default="mxfp4", help="formats timed on every configuration")
    parser.add_argument("--configs", default=SWEEP)
    parser.add_argument("--axis", type=int, default=-1,
                        help="the quantized axis (0: the wgrad layout; block_rows is then the "
                             "number of consecutive columns a program takes)")
    args = parser.parse_args()
    n = args.size
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    x = (x * 2.0 ** jax.random.randint(jax.random.key(1), (n, 1), -8, 8)).astype(jnp.bfloat16)
    nbytes = x.size * x.dtype.itemsize
    configs = [parse(c) for c in args.configs.split(",")]
    default = (fq_kernel.DEFAULT_BLOCK_ROWS, fq_kernel.DEFAULT_BLOCK_COLS,
               fq_kernel.DEFAULT_NUM_WARPS)
    out_dir = os.environ.get("OUT")

    t_copy = median_seconds(jax.jit(lambda x: x * 2), x)
    rows = [("x * 2 (read+write)", "", t_copy)]
    results = {"environment": environment(), "jax": jax.__version__, "size": n,
               "copy_seconds": t_copy, "formats": {}}

    def flush():
        if out_dir:
            with open(os.path.join(out_dir, "fake_quant_kernel.json"), "w") as f:
                json.dump(results, f, indent=1)

    swept = {}
    for name in args.formats.split(","):
        ref_fn = jax.jit(lambda x, name=name: qjax.fake_quant(x, name, axis=args.axis))
        start = time.perf_counter()
        expected = np.asarray(ref_fn(x)).view(np.uint16)
        compile_ref = time.perf_counter() - start
        entry = {"xla_seconds": median_seconds(ref_fn, x), "xla_compile_seconds": compile_ref,
                 "kernel": []}
        rows.append((f"jit(qjax.fake_quant) {name}", "XLA", entry["xla_seconds"]))
        if name in args.sweep.split(",") or not swept:
            todo = configs
        else:
            best = sorted(swept, key=swept.get)[:3]
            todo = best + [default] if default not in best else best
        for rows_, cols, warps in todo:
            fn = jax.jit(lambda x, name=name, r=rows_, c=cols, w=warps: fake_quant_pallas(
                x, name, block_rows=r, block_cols=c, num_warps=w, axis=args.axis))
            label = f"{rows_}x{cols}x{warps or 'default'}"
            try:
                start = time.perf_counter()
                got = np.asarray(fn(x)).view(np.uint16)
                compile_s = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                entry["kernel"].append({"config": label, "error": str(e)[:2000]})
                continue
            mismatches = int(np.sum(got != expected))
            t = median_seconds(fn, x)
            if name in args.sweep.split(","):
                swept[(rows_, cols, warps)] = t
            print(f"{name} {label}: {t * 1e6:.1f} us, {t / t_copy:.2f}x copy, "
                  f"mismatches {mismatches}, compile {compile_s:.1f}s", flush=True)
            entry["kernel"].append({"config": label, "seconds": t, "mismatches": mismatches})
            rows.append((f"fake_quant_pallas {name}", label + ("" if mismatches == 0 else
                                                               f" ({mismatches} MISMATCHES)"), t))
        results["formats"][name] = entry
        flush()

    print(f"\n{environment()} | array {n}x{n} bf16, axis {args.axis} | jax {jax.__version__}")
    print("| op | config (rows x cols x warps) | time (us) | ratio to x*2 | GB/s (read+write) |")
    print("|---|---|---|---|---|")
    for label, config, t in rows:
        print(f"| {label} | {config} | {t * 1e6:.1f} | {t / t_copy:.2f} | {2 * nbytes / t / 1e9:.0f} |")
    flush()


if __name__ == "__main__":
    main()

"""The packed-weight small-M matmul against XLA's bf16 matmul and "dequantize + bf16 dot".

    python benchmarks/packed_matmul.py [--ms 1,16,64] [--kn 8192x8192,8192x28672]
        [--formats mxfp4,nvfp4,int4] [--sweep-format mxfp4] [--configs ...] [--budget 200]

Per (M, K, N), in one run: XLA's ``jnp.dot`` of bf16 ``x`` and a bf16 weight (fp32 accumulation,
bf16 out) is the baseline; per format: ``qjax.dequantize`` of the weight's QArray to bf16 followed
by the bf16 dot, under one jit (XLA), and the kernel at several configurations
(``block_n x block_k x num_warps x num_stages x split_k`` plus a decode suffix ``a`` = asm, ``s`` =
asm_split, ``b`` = bits, then ``v`` for method='vector' and ``c`` for scale_mode='acc'; without
``c``, scale_mode='auto': weight for E2M1, acc for int4). The sweep format gets every configuration;
the other formats the default plus the three fastest of the sweep at that M.

Bandwidth: "floor bytes" are the packed weight + scales + x + y, each once; achieved bandwidth is
floor bytes / time, reported as % of a device copy measured in the same run (bytes read + written
by ``a * 2`` over a 1 GiB bf16 array). Weights are random packed codes and scales (not quantized:
generating them by ``qjax.quantize`` at 8192 x 28672 would dominate the run); each kernel result
is checked against the fp32 reference (``dequantize`` + HIGHEST matmul) by its relative Frobenius
error. Every timed function runs over R copies of its weight per call (R * bytes > 2 x the 50 MB
L2), so no timing reads the weight from L2; the time reported is per matmul. Timings: median of
repeats (``benchmarks/timing.py``). JSON goes to ``$OUT/packed_matmul.json`` when ``$OUT`` is set.
"""

import argparse
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qjax  # noqa: E402
from qjax.pallas.packed_matmul import PackedWeight, packed_matmul  # noqa: E402
from timing import environment, median_seconds  # noqa: E402

CONFIGS = ("64x256x4x3x1a,64x256x4x3x4a,32x256x4x3x8a,64x512x4x3x4a,128x256x8x3x4a,"
           "128x512x4x3x2a,32x512x2x3x4a,64x256x4x3x4s,64x256x4x3x4b,64x256x4x3x4ac,"
           "64x256x4x3x4av,64x512x4x3x8a")
DEFAULT = "64x256x4x3x4a"
L2_BYTES = 50 * 2**20


def parse_config(text):
    flags = text.lstrip("0123456789x")
    bn, bk, warps, stages, split = (int(v) for v in text[:len(text) - len(flags)].split("x"))
    decode = {"a": "asm", "s": "asm_split", "b": "bits"}[flags[0]]
    return dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, split_k=split,
                decode=decode, method="vector" if "v" in flags else "dot",
                scale_mode="acc" if "c" in flags else "auto")


def random_weight(fmt_name, k, n, seed):
    """A PackedWeight of random codes and plausible scales (no quantization pass)."""
    fmt = qjax.formats.get(fmt_name)
    size = fmt.block_size
    kd, ks = jax.random.split(jax.random.key(seed))
    data = jax.random.bits(kd, (k // 2, n), jnp.uint8)
    shape = (k // size, n)
    tensor_scale = None
    if fmt.scaling.scale.power_of_two:
        scales = jax.random.randint(ks, shape, 118, 128).astype(jnp.uint8)
    elif fmt.scaling.scale.name == "e4m3":
        scales = jax.random.randint(ks, shape, 0x30, 0x58).astype(jnp.uint8)
        tensor_scale = jnp.full((1,), 0.0123, jnp.float32)
    else:
        scales = (jnp.abs(jax.random.normal(ks, shape)) * 0.05 + 1e-3).astype(
            jnp.bfloat16 if fmt.scaling.scale.name == "bf16" else jnp.float32)
    return PackedWeight(data, scales, tensor_scale, fmt, k, n, np.dtype(jnp.bfloat16))


def copies(make, count):
    return [make(i) for i in range(count)]


def rotations(nbytes):
    return min(16, max(2, math.ceil(2 * L2_BYTES / nbytes) + 1))


def timed(fn, *args):
    return median_seconds(fn, *args, warmup=2, repeats=15, calls_per_repeat=3)


def copy_bandwidth(mib):
    a = jax.random.normal(jax.random.key(0), (mib * 2**19,), jnp.bfloat16)
    fn = jax.jit(lambda a: a * 2)
    seconds = timed(fn, a)
    del a
    return 2 * mib * 2**20 / seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,16,64")
    parser.add_argument("--kn", default="8192x8192,8192x28672")
    parser.add_argument("--formats", default="mxfp4,nvfp4,int4")
    parser.add_argument("--sweep-format", default="mxfp4")
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--budget", type=float, default=200.0)
    parser.add_argument("--copy-mib", type=int, default=1024)
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test of the script")
    parser.add_argument("--no-dequantize", action="store_true",
                        help="skip the XLA dequantize + dot variant (saves compile time)")
    args = parser.parse_args()
    start = time.perf_counter()
    out_dir = os.environ.get("OUT")
    print(environment(), flush=True)
    bandwidth = copy_bandwidth(args.copy_mib)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    results = {"environment": environment(), "copy_bandwidth": bandwidth, "rows": []}
    configs = args.configs.split(",")
    ms = [int(v) for v in args.ms.split(",")]
    formats = args.formats.split(",")
    best_by_m = {}
    summary = []

    def flush():
        if out_dir:
            with open(os.path.join(out_dir, "packed_matmul.json"), "w") as f:
                json.dump(results, f, indent=1)

    def record(**row):
        results["rows"].append(row)
        flush()
        extra = f" rel {row['rel_err']:.1e}" if row.get("rel_err") is not None else ""
        if row.get("seconds"):
            print(f"M={row['m']} K={row['k']} N={row['n']} {row['format']} {row['variant']}: "
                  f"{row['seconds'] * 1e6:.1f} us, x{row['ratio_to_bf16']:.2f} vs bf16, "
                  f"{row['pct_copy_bw']:.0f}% copy bw{extra}", flush=True)
        else:
            print(f"M={row['m']} K={row['k']} N={row['n']} {row['format']} {row['variant']}: "
                  f"{row.get('note')}", flush=True)

    for kn in args.kn.split(","):
        k, n = (int(v) for v in kn.split("x"))
        # bf16 weights, rotated; XLA's dot is the baseline
        w_bf16 = copies(lambda i: jax.random.normal(jax.random.key(100 + i), (k, n),
                                                     jnp.bfloat16), rotations(k * n * 2))
        weights = {f: copies(lambda i, f=f: random_weight(f, k, n, 10 * i),
                             rotations(random_weight(f, k, 64, 0).nbytes * n // 64))
                   for f in formats}
        for m in ms:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            base_fn = jax.jit(lambda x, ws: [jnp.dot(x, w) for w in ws])
            base = timed(base_fn, x, w_bf16) / len(w_bf16)
            base_bytes = k * n * 2 + m * (k + n) * 2
            record(m=m, k=k, n=n, format="bf16", variant="xla_dot", seconds=base,
                   ratio_to_bf16=1.0, pct_copy_bw=100 * base_bytes / base / bandwidth)
            for fmt in formats:
                ws = weights[fmt]
                floor_bytes = ws[0].nbytes + m * (k + n) * 2
                qs = [w.unpack() for w in ws[:2]]
                deq_fn = jax.jit(lambda x, qs: [jnp.dot(x, qjax.dequantize(q, jnp.bfloat16))
                                                for q in qs])
                try:
                    if args.no_dequantize:
                        raise RuntimeError("skipped (--no-dequantize)")
                    t = timed(deq_fn, x, qs) / len(qs)
                    record(m=m, k=k, n=n, format=fmt, variant="xla_dequantize_dot", seconds=t,
                           ratio_to_bf16=base / t, pct_copy_bw=100 * floor_bytes / t / bandwidth)
                except Exception as e:  # noqa: BLE001
                    record(m=m, k=k, n=n, format=fmt, variant="xla_dequantize_dot",
                           note=f"failed: {type(e).__name__}: {str(e)[:200]}")
                ref = jax.jit(
                    lambda x, q: jnp.matmul(x.astype(jnp.float32), qjax.dequantize(q, jnp.float32),
                                            precision=lax.Precision.HIGHEST))(x, qs[0])
                del qs
                if fmt == args.sweep_format:
                    todo = configs
                else:
                    todo = list(dict.fromkeys([DEFAULT] + best_by_m.get((m, k, n), [])[:3]))
                timings = []
                for config in todo:
                    if time.perf_counter() - start > args.budget:
                        record(m=m, k=k, n=n, format=fmt, variant=config, note="skipped: budget")
                        continue
                    params = parse_config(config)
                    if params["method"] == "vector" and m != 1:
                        continue
                    if args.interpret:
                        params = dict(params, interpret=True)
                    fn = jax.jit(lambda x, ws, p=params: [packed_matmul(x, w, **p) for w in ws])
                    try:
                        outs = jax.block_until_ready(fn(x, ws))
                        y = outs[0].astype(jnp.float32)
                        rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
                        t = timed(fn, x, ws) / len(ws)
                        timings.append((t, config))
                        record(m=m, k=k, n=n, format=fmt, variant=config, seconds=t,
                               ratio_to_bf16=base / t,
                               pct_copy_bw=100 * floor_bytes / t / bandwidth,
                               rel_err=rel, finite=bool(jnp.all(jnp.isfinite(y))))
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc(limit=2)
                        record(m=m, k=k, n=n, format=fmt, variant=config,
                               note=f"failed: {type(e).__name__}: {str(e)[:300]}")
                if fmt == args.sweep_format:
                    best_by_m[(m, k, n)] = [c for _, c in sorted(timings)]
                if timings:
                    t, config = min(timings)
                    summary.append((m, k, n, fmt, config, t, base, floor_bytes))
                del ref
            del x
        del w_bf16, weights
    print(f"\n{environment()}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("| M | K | N | format | best config | kernel us | bf16 dot us | speedup vs bf16 | "
          "% copy bw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, k, n, fmt, config, t, base, floor_bytes in summary:
        print(f"| {m} | {k} | {n} | {fmt} | {config} | {t * 1e6:.1f} | {base * 1e6:.1f} | "
              f"{base / t:.2f} | {100 * floor_bytes / t / bandwidth:.0f} |")
    dq = [r for r in results["rows"] if r["variant"] == "xla_dequantize_dot" and r.get("seconds")]
    for r in dq:
        print(f"dequantize+dot M={r['m']} K={r['k']} N={r['n']} {r['format']}: "
              f"{r['seconds'] * 1e6:.1f} us (x{r['ratio_to_bf16']:.2f} vs bf16)")
    flush()


if __name__ == "__main__":
    main()

"""The block-scaled Pallas matmul against XLA's bf16 matmul, jax.nn.scaled_matmul and the reference.

    python benchmarks/scaled_matmul.py [--shapes 8192x8192x8192,16384x4096x4096]
        [--formats mxfp8,mxfp4,nvfp4,mxfp6_e3m2,fp8_e4m3] [--sweep mxfp8,mxfp4,nvfp4]
        [--configs 128x128x64x8x3,...] [--budget 170]

Shapes are M x K x N. Per shape, in one run: XLA's bf16 matmul (``jnp.dot`` of bf16 arrays, fp32
accumulation, bf16 out) is the baseline; per format: ``jax.nn.scaled_matmul`` on the same
quantized operands (mxfp8, nvfp4; GEMM only, operands pre-transposed), ``jax.nn.scaled_dot_general``
(quantizes its bf16 inputs itself: GEMM + quantization), the XLA fp8 dot for per-tensor fp8, the
reference path (``dequantize`` to bf16 + bf16 matmul under jit), and the kernel at several
configurations (``block_m x block_n x block_k x num_warps x num_stages``, ``T`` suffix =
``transpose_b``: B stored (N, K); ``F`` suffix = ``mma="fp8"``, fp8 formats only).
``--sweep`` formats get every configuration on the first shape;
the others, and every format on later shapes, the default plus the two fastest of the sweep.
Every kernel result is checked against the float32 reference (dequantize, HIGHEST-precision
matmul): relative Frobenius error and max |err| / max |ref| (bf16 output: expect ~1e-3).
Every variant runs in try/except; past ``--budget`` seconds the remaining kernel variants are
skipped and the table printed. JSON goes to ``$OUT/scaled_matmul.json`` when ``$OUT`` is set.
"""

import argparse
import json
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
from qjax.pallas.scaled_matmul import scaled_matmul  # noqa: E402
from qjax.quantize import decode  # noqa: E402
from timing import environment, median_seconds  # noqa: E402

CONFIGS = ("128x128x64x8x3,128x256x64x8x3,256x128x64x8x3,128x128x128x8x3,128x128x64x8x3T,"
           "128x128x64x8x3F,128x256x128x8x3TF")
DEFAULT = "128x128x64x8x3"


def parse_config(text):
    """``bm x bn x bk x warps x stages`` + optional ``T`` (transpose_b) and ``F`` (mma='fp8')."""
    flags = text[len(text.rstrip("TF")):]
    bm, bn, bk, warps, stages = (int(v) for v in text.rstrip("TF").split("x"))
    return dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                transpose_b="T" in flags, mma="fp8" if "F" in flags else "bf16")


def timed(fn, *args):
    return median_seconds(fn, *args, warmup=2, repeats=10, calls_per_repeat=3)


def errors(out, ref):
    out = out.astype(jnp.float32)
    diff = out - ref
    rel = float(jnp.linalg.norm(diff) / jnp.linalg.norm(ref))
    worst = float(jnp.max(jnp.abs(diff)) / jnp.max(jnp.abs(ref)))
    return {"rel_fro": rel, "max_err_over_max_ref": worst,
            "finite": bool(jnp.all(jnp.isfinite(out)))}


def scaled_matmul_baseline(fmt, a, b_t):
    """jax.nn.scaled_matmul on our quantized operands ((1, M, K) x (1, N, K)); None if the format
    has no cuDNN counterpart."""
    if fmt in ("mxfp8",):
        lhs, rhs = a.values[None], b_t.values[None]
        ls, rs = a.scales[None], b_t.scales[None]
        post = None
    elif fmt == "nvfp4":
        lhs = decode(a.values, a.fmt.element).astype(jnp.float4_e2m1fn)[None]
        rhs = decode(b_t.values, a.fmt.element).astype(jnp.float4_e2m1fn)[None]
        ls, rs = a.scales[None], b_t.scales[None]
        post = (a.tensor_scale * b_t.tensor_scale).reshape(())
    else:
        return None

    def run(lhs, rhs, ls, rs):
        out = jax.nn.scaled_matmul(lhs, rhs, ls, rs, preferred_element_type=jnp.float32)[0]
        if post is not None:
            out = out * post
        return out.astype(jnp.bfloat16)

    return jax.jit(run), (lhs, rhs, ls, rs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="8192x8192x8192,16384x4096x4096")
    parser.add_argument("--formats", default="mxfp8,mxfp4,nvfp4,mxfp6_e3m2,fp8_e4m3")
    parser.add_argument("--sweep", default="mxfp8,mxfp4,nvfp4")
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--budget", type=float, default=170.0)
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test of the script")
    args = parser.parse_args()
    start_all = time.perf_counter()
    out_dir = os.environ.get("OUT")
    results = {"environment": environment(), "jax": jax.__version__, "rows": []}
    table = []
    print(environment(), flush=True)

    def flush():
        if out_dir:
            with open(os.path.join(out_dir, "scaled_matmul.json"), "w") as f:
                json.dump(results, f, indent=1)

    def record(shape, fmt, variant, config, seconds, flops, base, err=None, note=""):
        row = {"shape": shape, "format": fmt, "variant": variant, "config": config,
               "seconds": seconds, "tflops": flops / seconds / 1e12 if seconds else None,
               "ratio_to_bf16": base / seconds if seconds and base else None, "errors": err,
               "note": note}
        results["rows"].append(row)
        table.append(row)
        e = "" if err is None else (f" rel {err['rel_fro']:.2e} "
                                    f"max {err['max_err_over_max_ref']:.2e}")
        if seconds:
            print(f"{shape} {fmt} {variant} {config}: {seconds * 1e3:.3f} ms "
                  f"{row['tflops']:.0f} TFLOP/s {row['ratio_to_bf16'] or 0:.2f}x bf16{e} {note}",
                  flush=True)
        else:
            print(f"{shape} {fmt} {variant} {config}: {note}", flush=True)
        flush()

    def attempt(label, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"FAILED {label}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            results.setdefault("failures", []).append(
                {"label": label, "error": traceback.format_exc()[-3000:]})
            return None

    configs = args.configs.split(",")
    swept = {}
    for shape_index, shape_text in enumerate(args.shapes.split(",")):
        m, k, n = (int(v) for v in shape_text.split("x"))
        flops = 2.0 * m * n * k
        kx, kw = jax.random.split(jax.random.key(shape_index))
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = jax.random.normal(kw, (k, n), jnp.bfloat16)
        bf16_fn = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                          .astype(jnp.bfloat16))
        base = attempt("bf16", lambda: timed(bf16_fn, x, w))
        record(shape_text, "bf16", "XLA jnp.dot", "", base, flops, base)
        for fmt in args.formats.split(","):
            prep = attempt(f"{fmt} quantize", lambda: (
                qjax.quantize(x, fmt), qjax.quantize(w, fmt, axis=0), qjax.quantize(w.T, fmt)))
            if prep is None:
                continue
            a, b, b_t = prep
            ref = attempt(f"{fmt} reference f32", lambda: jax.jit(
                lambda a, b: jnp.matmul(qjax.dequantize(a, jnp.float32),
                                        qjax.dequantize(b, jnp.float32),
                                        precision=lax.Precision.HIGHEST))(a, b))

            def check(out):
                return None if ref is None else errors(out, ref)

            deq_fn = jax.jit(lambda a, b: jnp.dot(qjax.dequantize(a, jnp.bfloat16),
                                                  qjax.dequantize(b, jnp.bfloat16),
                                                  preferred_element_type=jnp.float32)
                             .astype(jnp.bfloat16))
            t = attempt(f"{fmt} dequantize+bf16", lambda: timed(deq_fn, a, b))
            if t:
                record(shape_text, fmt, "dequantize + XLA bf16 dot", "", t, flops, base,
                       attempt("check", lambda: check(deq_fn(a, b))))
            baseline = attempt(f"{fmt} jax.nn.scaled_matmul setup",
                               lambda: scaled_matmul_baseline(fmt, a, b_t))
            if baseline is not None:
                fn, operands = baseline
                t = attempt(f"{fmt} jax.nn.scaled_matmul", lambda: timed(fn, *operands))
                if t:
                    record(shape_text, fmt, "jax.nn.scaled_matmul (GEMM only)", "", t, flops,
                           base, attempt("check", lambda: check(fn(*operands))))
            if fmt in ("mxfp8", "nvfp4"):
                def sdg(x, w_t, fmt=fmt):
                    cfg = jax.nn.get_scaled_dot_general_config(fmt)
                    return jax.nn.scaled_dot_general(x, w_t, (((1,), (1,)), ((), ())),
                                                     preferred_element_type=jnp.bfloat16,
                                                     configs=[cfg] * 3)
                sdg_fn = jax.jit(sdg)
                w_t = w.T.copy()
                t = attempt(f"{fmt} scaled_dot_general", lambda: timed(sdg_fn, x, w_t))
                if t:
                    record(shape_text, fmt, "jax.nn.scaled_dot_general (quantize + GEMM)", "",
                           t, flops, base)
            if fmt.startswith("fp8_"):
                fp8_fn = jax.jit(lambda a, b: (jnp.dot(a.values, b.values,
                                                       preferred_element_type=jnp.float32)
                                               * (a.scales * b.scales)).astype(jnp.bfloat16))
                t = attempt(f"{fmt} XLA fp8 dot", lambda: timed(fp8_fn, a, b))
                if t:
                    record(shape_text, fmt, "XLA fp8 dot (per-tensor)", "", t, flops, base,
                           attempt("check", lambda: check(fp8_fn(a, b))))
            if shape_index == 0 and fmt in args.sweep.split(","):
                todo = configs
            else:
                best = sorted(swept, key=lambda c: np.mean(swept[c]))
                best = [c for c in best if "F" not in c or fmt.startswith(("mxfp8", "fp8"))][:2]
                todo = [DEFAULT] + [c for c in best if c != DEFAULT]
            for config in todo:
                if time.perf_counter() - start_all > args.budget:
                    record(shape_text, fmt, "qjax scaled_matmul", config, None, flops, base,
                           note="skipped: time budget")
                    continue
                params = parse_config(config)
                if params["mma"] == "fp8" and not fmt.startswith(("mxfp8", "fp8")):
                    continue
                rhs = b_t if params["transpose_b"] else b
                fn = jax.jit(lambda a, b, p=params: scaled_matmul(
                    a, b, interpret=args.interpret, **p))
                compile_start = time.perf_counter()
                out = attempt(f"{fmt} kernel {config}", lambda: jax.block_until_ready(fn(a, rhs)))
                if out is None:
                    record(shape_text, fmt, "qjax scaled_matmul", config, None, flops, base,
                           note="FAILED (see log)")
                    continue
                compile_s = time.perf_counter() - compile_start
                err = attempt("check", lambda: check(out))
                del out
                t = attempt(f"{fmt} kernel {config} timing", lambda: timed(fn, a, rhs))
                if t:
                    if shape_index == 0 and fmt in args.sweep.split(","):
                        swept.setdefault(config, []).append(t / base)
                    record(shape_text, fmt, "qjax scaled_matmul", config, t, flops, base, err,
                           note=f"compile+first {compile_s:.1f}s")
            del a, b, b_t, ref

    print(f"\n{environment()} | total {time.perf_counter() - start_all:.0f} s")
    print("| shape MxKxN | format | variant | config (bm x bn x bk x warps x stages) | ms "
          "| TFLOP/s | x bf16 | rel err (Frobenius) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        ms = f"{r['seconds'] * 1e3:.3f}" if r["seconds"] else r["note"]
        tf = f"{r['tflops']:.0f}" if r["tflops"] else ""
        ratio = f"{r['ratio_to_bf16']:.2f}" if r["ratio_to_bf16"] else ""
        err = f"{r['errors']['rel_fro']:.1e}" if r["errors"] else ""
        print(f"| {r['shape']} | {r['format']} | {r['variant']} | {r['config']} | {ms} | {tf} "
              f"| {ratio} | {err} |")
    flush()


if __name__ == "__main__":
    main()

"""FP8 GEMMs through XLA: speed and accumulation error against bfloat16 on the same values.

    python benchmarks/fp8_gemm.py [--shapes 8192x2048x8192,8192x8192x2048]

The ``fp8`` recipe's per-tensor E4M3/E5M2 operands are exact in float8, so its GEMMs could take
float8 arrays (cuBLASLt FP8) instead of the bfloat16 that ``qjax.ops`` gives them. This times,
for each M x K x N, the same exactly representable values multiplied as bfloat16 (cuBLAS), as
float8 at ``Precision.HIGHEST`` (what qjax.ops passes by default; cuBLASLt's split accumulator,
promoted to float32 periodically) and at ``DEFAULT`` (XLA then asks for cuBLAS's fast FP8
accumulation), and reports each one's largest error relative to a float32 GEMM of the same
values, and which kernel XLA chose (docs/benchmarks.md has why qjax stays with bfloat16).
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
from jax import lax

import qjax
from timing import environment, median_seconds

VARIANTS = {  # name: (lhs dtype, rhs dtype, precision)
    "bf16": (jnp.bfloat16, jnp.bfloat16, lax.Precision.DEFAULT),
    "e4m3 x e4m3, HIGHEST": (jnp.float8_e4m3fn, jnp.float8_e4m3fn, lax.Precision.HIGHEST),
    "e4m3 x e4m3, DEFAULT": (jnp.float8_e4m3fn, jnp.float8_e4m3fn, lax.Precision.DEFAULT),
    "e5m2 x e4m3, HIGHEST": (jnp.float8_e5m2, jnp.float8_e4m3fn, lax.Precision.HIGHEST),
}
_FORMAT = {jnp.float8_e4m3fn: "fp8_e4m3", jnp.float8_e5m2: "fp8_e5m2", jnp.bfloat16: "fp8_e4m3"}


def operand(key, shape, dtype):
    """Per-tensor-quantized normal values (elements only): exact in ``dtype`` and in float32."""
    x = jax.random.normal(key, shape, jnp.float32)
    return qjax.quantize(x, _FORMAT[dtype]).values.astype(jnp.float32)


def kernel_name(hlo: str) -> str:
    names = set(re.findall(r'custom_call_target="([^"]+)"', hlo))
    if "__triton_gemm" in hlo:
        names.add("triton gemm fusion")
    return ", ".join(sorted(names)) or "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8192x2048x8192,8192x8192x2048,32768x768x2304")
    args = parser.parse_args()
    print(environment())
    print("| M x K x N | operands | precision | ms | TFLOP/s | / bf16 time | max error / max |out| "
          "| kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        m, k, n = (int(v) for v in shape.split("x"))
        base = None
        for name, (lhs_dtype, rhs_dtype, precision) in VARIANTS.items():
            a = operand(jax.random.key(0), (m, k), lhs_dtype)
            b = operand(jax.random.key(1), (k, n), rhs_dtype)
            want = jnp.dot(a, b, precision=lax.Precision.HIGHEST)
            a, b = a.astype(lhs_dtype), b.astype(rhs_dtype)
            fn = jax.jit(lambda x, y, p=precision: lax.dot_general(
                x, y, (((1,), (0,)), ((), ())), precision=p,
                preferred_element_type=jnp.float32))
            kernel = kernel_name(fn.lower(a, b).compile().as_text())
            seconds = median_seconds(fn, a, b)
            error = float(jnp.max(jnp.abs(fn(a, b) - want)) / jnp.max(jnp.abs(want)))
            base = seconds if base is None else base
            operands, _, label = name.partition(", ")
            print(f"| {shape} | {operands} | {label or 'DEFAULT'} | {seconds * 1e3:.3f} | "
                  f"{2 * m * k * n / seconds / 1e12:.0f} | {seconds / base:.2f} | {error:.1e} | "
                  f"{kernel} |", flush=True)


if __name__ == "__main__":
    main()

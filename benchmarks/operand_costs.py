"""What one quantized GEMM operand costs, part by part, against `x * 2` (issue 6's MLP step).

    python benchmarks/operand_costs.py [--rows 8192 --cols 8192] [--recipes mxfp4,nvfp4,fp8]
        [--sweep mxfp4,nvfp4 --configs 64x4,128x8]

For each recipe's GEMM operands (forward, dgrad, wgrad; lhs and rhs) of a bf16 (rows, cols) array,
quantized along the last axis and along axis 0 (the wgrad layout), it times the operand as the
quantized GEMM prepares it (upcast, Hadamard transform, quantization, narrowing to bf16: what
`qjax.ops.dot_general` runs) and its parts on their own: the random bits of stochastic rounding,
the Hadamard transform, the quantizer; XLA's path (`use_kernels(False)`: XLA's rotation GEMM and
quantizer) beside each dispatched one, and the fused rotate-and-quantize kernel
(`qjax.pallas.hadamard_quant`) at several tile sizes. Ratios are to `x * 2` on the same
array in the same run.
"""

from __future__ import annotations

import argparse
import importlib

import jax
import jax.numpy as jnp

import qjax
from qjax import recipes as R
from qjax.pallas import hadamard_quant as HQ
from qjax import transforms as T
from timing import environment, median_seconds

G = importlib.import_module("qjax.ops.dot_general")  # the module (qjax.ops re-exports the function)
# The backward operands of the mxfp4 and nvfp4 recipes, as the sweep times them.
SWEEPS = {"mxfp4": dict(hadamard_block_size=64, prescale=0.75),
          "nvfp4": dict(hadamard_block_size=16, split_tensor_scale=True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--recipes", default="mxfp4,nvfp4,fp8,mxfp8")
    parser.add_argument("--sweep", default="mxfp4", help="formats whose fused rotate-and-quantize "
                        "kernel is timed at every --configs tile (mxfp4, nvfp4; empty: none)")
    parser.add_argument("--configs", default="32x4,32x8,64x4,64x8,128x4,128x8,256x4,256x8",
                        help="block_rows x num_warps of the sweep")
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.rows, args.cols), jnp.bfloat16)
    key = jax.random.key(1)
    t_copy = median_seconds(jax.jit(lambda x: x * 2), x)
    print(f"{environment()} | ({args.rows}, {args.cols}) bf16 | x * 2: {t_copy * 1e6:.1f} us")
    rows = [("x * 2", "", "", t_copy)]

    def add(label, what, axis, fn, *operands):
        t = median_seconds(jax.jit(fn), *operands)
        rows.append((label, what, axis, t))
        print(f"  {label} {what} axis={axis}: {t * 1e6:.1f} us ({t / t_copy:.2f}x)", flush=True)

    add("jax.random.bits", "uint32 of x's shape", "", lambda k: jax.random.bits(k, x.shape,
                                                                                  jnp.uint32), key)
    for block in (16, 32, 64):
        signs = T.random_signs(key, block)
        for axis in (-1, 0):
            add(f"hadamard block {block}", "bf16 in, float32 out", axis,
                lambda x, s, axis=axis, block=block: T.hadamard(
                    x, axis=axis, block_size=block, signs=s, out_dtype=jnp.float32), x, signs)
    for name in filter(None, args.recipes.split(",")):
        recipe = R.get(name)
        for gemm_name, gemm in recipe.gemms.items():
            for side in ("lhs", "rhs"):
                spec = getattr(gemm, side)
                if not spec.quantizes:
                    continue
                what = f"{gemm_name}.{side} {spec.fmt.name} {spec.rounding}"
                if gemm.transform:
                    what += f" {gemm.transform}{gemm.hadamard_block_size or ''}"
                for axis in (-1, 0):
                    signs = G._signs(gemm, x.shape[axis], key)

                    def operand(x, key, signs, gemm=gemm, side=side, axis=axis):
                        return G._operand(gemm, side, x, axis, signs, key, jnp.float32)[0]

                    add(f"{name} operand", what, axis, operand, x, key, signs)
                    with qjax.use_kernels(False):  # traced inside: XLA's rotation and quantizer
                        add(f"{name} operand, XLA", what, axis, operand, x, key, signs)
                    if gemm.transform is None:
                        continue

                    def quantizer(x, key, spec=spec, axis=axis):
                        return G._gemm_operand(x.astype(jnp.float32), spec, axis=axis, key=key)[0]

                    add(f"{name} quantizer only", what, axis, quantizer, x, key)
    for fmt in filter(None, args.sweep.split(",")):
        options = SWEEPS[fmt]
        h = options["hadamard_block_size"]
        signs = T.random_signs(key, h)
        for axis in (-1, 0):
            for config in args.configs.split(","):
                block_rows, warps = map(int, config.split("x"))
                add(f"hadamard_quant kernel rows={block_rows} warps={warps}",
                    f"{fmt} stochastic random_hadamard{h} " + " ".join(
                        f"{k} {v}" for k, v in options.items() if k != "hadamard_block_size"),
                    axis,
                    lambda x, key, s, axis=axis, r=block_rows, w=warps, fmt=fmt:
                        HQ.hadamard_fake_quant_pallas(
                            x, fmt, signs=s, axis=axis, rounding="stochastic", key=key,
                            block_rows=r, num_warps=w, **SWEEPS[fmt]),
                    x, key, signs)
    print(f"\n{environment()} | ({args.rows}, {args.cols}) bf16")
    print("| part | operand | axis | us | / x*2 |")
    print("|---|---|---|---|---|")
    for label, what, axis, t in rows:
        print(f"| {label} | {what} | {axis} | {t * 1e6:.1f} | {t / t_copy:.2f} |")


if __name__ == "__main__":
    main()

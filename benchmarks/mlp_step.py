"""End-to-end training step of a 4-layer MLP stack per recipe, against the bf16 step (issue 6).

    python benchmarks/mlp_step.py                        # GPU: T=8192, D=2048, F=8192
    python benchmarks/mlp_step.py --tokens 256 --dim 128 --hidden 512 --iters 3   # CPU smoke run

Model: 4 residual blocks ``x + Dense(D)(gelu(Dense(F)(x)))`` on ``T`` tokens, bf16 parameters and
compute, AdamW (optax), mean-squared loss against a fixed random target; every Dense is
``qjax.nn.Dense(recipe=...)`` (all three GEMMs of each layer quantized as the recipe says). The
step (forward, backward, optimizer) is jitted with parameters and optimizer state donated, and timed
as a median over many runs after warm-up; the plain Flax ``nn.Dense`` twin and qjax's ``bf16``
recipe are the baselines, measured in the same run. Bars (issue 6): ``mxfp4``, ``nvfp4``,
``quartet`` <= 1.10x the bf16 step; ``fp8`` <= 0.8x.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import qjax
from timing import environment, top_kernels


class MLPStack(nn.Module):
    hidden: int
    layers: int = 4
    recipe: str | None = "bf16"  # None: plain flax.linen.Dense

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense if self.recipe is None else qjax.nn.Dense
        extra = {} if self.recipe is None else {"recipe": self.recipe}
        dim = x.shape[-1]
        for _ in range(self.layers):
            h = dense(self.hidden, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **extra)(x)
            x = x + dense(dim, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **extra)(nn.gelu(h))
        return x


def step_time(recipe, x, target, hidden, warmup, iters, trace_dir=None, top=12):
    model = MLPStack(hidden=hidden, recipe=recipe)
    params = model.init(jax.random.key(0), x)["params"]
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(params)

    # x and target are arguments, not constants closed over: XLA would constant-fold the first
    # layer's quantization of a constant x (minutes of compile on an H100, and a step that skips
    # that work).
    def train_step(params, opt_state, key, x, target):
        def loss_fn(p):
            y = model.apply({"params": p}, x, rngs={"quant": key})
            return jnp.mean((y.astype(jnp.float32) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    began = time.perf_counter()
    compiled = step.lower(params, opt_state, jax.random.key(1), x, target).compile()
    compile_seconds = time.perf_counter() - began
    key = jax.random.key(2)
    for i in range(warmup):
        params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, i), x,
                                           target)
    jax.block_until_ready(loss)
    samples = []
    for i in range(iters):
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, warmup + i),
                                           x, target)
        jax.block_until_ready(loss)
        samples.append(time.perf_counter() - start)
    if trace_dir is not None:
        steps = 3
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for i in range(steps):
                params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, 10**6 + i),
                                                   x, target)
            jax.block_until_ready(loss)
        for ms, launches, name in top_kernels(next(trace_dir.rglob("perfetto_trace.json.gz")),
                                              steps, top):
            print(f"| kernel | {ms:.3f} ms/step | x{launches} | {name[:110]} |")
    return statistics.median(samples), compile_seconds, float(loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--recipes", default="flax,bf16,fp8,mxfp8,mxfp4,nvfp4,quartet")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--trace", help="record a perfetto trace per recipe under this folder and "
                                        "print the device kernels that take the most time")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per recipe")
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(3), (args.tokens, args.dim), jnp.bfloat16)
    target = jax.random.normal(jax.random.key(4), (args.tokens, args.dim), jnp.float32)
    flops = 6 * 4 * 2 * args.tokens * args.dim * args.hidden  # fwd + bwd of 8 GEMMs
    print(f"{environment()} | T={args.tokens} D={args.dim} F={args.hidden}, 4 blocks, AdamW")
    rows = []
    for name in args.recipes.split(","):
        trace_dir = pathlib.Path(args.trace) / name if args.trace else None
        rows.append((name, *step_time(None if name == "flax" else name, x, target, args.hidden,
                                      args.warmup, args.iters, trace_dir, args.top)))
        print(f"  {name}: {rows[-1][1] * 1e3:.2f} ms", flush=True)
    base = next((t for name, t, _, _ in rows if name == "bf16"), None)
    print("| recipe | step ms | TFLOP/s (GEMMs) | step / bf16 | compile s | loss after steps |")
    print("|---|---|---|---|---|---|")
    for name, t, compile_seconds, loss in rows:
        ratio = f"{t / base:.2f}" if base else "n/a"
        print(f"| {name} | {t * 1e3:.2f} | {flops / t / 1e12:.0f} | {ratio} | {compile_seconds:.1f} | "
              f"{loss:.4f} |")

if __name__ == "__main__":
    main()

"""Where the time of a train_lm.py step goes, per recipe (issue 8).

    python benchmarks/lm_step_profile.py --recipes flax,bf16 [--preset small] [--trace DIR]
                                         [any train_lm.py option, e.g. --scan-layers]

For each recipe: tracing and compile times, then the median times of the forward loss, the forward and backward
pass, and the whole train step (optimizer included) on one fixed batch. With ``--trace DIR`` it
also records a few steps with ``jax.profiler`` (a perfetto JSON trace per recipe under DIR) and
prints the GPU kernels that take the most time per step. This is how the embedding gradient's
scatter-add (90 of 124 ms per small-preset step on an H100) was found.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import pathlib
import sys
import time

import jax
import numpy as np

import qjax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import train_lm  # noqa: E402
from lm import data as D  # noqa: E402
from lm import train as T  # noqa: E402
from lm.model import FLAX, Decoder  # noqa: E402
from timing import median_seconds, top_kernels  # noqa: E402


def median_ms(fn, *args) -> float:
    return median_seconds(fn, *args, warmup=1, repeats=10, calls_per_repeat=1) * 1e3


def profile(recipe: str, config: T.TrainConfig, tokens, trace_dir: pathlib.Path | None,
            trace_steps: int, count: int, step_only: bool = False) -> None:
    model_config = dataclasses.replace(
        config.model, recipe=recipe,
        head_recipe=FLAX if recipe == FLAX else config.model.head_recipe)
    model = Decoder(model_config)
    optimizer = T.make_optimizer(config)
    state = T.init_state(model, optimizer, config)
    train_step, _ = T.make_steps(model, optimizer, config)
    key = jax.random.key(0)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1], rngs={"quant": key})
        return T.cross_entropy(logits, tokens[:, 1:])

    began = time.perf_counter()
    lowered = train_step.lower(state, tokens)
    lower_s = time.perf_counter() - began
    step = lowered.compile()
    compile_s = time.perf_counter() - began - lower_s
    forward = backward = float("nan")
    if not step_only:  # two more compilations
        forward = median_ms(jax.jit(loss), state.params, tokens)
        backward = median_ms(jax.jit(jax.value_and_grad(loss)), state.params, tokens)
    times = []
    for _ in range(13):
        began = time.perf_counter()
        state, value = step(state, tokens)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - began)
    step_ms = float(np.median(times[3:])) * 1e3
    tokens_per_second = config.tokens_per_step / step_ms * 1e3
    print(f"{recipe:12s} trace+lower {lower_s:5.1f} s, compile {compile_s:6.1f} s | forward {forward:7.2f} ms | forward+backward "
          f"{backward:7.2f} ms | step {step_ms:7.2f} ms | {tokens_per_second:,.0f} tokens/s",
          flush=True)
    if trace_dir is None:
        return
    where = trace_dir / recipe
    with jax.profiler.trace(str(where), create_perfetto_trace=True):
        for _ in range(trace_steps):
            state, value = step(state, tokens)
        jax.block_until_ready(state)
    trace_file = next(where.rglob("perfetto_trace.json.gz"))
    kernels = top_kernels(trace_file, trace_steps, count)
    for ms, launches, name in kernels:
        print(f"    {ms:8.2f} ms/step  x{launches:<4d} {name[:100]}")
    if not kernels:
        print("    (no device kernels in the trace: on a CPU, XLA's work is on host threads)")
    print(f"    trace: {trace_file}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="flax,bf16", help="comma-separated, as train_lm.py")
    parser.add_argument("--preset", default="small", choices=sorted(train_lm.PRESETS))
    parser.add_argument("--trace", help="record a perfetto trace per recipe under this folder")
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per recipe")
    parser.add_argument("--step-only", action="store_true",
                        help="time only the train step (one compilation per recipe, not three)")
    parser.add_argument("--no-kernels", action="store_true",
                        help="run under qjax.use_kernels(False): XLA's quantizers, no Pallas")
    args, train_lm_args = parser.parse_known_args()
    config = train_lm.build_config(train_lm.parse_args(["--preset", args.preset] + train_lm_args))
    corpus = D.load_corpus(None)
    tokens = jax.numpy.asarray(D.train_batch(corpus, 0, batch_size=config.batch_size,
                                             seq_len=config.seq_len, seed=config.seed))
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, preset {args.preset} "
          f"{' '.join(train_lm_args)}: {config.batch_size} x {config.seq_len} tokens per step")
    for recipe in train_lm.parse_recipes(args.recipes):
        with qjax.use_kernels(False) if args.no_kernels else contextlib.nullcontext():
            profile(recipe, config, tokens, pathlib.Path(args.trace) if args.trace else None,
                    args.trace_steps, args.top, args.step_only)


if __name__ == "__main__":
    main()

"""Train a Llama-style language model in any qjax recipe, one model per recipe, and compare them.

    python examples/train_lm.py --preset tiny                       # CPU, 2-3 minutes
    python examples/train_lm.py --preset small --recipes bf16,fp8,mxfp8,mxfp4,nvfp4 --steps 2000

Every recipe trains from the same initial parameters on the same batches with the same
hyper-parameters. Data: byte-level tokens of the running Python's standard library sources (no
download; fixed train/validation split by path hash) or ``--data PATH``. Writes results.md,
results.csv, curves.csv and loss.png (when matplotlib is installed) to ``--out``. The model, data
and loop live in ``examples/lm/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import shlex
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the lm/ package beside this

import jax  # noqa: E402

import qjax  # noqa: E402
from lm import data as D  # noqa: E402
from lm import report, variants  # noqa: E402
from lm.model import ATTENTION_CHOICES, FLAX, ModelConfig  # noqa: E402
from lm.train import (OPTIMIZER_STATES, WEIGHTS, TrainConfig, load_histories,  # noqa: E402
                      peak_flops, save_history, train_recipe)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model size with the batch shape and schedule it is meant to run with."""

    d_model: int
    num_layers: int
    num_heads: int
    mlp_hidden: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_batches: int
    log_every: int


# tiny and small use power-of-two widths because QuEST's forward Hadamard rotates the whole
# contraction axis; base and large use Llama's 8/3·d SwiGLU width (rounded up to 128).
PRESETS = {
    "tiny": Preset(128, 4, 4, 512, 128, 16, 200, 3e-3, 20, 50, 4, 10),            # 1.1M, CPU
    "small": Preset(512, 8, 8, 1024, 1024, 64, 1000, 1e-3, 100, 100, 8, 20),      # 21M
    "base": Preset(768, 12, 12, 2048, 1024, 32, 1000, 6e-4, 100, 100, 8, 20),     # 85M
    "large": Preset(1024, 16, 16, 2816, 2048, 16, 1000, 3e-4, 100, 100, 8, 20),   # 206M
}
DEFAULT_RECIPES = "bf16,mxfp8"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="model size: tiny ~1M (CPU), small ~21M, base ~85M, large ~206M")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES,
                        help="comma-separated recipe names: qjax recipes "
                             f"({', '.join(qjax.recipes.names())}), ablation variants "
                             f"({', '.join(variants.VARIANTS)}), '{FLAX}' (plain Flax layers), "
                             "or the groups 'all' (every qjax recipe) and 'variants'")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: preset's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: preset's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    parser.add_argument("--warmup-steps", type=int, help="linear warmup (default: the preset's)")
    parser.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default="none",
                        help="AdamW moments: float32 ('none') or qjax.optim's int8/fp8/int4")
    parser.add_argument("--weights", choices=WEIGHTS, default="fp32",
                        help="parameters in fp32, or bf16 with stochastic rounding / Kahan sums")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="compute dtype; auto: bfloat16 on GPU, float32 on CPU (XLA:CPU has "
                             "no fast bf16 matmul)")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                        help="auto: cuDNN flash attention on GPU when possible, else XLA; "
                             "quantized: QK^T and PV with the recipe")
    parser.add_argument("--head-recipe", default="bf16",
                        help="recipe of the output head (the papers keep it in high precision)")
    parser.add_argument("--tie-embeddings", action="store_true",
                        help="output head = embedding matrix transposed")
    parser.add_argument("--remat", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--scan-layers", action="store_true",
                        help="one lax.scan over stacked blocks: compiles one block instead of "
                             "all (much faster compiles for quantizing recipes)")
    parser.add_argument("--data", help="a text file or a folder of text files (default: the "
                                       "Python standard library's sources)")
    parser.add_argument("--out", help="output folder (default: runs/train_lm_<preset>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", help="train sharded, e.g. data=2,fsdp=2,tensor=2 (data "
                                       "parallel, FSDP, Megatron tensor parallel; see "
                                       "docs/sharding.md); default: one device")
    parser.add_argument("--eval-every", type=int, help="steps between validations "
                                                       "(default: the preset's; 0: start and end)")
    parser.add_argument("--eval-batches", type=int, help="validation batches (default: preset's)")
    parser.add_argument("--log-every", type=int, help="steps between progress updates")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="orbax checkpoint period in steps (0: no checkpoints)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each recipe from its latest checkpoint in --out")
    parser.add_argument("--parallel", type=int, default=1,
                        help="train up to this many recipes at once, each in its own process "
                             "(on GPUs: process i on GPU i mod the GPU count; logs in "
                             "OUT/logs/), then write the combined table")
    return parser.parse_args(argv)


def train_in_parallel(recipes: list[str], argv: list[str], out: pathlib.Path, workers: int,
                      gpus: int) -> None:
    """Trains each recipe in its own ``train_lm.py`` process (at most ``workers`` at a time);
    each saves its history into ``out/histories``, which the caller then reports."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(recipes), [], []
    free_slots = list(range(workers))
    while pending or running:
        while pending and free_slots:
            recipe, slot = pending.pop(0), free_slots.pop(0)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            # The later --recipes / --parallel win over the user's (argparse keeps the last).
            command = [sys.executable, str(pathlib.Path(__file__).resolve()), *argv,
                       "--recipes", recipe, "--parallel", "1", "--out", str(out)]
            log = (logs / f"{recipe}.log").open("w")
            print(f"[{recipe}] started (log: {logs / f'{recipe}.log'})", flush=True)
            running.append((recipe, slot, log, subprocess.Popen(command, stdout=log,
                                                                stderr=subprocess.STDOUT,
                                                                env=env)))
        time.sleep(0.5)
        for item in list(running):
            recipe, slot, log, process = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            free_slots.append(slot)
            print(f"[{recipe}] {'done' if process.returncode == 0 else 'FAILED'}", flush=True)
            if process.returncode:
                failed.append(recipe)
    if failed:
        raise RuntimeError(f"recipes {', '.join(failed)} failed; see their logs in {logs}.")


def parse_recipes(text: str) -> list[str]:
    """``"bf16,mxfp8"`` -> ``["bf16", "mxfp8"]``; ``all`` stands for every qjax recipe and
    ``variants`` for every ablation variant (``examples/lm/variants.py``). Unknown names raise
    before anything trains."""
    groups = {"all": list(qjax.recipes.names()), "variants": list(variants.VARIANTS)}
    names = [m for n in text.split(",") if n.strip() for m in groups.get(n.strip(), [n.strip()])]
    if not names:
        raise SystemExit("--recipes: give at least one recipe name.")
    valid = set(qjax.recipes.names()) | set(variants.VARIANTS) | {FLAX}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SystemExit(f"--recipes: unknown recipe(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(qjax.recipes.names())}; variants: "
                         f"{', '.join(variants.VARIANTS)}; {FLAX} (plain Flax layers); the groups "
                         f"all, variants.")
    if len(set(names)) != len(names):
        raise SystemExit(f"--recipes: {text!r} names a recipe twice.")
    return names


def table_order(recipe: str) -> int:
    """Rows in a fixed order: plain Flax, the qjax recipes, then the variants."""
    order = [FLAX, *qjax.recipes.names(), *variants.VARIANTS]
    return order.index(recipe)


def build_config(args: argparse.Namespace) -> TrainConfig:
    preset = PRESETS[args.preset]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    model = ModelConfig(
        vocab_size=D.VOCAB_PADDED, d_model=preset.d_model, num_layers=preset.num_layers,
        num_heads=preset.num_heads, mlp_hidden=preset.mlp_hidden, head_recipe=args.head_recipe,
        tie_embeddings=args.tie_embeddings, attention=args.attention, dtype=dtype,
        remat=args.remat, scan_layers=args.scan_layers)
    return TrainConfig(
        model=model, steps=pick(args.steps, preset.steps),
        batch_size=pick(args.batch_size, preset.batch_size),
        seq_len=pick(args.seq_len, preset.seq_len), lr=pick(args.lr, preset.lr),
        warmup_steps=pick(args.warmup_steps, preset.warmup_steps),
        optimizer_state=args.optimizer_state, weights=args.weights, seed=args.seed,
        eval_every=pick(args.eval_every, preset.eval_every),
        eval_batches=pick(args.eval_batches, preset.eval_batches),
        log_every=pick(args.log_every, preset.log_every), checkpoint_every=args.checkpoint_every)


def describe_run(config: TrainConfig, corpus: D.Corpus, command: str) -> list[str]:
    m = config.model
    device = jax.devices()[0]
    return [
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: "
        f"{device.device_kind} ({device.platform}); JAX {jax.__version__}; qjax "
        f"{qjax.__version__}",
        f"- model: d={m.d_model}, {m.num_layers} layers, {m.num_heads} heads, SwiGLU "
        f"{m.mlp_hidden}, vocab {m.vocab_size} (bytes + EOS, padded), "
        f"{m.matmul_params() / 1e6:.2f}M matmul parameters; compute {m.dtype}, parameters "
        f"{config.weights}; head {m.head_recipe}"
        f"{', tied' if m.tie_embeddings else ''}; attention {m.attention}",
        f"- training: {config.steps} steps x {config.batch_size} x {config.seq_len} tokens "
        f"({config.steps * config.tokens_per_step / 1e6:.1f}M tokens), AdamW lr {config.lr:g} "
        f"(warmup {config.warmup_steps}, cosine to {config.final_lr_ratio:g}x), b2 {config.b2}, "
        f"wd {config.weight_decay}, clip {config.clip_norm}, optimizer state "
        f"{config.optimizer_state}, seed {config.seed}",
        f"- {corpus.describe()}",
        f"- validation: {config.eval_batches} x {config.batch_size} windows of the validation "
        f"split; losses in nats per byte",
    ]


def write_results(out: pathlib.Path, histories, config: TrainConfig, lines: list[str],
                  preset: str, plotted: bool) -> list[report.Row]:
    table = report.rows(histories, tokens_per_step=config.tokens_per_step,
                        flops_per_token=config.model.flops_per_token(config.seq_len),
                        peak_flops=peak_flops(jax.devices()[0]))
    text = "\n".join([f"# train_lm.py, preset {preset}", "", *lines, "", report.markdown(table),
                      "", "gap: (val - val_bf16) / val_bf16. Tokens/s and step time exclude "
                      "compilation, the first step and validation. MFU: 6N + 12·L·d·T FLOPs per "
                      "token against the GPU's dense bf16 peak.", "",
                      "![loss curves](loss.png)" if plotted else "(no plot: matplotlib is not "
                      "installed; the curves are in curves.csv)", ""])
    (out / "results.md").write_text(text)
    report.write_csv(table, out / "results.csv")
    report.write_curves(histories, out / "curves.csv")
    return table


def main(argv: list[str] | None = None) -> list[report.Row]:
    """Runs the command line ``argv`` and returns the final table's rows."""
    args = parse_args(argv)
    recipes = parse_recipes(args.recipes)
    if args.parallel < 1:
        raise SystemExit(f"--parallel must be >= 1, got {args.parallel}.")
    if args.parallel > 1:
        # The workers need the GPU memory: this process must not preallocate it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    config = build_config(args)
    for recipe in recipes:  # fail on a bad recipe/model combination before training anything
        dataclasses.replace(config.model, recipe=recipe)
    out = pathlib.Path(args.out or f"runs/train_lm_{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    corpus = D.load_corpus(args.data)
    command = shlex.join(["python", "examples/train_lm.py", *(sys.argv[1:] if argv is None
                                                               else argv)])
    lines = describe_run(config, corpus, command)
    print("\n".join(lines))
    began = time.perf_counter()
    title = (f"train_lm.py --preset {args.preset}: {config.steps} steps, "
             f"{config.steps * config.tokens_per_step / 1e6:.1f}M tokens")
    plotting = report.can_plot()
    if not plotting:
        print("matplotlib is not installed: loss.png will not be written (pip install "
              "matplotlib); the curves go to curves.csv.")
    if args.parallel > 1 and len(recipes) > 1:
        gpus = jax.device_count() if jax.default_backend() == "gpu" else 0
        train_in_parallel(recipes, sys.argv[1:] if argv is None else list(argv), out,
                          args.parallel, gpus)
        args.resume = True  # every recipe is trained: the loop below collects and reports
    saved = load_histories(out / "histories", config)
    earlier = {r: h for r, h in saved.items() if r not in recipes}
    if earlier:
        print(f"the table also shows {', '.join(earlier)}: trained by an earlier run into {out} "
              "with the same settings (use another --out to leave them out)")
    done = dict(earlier)
    for recipe in recipes:  # results are rewritten after each recipe, so a cut run keeps them
        if args.resume and recipe in saved and saved[recipe].finished:
            print(f"[{recipe}] finished by an earlier run into {out}: kept (--resume)")
            done[recipe] = saved[recipe]
        else:
            done[recipe] = train_recipe(recipe, config, corpus,
                                        checkpoint_dir=out / "checkpoints" / recipe,
                                        resume=args.resume, mesh=args.mesh)
            save_history(out / "histories", done[recipe], config)
        histories = [done[r] for r in sorted(done, key=table_order)]
        if plotting:
            report.plot(histories, out / "loss.png", title)
        table = write_results(out, histories, config, lines, args.preset, plotting)
    print()
    print(report.markdown(table))
    print(f"\nwrote {out}/results.md, results.csv, curves.csv"
          f"{', loss.png' if plotting else ''} "
          f"in {time.perf_counter() - began:.0f} s")
    return table


if __name__ == "__main__":
    main()

"""Bytes moved by the collectives of one sharded LM train step, read from the compiled HLO.

    python benchmarks/collective_bytes.py                      # 8 forced CPU devices
    python benchmarks/collective_bytes.py --meshes fsdp=8,data=2,fsdp=4 --recipes bf16,mxfp4

For each recipe and mesh layout, compiles ``examples/lm``'s train step (no step is run) and sums,
per collective kind and element type, the result sizes of every all-gather, all-reduce,
reduce-scatter, all-to-all and collective-permute in the optimized HLO (bytes per device-group
operation, as XLA writes them). This shows what a layout moves per step and in which dtype (for
example whether FSDP gathers the float32 master weights or bf16 copies), independent of the
interconnect. XLA's GPU compiler may combine or rewrite collectives differently (e.g. all-reduce +
slice into reduce-scatter); run it on the GPU machine for GPU figures.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from lm import data as D  # noqa: E402
from lm import sharding as S  # noqa: E402
from lm import train as T  # noqa: E402
from lm.model import Decoder, ModelConfig  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e8m0fnu": 1}


def collective_bytes(hlo_text: str) -> dict[tuple[str, str], int]:
    """``{(collective, element type): bytes}`` summed over the result shapes in ``hlo_text``."""
    pattern = re.compile(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    totals: dict[tuple[str, str], int] = collections.Counter()
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if match is None:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            totals[(match.group(2), dtype)] += count * _BYTES.get(dtype, 4)
    return dict(totals)


def step_hlo(recipe: str, mesh: str, args) -> tuple[str, int]:
    model_config = ModelConfig(D.VOCAB_PADDED, args.d_model, args.layers, args.heads,
                               args.mlp_hidden, dtype=args.dtype, recipe=recipe)
    config = T.TrainConfig(model=model_config, steps=1, batch_size=args.batch_size,
                           seq_len=args.seq_len, lr=1e-3, warmup_steps=1,
                           optimizer_state=args.optimizer_state)
    model = Decoder(config.model)
    optimizer = T.make_optimizer(config)
    plan = S.make_plan(S.parse_mesh(mesh))
    abstract = jax.eval_shape(lambda: T.init_state(model, optimizer, config))
    shardings = plan.shardings(abstract)
    train_step, _ = T.make_steps(model, optimizer, config, plan, shardings)
    tokens = jax.ShapeDtypeStruct((args.batch_size, args.seq_len + 1), jnp.int32,
                                  sharding=plan.batch)
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract.params))
    return train_step.lower(abstract, tokens).compile().as_text(), params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="bf16,mxfp8,mxfp4")
    parser.add_argument("--meshes", default="data=8;fsdp=8;data=2,fsdp=2,tensor=2",
                        help="layouts separated by ';'")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-hidden", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--optimizer-state", default="none")
    args = parser.parse_args()
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} | JAX {jax.__version__} | "
          f"d={args.d_model}, {args.layers} layers, compute {args.dtype}, float32 params")
    print("| recipe | mesh | collective bytes per step (MB, by kind and dtype) | / float32 params |")
    print("|---|---|---|---|")
    for recipe in args.recipes.split(","):
        for mesh in args.meshes.split(";"):
            text, params = step_hlo(recipe, mesh, args)
            totals = collective_bytes(text)
            parts = ", ".join(f"{kind} {dtype} {size / 1e6:.2f}"
                              for (kind, dtype), size in sorted(totals.items()))
            print(f"| {recipe} | {mesh} | {parts or 'none'} | "
                  f"{sum(totals.values()) / (4 * params):.2f} |", flush=True)


if __name__ == "__main__":
    main()

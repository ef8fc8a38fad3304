"""Multi-GPU scaling of the LM example (issue 9): tokens/s on N GPUs vs N x tokens/s on one.

    python benchmarks/lm_scaling.py --preset base --recipe mxfp4 --steps 40 --out /tmp/scaling
                                    [any other train_lm.py option, e.g. --scan-layers]

Runs ``examples/train_lm.py`` once per layout, each in its own process: one device
(``--mesh data=1``), then data parallel (``data=N``) and FSDP (``fsdp=N``) over all visible
devices, with the per-device batch held fixed (weak scaling: N devices train on N times the
sequences of one). Scaling efficiency = tokens/s of the layout / (N x tokens/s of one device);
the issue's bar on two GPUs is >= 90% data parallel and >= 85% FSDP. Tokens/s exclude
compilation, the first step and validation (the example's own timing).
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from train_lm import PRESETS  # noqa: E402


def run_layout(name: str, mesh: str, batch_size: int, args, train_lm_args: list[str],
               visible: str | None) -> dict:
    out = pathlib.Path(args.out) / name
    command = [sys.executable, str(ROOT / "examples" / "train_lm.py"), "--preset", args.preset,
               "--recipes", args.recipe, "--steps", str(args.steps), "--eval-every", "100000",
               "--batch-size", str(batch_size), "--mesh", mesh, "--out", str(out), *train_lm_args]
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    with open(out / "results.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["recipe"] == args.recipe)
    return {"layout": name, "mesh": mesh, "batch": batch_size, "tokens/s": float(row["tokens/s"]),
            "step ms": float(row["step ms"]), "compile s": float(row["compile s"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--recipe", default="mxfp4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--per-device-batch", type=int, default=None,
                        help="sequences per device and step (default: the preset's batch)")
    parser.add_argument("--devices", type=int, default=None, help="N (default: all visible)")
    parser.add_argument("--out", default="/tmp/lm_scaling")
    args, train_lm_args = parser.parse_known_args()

    import jax  # only to count the devices; each layout runs in a fresh process

    n = args.devices or jax.device_count()
    if n < 2:
        raise SystemExit(f"lm_scaling needs at least 2 devices; {jax.device_count()} visible.")
    per_device = args.per_device_batch or PRESETS[args.preset].batch_size
    rows = [run_layout("1 device", "data=1", per_device, args, train_lm_args, visible="0")]
    for name, mesh in ((f"data parallel x{n}", f"data={n}"), (f"FSDP x{n}", f"fsdp={n}")):
        rows.append(run_layout(name, mesh, per_device * n, args, train_lm_args, None))
    one = rows[0]["tokens/s"]
    print(f"\n{jax.devices()[0].device_kind} x{n} | JAX {jax.__version__} | preset {args.preset} | "
          f"recipe {args.recipe} {' '.join(train_lm_args)} | {per_device} sequences per device")
    print("| layout | mesh | batch | tokens/s | step ms | compile s | scaling efficiency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        devices = 1 if r["mesh"] == "data=1" else n
        print(f"| {r['layout']} | {r['mesh']} | {r['batch']} | {r['tokens/s']:,.0f} | "
              f"{r['step ms']:.1f} | {r['compile s']:.0f} | {r['tokens/s'] / (devices * one):.1%} |")


if __name__ == "__main__":
    main()

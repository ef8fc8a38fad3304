"""The final table (Markdown + CSV), the loss curves (CSV + PNG) of a multi-recipe run."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import pathlib

import numpy as np

from lm.train import History

BASELINE = "bf16"
COLUMNS = ("recipe", "final val loss", "gap to bf16 %", "final train loss", "tokens/s",
           "step ms", "step time / bf16", "MFU %", "compile s", "status")


@dataclasses.dataclass(frozen=True)
class Row:
    recipe: str
    val_loss: float
    gap_percent: float
    train_loss: float
    tokens_per_second: float
    step_ms: float
    step_ratio: float
    mfu_percent: float
    compile_seconds: float
    status: str

    def values(self) -> tuple:
        return (self.recipe, self.val_loss, self.gap_percent, self.train_loss,
                self.tokens_per_second, self.step_ms, self.step_ratio, self.mfu_percent,
                self.compile_seconds, self.status)


def final_train_loss(history: History, window: int = 20) -> float:
    """Mean training loss of the last ``window`` steps."""
    return float(np.mean(history.train_loss[-window:])) if history.train_loss else math.nan


def rows(histories: list[History], *, tokens_per_step: int, flops_per_token: float,
         peak_flops: float | None) -> list[Row]:
    """One :class:`Row` per recipe; gaps and step-time ratios relative to the ``bf16`` run (NaN
    when there is none), MFU relative to ``peak_flops`` (NaN when unknown, e.g. on a CPU)."""
    baseline = next((h for h in histories if h.recipe == BASELINE), None)
    out = []
    for h in histories:
        val = h.val_loss[-1] if h.val_loss else math.nan
        seconds = h.seconds_per_step
        tokens_per_second = tokens_per_step / seconds if seconds > 0 else math.nan
        gap = ratio = math.nan
        if baseline is not None and baseline.val_loss:
            gap = 100.0 * (val - baseline.val_loss[-1]) / baseline.val_loss[-1]
            ratio = seconds / baseline.seconds_per_step
        mfu = (100.0 * tokens_per_second * flops_per_token / peak_flops
               if peak_flops else math.nan)
        status = "ok" if h.diverged_at is None else f"diverged at step {h.diverged_at}"
        out.append(Row(h.recipe, val, gap, final_train_loss(h), tokens_per_second,
                       1e3 * seconds, ratio, mfu, h.compile_seconds, status))
    return out


def _cell(value, digits: int) -> str:
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return "n/a"
    return f"{value:,.{digits}f}"


_DIGITS = (None, 4, 2, 4, 0, 1, 2, 1, 1, None)


def markdown(table: list[Row]) -> str:
    """The table as Markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table:
        lines.append("| " + " | ".join(_cell(v, d) for v, d in zip(row.values(), _DIGITS))
                     + " |")
    return "\n".join(lines)


def write_csv(table: list[Row], path: pathlib.Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in table:
            writer.writerow(row.values())


def write_curves(histories: list[History], path: pathlib.Path) -> None:
    """Every recorded loss: ``recipe,split,step,loss`` (split ``train`` or ``val``)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("recipe", "split", "step", "loss"))
        for h in histories:
            writer.writerows((h.recipe, "train", s, v) for s, v in zip(h.train_steps, h.train_loss))
            writer.writerows((h.recipe, "val", s, v) for s, v in zip(h.val_steps, h.val_loss))


def smooth(values: list[float], weight: float) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)))
    return np.asarray(out)


def can_plot() -> bool:
    """Whether matplotlib is installed (it is imported only to plot)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(histories: list[History], path: pathlib.Path, title: str) -> None:
    """Training (smoothed) and validation loss curves side by side as a PNG (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axes, val_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for h in histories:
        if h.train_loss:
            train_axes.plot(h.train_steps, smooth(h.train_loss, 0.9), label=h.recipe, lw=1.2)
        if h.val_loss:
            val_axes.plot(h.val_steps, h.val_loss, marker="o", ms=3, label=h.recipe, lw=1.2)
    for axes, name in ((train_axes, "training loss (EMA 0.9)"), (val_axes, "validation loss")):
        axes.set_xlabel("step")
        axes.set_ylabel(f"{name}, nats/byte")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

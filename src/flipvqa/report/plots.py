"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

Every run gets the same colour in every figure; several runs share the axes, with a legend
naming each run."""

from __future__ import annotations

import io
import math

import matplotlib

from ..quiet import quiet_import

matplotlib.use("Agg")
quiet_import("matplotlib.font_manager")  # its one-time font-cache note stays out of the report's output
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .runs import LOSSES, Run  # noqa: E402

DPI = 100
PANELS = {"loss": "Total loss (VQA + VAQ + QAV)", "vqa_loss": "VQA loss", "vaq_loss": "VAQ loss",
          "qav_loss": "QAV loss", "lr": "Learning rate", "grad_norm": "Gradient norm"}
SMOOTH_ABOVE = 200  # steps: above this many, the raw curve is drawn faint under a running mean


def colour(i: int):
    return plt.get_cmap("tab10")(i % 10)


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        return buf.getvalue()
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- training curves
def curve_mode(runs: list[Run]) -> str:
    """"step" when every run has metrics.jsonl, "epoch" when none has, else "mixed" (all drawn
    against the epoch, a step at its fraction of its epoch)."""
    have = [r.steps is not None for r in runs]
    return "step" if all(have) else "epoch" if not any(have) else "mixed"


def _series(run: Run, key: str, mode: str) -> tuple[list[float], list[float]]:
    """(x, y) of one panel for one run."""
    if run.steps is None:  # log.txt: the epoch's mean; at the epoch's middle beside steps
        shift = 0.5 if mode == "mixed" else 0.0
        return ([e["epoch"] + shift for e in run.log],
                [_float(e.get(f"train_{key}")) for e in run.log])
    if mode == "step":
        return [s["step"] for s in run.steps], [s[key] for s in run.steps]
    per_epoch: dict[int, int] = {}
    for s in run.steps:
        per_epoch[s["epoch"]] = per_epoch.get(s["epoch"], 0) + 1
    xs, seen = [], {}
    for s in run.steps:
        k = seen[s["epoch"]] = seen.get(s["epoch"], -1) + 1
        xs.append(s["epoch"] + k / per_epoch[s["epoch"]])
    return xs, [s[key] for s in run.steps]


def _float(value) -> float:
    return math.nan if value is None else float(value)


def _running_mean(y: np.ndarray, window: int) -> np.ndarray:
    """A trailing mean over ``window`` values, ignoring NaN."""
    valid = ~np.isnan(y)
    sums = np.cumsum(np.where(valid, y, 0.0))
    counts = np.cumsum(valid)
    sums[window:] = sums[window:] - sums[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def training_figure(runs: list[Run]) -> Figure:
    """The losses, the lr (and the gradient norm, from metrics.jsonl) per step or per epoch."""
    mode = curve_mode(runs)
    keys = [*LOSSES, "lr"] + (["grad_norm"] if mode != "epoch" else [])
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), layout="constrained")
    axes = axes.ravel()
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    handles = []
    for ax, key in zip(axes, keys):
        all_zero = True
        for i, run in enumerate(runs):
            if key == "grad_norm" and run.steps is None:
                continue
            x, y = _series(run, key, mode)
            y = np.asarray(y, dtype=float)
            all_zero &= bool(np.all(np.nan_to_num(y) == 0))
            per_step = run.steps is not None
            if per_step and len(y) > SMOOTH_ABOVE:
                ax.plot(x, y, color=colour(i), lw=0.6, alpha=0.25)
                line, = ax.plot(x, _running_mean(y, max(len(y) // 50, 2)), color=colour(i), lw=1.6)
            else:
                marker = "o" if not per_step else "." if len(y) <= 60 else None  # few steps: show each
                line, = ax.plot(x, y, color=colour(i), lw=1.4, marker=marker, ms=4)
            if key == "loss":
                handles.append(line)
        ax.set_title(PANELS[key], fontsize=11)
        ax.set_xlabel("optimizer step" if mode == "step" else "epoch")
        ax.grid(alpha=0.3)
        if mode != "mixed":  # steps and epochs are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        else:  # an offset ("1e-6+1.05e1") would sit on the title
            ax.ticklabel_format(axis="y", useOffset=False)
        if all_zero and key in ("vaq_loss", "qav_loss"):
            ax.text(0.5, 0.75, "0 throughout: objective off", transform=ax.transAxes,
                    ha="center", va="center", color="0.35", fontsize=10)
    how = {"step": "per optimizer step (metrics.jsonl)", "epoch": "per epoch: training means (log.txt)",
           "mixed": "per step (metrics.jsonl) or per epoch (log.txt), against the epoch"}[mode]
    fig.suptitle(f"Training losses and learning rate, {how}", fontsize=13)
    fig.legend(handles, [r.name for r in runs], loc="outside lower center", ncol=min(len(runs), 4),
               fontsize=10, frameon=False)
    return fig


# ---------------------------------------------------------------------------- validation
def val_figure(runs: list[Run]) -> Figure:
    """Validation accuracy (%) per epoch, the best epoch of each run starred."""
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    for i, run in enumerate(runs):
        x = [e["epoch"] for e in run.log]
        y = [100 * e["val_acc"] for e in run.log]
        ax.plot(x, y, color=colour(i), lw=1.6, marker="o", ms=5, label=run.name)
        best, epoch = run.best
        ax.plot([epoch], [100 * best], color=colour(i), marker="*", ms=15, ls="none")
    ax.set_title("Validation accuracy per epoch (\u2605 best epoch)", fontsize=13)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=10)
    return fig

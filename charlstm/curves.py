"""Training curves from a run's metrics.jsonl: the figure every run draws (curves.png and curves.svg:
loss against step and against training time, the learning rate on a second axis) and several runs
overlaid (`charlstm plot`). matplotlib is an optional extra (plots.py); docs/training.md shows them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir
from .plots import require_matplotlib, save_figure

TRAIN_COLOR, VAL_COLOR, LR_COLOR = "#1f77b4", "#d62728", "#7f7f7f"
LN2 = math.log(2.0)


@dataclass
class Curve:
    """One run's points from metrics.jsonl, in the order they were written."""

    label: str
    train: list[dict] = field(default_factory=list)   # the lines of the log cadence: {step, elapsed, train_loss}
    val: list[dict] = field(default_factory=list)     # the evaluations: {step, elapsed, val_loss}
    lr: list[dict] = field(default_factory=list)      # every line: {step, elapsed, lr}

    @property
    def best(self) -> dict | None:
        """The evaluation with the lowest validation loss (the first of equals)."""
        return min(self.val, key=lambda p: p["val_loss"]) if self.val else None

    @property
    def empty(self) -> bool:
        return not (self.train or self.val)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (a line cut short by a crash, or not JSON, is skipped)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and _number(rec.get("step")) is not None:
                records.append(rec)
    return records


def curve_of(records: list[dict], label: str) -> Curve:
    """Split metrics.jsonl records into the training, validation and learning-rate series.

    An evaluation's line also carries the smoothed training loss; the training
    series takes the lines of the log cadence only (each the mean loss of its steps).
    """
    curve = Curve(label)
    for rec in records:
        point = {"step": rec["step"], "elapsed": _number(rec.get("elapsed"))}
        if _number(rec.get("lr")) is not None:
            curve.lr.append({**point, "lr": rec["lr"]})
        if _number(rec.get("val_loss")) is not None:
            curve.val.append({**point, "val_loss": rec["val_loss"]})
        elif _number(rec.get("train_loss")) is not None:
            curve.train.append({**point, "train_loss": rec["train_loss"]})
    return curve


def read_curve(run_dir: Path, label: str | None = None) -> Curve:
    """The curve of a run directory (its metrics.jsonl), labelled with its name unless ``label``."""
    run_dir = Path(run_dir)
    return curve_of(read_metrics(run_dir / rundir.METRICS), label or run_dir.name)


# --------------------------------------------------------------------------- axes

def time_unit(seconds: float) -> tuple[float, str]:
    """(divisor, name) for a time axis reaching ``seconds``: s under 2 minutes, min under 2 hours, else h."""
    if seconds < 120:
        return 1.0, "s"
    if seconds < 7200:
        return 60.0, "min"
    return 3600.0, "h"


def loss_limits(curves: list[Curve]) -> tuple[float, float] | None:
    """Linear y limits that show what matters: every validation point and the training loss after its
    first steep tenth (the first points, near ln V, would squash the rest); None without points."""
    shown, everything = [], []
    for c in curves:
        val = [p["val_loss"] for p in c.val]
        train = [p["train_loss"] for p in c.train]
        shown += val + (train[len(train) // 10:] if len(train) >= 10 else train)
        everything += val + train
    if not everything:
        return None
    lo, hi = min(everything), max(shown)
    pad = 0.06 * (hi - lo) if hi > lo else max(0.05 * abs(hi), 0.05)
    return lo - pad, hi + pad


def _number(v) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _xs(points: list[dict], x: str, scale: float) -> list[float]:
    return [p[x] / scale for p in points]


def _timed(points: list[dict]) -> list[dict]:
    return [p for p in points if p.get("elapsed") is not None]


# --------------------------------------------------------------------------- one run

def draw_run(curve: Curve, stem: Path, *, title: str, subtitle: str = "") -> list[Path]:
    """curves.png/.svg of one run (``stem`` without suffix): two panels, loss against step and against
    training time, train and validation loss in nats/char, the learning rate on a second axis.
    Returns the paths written; plots.PlottingUnavailable without matplotlib."""
    Figure = require_matplotlib()
    fig = Figure(figsize=(11, 4.4), dpi=100)
    # Fixed margins (constrained layout would double the time a draw takes, about 0.4 s here)
    fig.subplots_adjust(left=0.062, right=0.94, bottom=0.2, top=0.86, wspace=0.2)
    step_ax, time_ax = fig.subplots(1, 2, sharey=True)
    scale, unit = time_unit(max((p["elapsed"] for p in _timed(curve.train + curve.val)), default=0.0))
    handles = _panel(step_ax, curve, "step", 1.0)
    _panel(time_ax, curve, "elapsed", scale)
    step_ax.set_xlabel("optimizer step")
    time_ax.set_xlabel(f"training time ({unit}; evaluation and saving excluded)")
    step_ax.set_ylabel("loss (nats/char)")
    limits = loss_limits([curve])
    if limits is not None:
        step_ax.set_ylim(*limits)
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncols=len(handles), fontsize="small",
               frameon=False)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize="medium")
    return save_figure(fig, stem)


def _panel(ax, curve: Curve, x: str, scale: float) -> list:
    """One panel: train loss, validation points, the best one, the learning rate on a twin axis."""
    train = curve.train if x == "step" else _timed(curve.train)
    val = curve.val if x == "step" else _timed(curve.val)
    lr = curve.lr if x == "step" else _timed(curve.lr)
    handles = []
    if train:
        (line,) = ax.plot(_xs(train, x, scale), [p["train_loss"] for p in train], color=TRAIN_COLOR,
                          linewidth=1.2, alpha=0.85, label="train (mean over each log interval)")
        handles.append(line)
    if val:
        (line,) = ax.plot(_xs(val, x, scale), [p["val_loss"] for p in val], color=VAL_COLOR, linewidth=1.6,
                          marker="o", markersize=4.5, label="validation")
        handles.append(line)
        best = curve.best
        if x == "step" or best.get("elapsed") is not None:
            (star,) = ax.plot([best[x] / scale], [best["val_loss"]], linestyle="none", marker="*", markersize=13,
                              color=VAL_COLOR, markeredgecolor="black", markeredgewidth=0.6,
                              label=f"best validation: {best['val_loss']:.4f} nats/char = {best['val_loss'] / LN2:.3f} "
                                    f"bpc (step {best['step']:,})")
            handles.append(star)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    if lr:
        lr_ax = ax.twinx()
        (line,) = lr_ax.plot(_xs(lr, x, scale), [p["lr"] for p in lr], color=LR_COLOR, linestyle="--",
                             linewidth=1.0, alpha=0.8, label="learning rate (right axis)")
        lr_ax.set_ylim(0, max(p["lr"] for p in lr) * 1.08 or 1.0)
        lr_ax.set_ylabel("learning rate", color=LR_COLOR)
        lr_ax.tick_params(axis="y", colors=LR_COLOR, labelsize="small")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles.append(line)
    return handles


# --------------------------------------------------------------------------- several runs

def draw_overlay(curves: list[Curve], stem: Path, *, x: str = "step", title: str = "") -> list[Path]:
    """Several runs on one panel against ``x`` (``step`` or ``time``): each run one colour, its
    validation points joined and marked, its training loss as a thin line of the same colour.
    Returns the paths written; plots.PlottingUnavailable without matplotlib."""
    Figure = require_matplotlib()
    key = "step" if x == "step" else "elapsed"
    fig = Figure(figsize=(9, 5.2), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.1, top=0.93)
    ax = fig.add_subplot()
    seconds = max((p["elapsed"] for c in curves for p in _timed(c.train + c.val)), default=0.0)
    scale, unit = (1.0, "") if key == "step" else time_unit(seconds)
    colors = _colors(len(curves))
    for c, color in zip(curves, colors):
        train = c.train if key == "step" else _timed(c.train)
        val = c.val if key == "step" else _timed(c.val)
        if train:
            ax.plot(_xs(train, key, scale), [p["train_loss"] for p in train], color=color, linewidth=0.9, alpha=0.35)
        best = c.best
        label = c.label + (f" (best val {best['val_loss']:.4f})" if best else "")
        if val:
            ax.plot(_xs(val, key, scale), [p["val_loss"] for p in val], color=color, linewidth=1.8, marker="o",
                    markersize=4, label=label)
        else:   # no evaluation yet: the legend entry is the training line's
            ax.plot([], [], color=color, linewidth=1.8, label=label)
    ax.set_xlabel("optimizer step" if key == "step" else f"training time ({unit}; evaluation and saving excluded)")
    ax.set_ylabel("loss (nats/char)")
    ax.set_xlim(left=0)
    limits = loss_limits(curves)
    if limits is not None:
        ax.set_ylim(*limits)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", title="validation (markers); training (thin lines)", title_fontsize="small",
              loc="upper right", framealpha=0.9)
    ax.set_title(title or f"Training curves of {len(curves)} run{'s' if len(curves) != 1 else ''}")
    return save_figure(fig, stem)


def _colors(n: int) -> list:
    """Distinct colours: matplotlib's tab10 up to ten runs, tab20 beyond (cycled past 20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(n)]

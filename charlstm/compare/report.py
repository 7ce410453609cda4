"""A comparison's report: rows from the runs' results, the CSV, JSON and plot files, the tables.

The summary (a JSON-safe dict, also written as summary.json) is what the
command prints: ``make_table`` gives the rich table, the command line prints it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import statistics
from pathlib import Path

from rich.table import Table

from ..config import CompareConfig
from ..diskfiles import write_text_atomic
from ..plots import Series, try_plot_lines

LN2 = math.log(2.0)

CORPUS_CSV_COLUMNS = [
    "variant", "form", "hidden", "params", "seeds",
    "best_val_loss_mean", "best_val_loss_std", "best_val_bpc_mean", "best_val_bpc_std",
    "final_val_loss_mean", "final_val_loss_std", "final_val_bpc_mean", "final_val_bpc_std",
    "chars_per_sec_mean", "train_time_mean", "wall_time_mean", "steps_mean",
]
RUN_CSV_COLUMNS = [
    "variant", "seed", "gap", "form", "hidden", "params", "best_val_loss", "final_val_loss", "best_val_bpc",
    "final_val_bpc", "accuracy", "best_accuracy", "chars_per_sec", "steps", "train_time", "wall_time", "run_dir",
]


# --------------------------------------------------------------------------- statistics

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    if len(vals) == 1:
        return vals[0], 0.0
    return statistics.fmean(vals), statistics.stdev(vals)


def format_pm(mean: float, std: float, n: int, digits: int = 3) -> str:
    """'1.234' for one seed, '1.234 ± 0.012' for several."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if n <= 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Mean val loss (and training time) over seeds at the steps every seed evaluated, then at the
    seeds' final evaluations where each came after those (a time budget ends each seed at its own
    step: the point sits at their mean step)."""
    if not curves:
        return []
    common = set(c["step"] for c in curves[0])
    for curve in curves[1:]:
        common &= set(c["step"] for c in curve)
    groups = [[next(c for c in curve if c["step"] == step) for curve in curves] for step in sorted(common)]
    last = max(common, default=-1)
    if all(curve and curve[-1]["step"] > last for curve in curves):
        groups.append([curve[-1] for curve in curves])
    return [_mean_point(points) for points in groups]


def _mean_point(points: list[dict]) -> dict:
    loss_mean, loss_std = mean_std([p["val_loss"] for p in points])
    times = [p["time"] for p in points if p.get("time") is not None]
    return {"step": round(statistics.fmean(p["step"] for p in points)),
            "time": statistics.fmean(times) if times else None, "val_loss": loss_mean, "val_loss_std": loss_std}


def finite_json(obj):
    """The object with every NaN or infinity replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- summaries

def _public(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "fingerprint"} for r in runs]


def corpus_summary(settings: CompareConfig, runs: list[dict], corpus_meta: dict,
                   reference_params: int | None) -> dict:
    """One row per variant (means and standard deviations over seeds), sorted by best val loss."""
    rows = []
    for variant in settings.variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "form": mine[0]["form"], "hidden": mine[0]["hidden"],
               "params": mine[0]["params"], "seeds": len(mine)}
        for key in ("best_val_loss", "final_val_loss", "best_val_bpc", "final_val_bpc",
                    "chars_per_sec", "train_time", "wall_time", "steps"):
            row[key + "_mean"], row[key + "_std"] = mean_std([r[key] for r in mine])
        row["curve"] = mean_curve([r["curve"] for r in mine])
        rows.append(row)
    rows.sort(key=lambda r: (not math.isfinite(r["best_val_loss_mean"]), r["best_val_loss_mean"]))
    return finite_json({
        "task": "corpus", "data": settings.train.data, "corpus": corpus_meta,
        "reference_params": reference_params, "settings": settings.to_dict(), "rows": rows,
        "runs": _public(runs), "files": {},
    })


def long_gap_summary(settings: CompareConfig, runs: list[dict]) -> dict:
    """One row per variant with the mean recall accuracy at each gap."""
    rows = []
    for variant in settings.variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "form": mine[0]["form"], "hidden": mine[0]["hidden"],
               "params": mine[0]["params"], "gaps": {}}
        for gap in settings.gaps:
            at_gap = [r for r in mine if r["gap"] == gap]
            acc_mean, acc_std = mean_std([r["accuracy"] for r in at_gap])
            best_mean, _ = mean_std([r["best_accuracy"] for r in at_gap])
            row["gaps"][str(gap)] = {
                "accuracy_mean": acc_mean, "accuracy_std": acc_std, "best_accuracy_mean": best_mean,
                "steps_mean": mean_std([r["steps"] for r in at_gap])[0],
                "wall_time_mean": mean_std([r["wall_time"] for r in at_gap])[0], "n": len(at_gap),
            }
        rows.append(row)
    return finite_json({
        "task": "long-gap", "chance": 1.0 / settings.num_keys, "settings": settings.to_dict(),
        "rows": rows, "runs": _public(runs), "files": {},
    })


# --------------------------------------------------------------------------- files

@contextlib.contextmanager
def _atomic_text(path: Path):
    """Write a text file through a buffer and replace ``path`` at once when done."""
    buf = io.StringIO(newline="")
    yield buf
    write_text_atomic(Path(path), buf.getvalue())


def _num(v):
    """A CSV cell: numbers as they are, NaN as an empty cell."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return v


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with _atomic_text(path) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[_num(v) for v in row] for row in rows])


def _write_runs_csv(summary: dict, out: Path) -> None:
    _write_csv(out / "runs.csv", RUN_CSV_COLUMNS, [[r.get(k) for k in RUN_CSV_COLUMNS] for r in summary["runs"]])
    summary["files"]["runs csv"] = str(out / "runs.csv")


def _write_json(summary: dict, out: Path) -> None:
    summary["files"]["json"] = str(out / "summary.json")
    with _atomic_text(out / "summary.json") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def write_corpus_files(summary: dict, settings: CompareConfig, plot: bool) -> None:
    """summary.csv, runs.csv, the learning curves (with matplotlib) and summary.json; paths in summary['files']."""
    out = settings.out
    _write_csv(out / "summary.csv", CORPUS_CSV_COLUMNS,
               [[row[k] for k in CORPUS_CSV_COLUMNS] for row in summary["rows"]])
    summary["files"]["csv"] = str(out / "summary.csv")
    _write_runs_csv(summary, out)
    summary["plot_message"] = None
    if plot:
        several = len(settings.seeds) > 1
        for x_key, stem, xlabel in (("step", "curves-step", "optimizer step"),
                                    ("time", "curves-time", "training time (s, evaluation excluded)")):
            series = []
            for row in summary["rows"]:
                pts = [p for p in row["curve"] if p.get(x_key) is not None]
                series.append(Series(
                    f"{row['variant']} ({row['params']:,} params)", [p[x_key] for p in pts],
                    [p["val_loss"] for p in pts], spread=[p["val_loss_std"] for p in pts] if several else None,
                ))
            written, message = try_plot_lines(
                series, out / stem, title=f"Validation loss on {Path(settings.train.data).name} "
                                          f"({budget_text(summary['settings'])} per run)",
                xlabel=xlabel, ylabel="validation loss (nats/char)",
            )
            for path in written:
                summary["files"][f"{stem} {path.suffix[1:]}"] = str(path)
            summary["plot_message"] = message
    _write_json(summary, out)


def write_long_gap_files(summary: dict, settings: CompareConfig, plot: bool) -> None:
    """summary.csv, runs.csv, accuracy against gap (with matplotlib) and summary.json."""
    out, gaps = settings.out, settings.gaps
    rows = []
    for row in summary["rows"]:
        for gap in gaps:
            g = row["gaps"][str(gap)]
            rows.append([row["variant"], row["form"], row["hidden"], row["params"], gap, g["accuracy_mean"],
                         g["accuracy_std"], g["best_accuracy_mean"], summary["chance"], g["n"], g["steps_mean"],
                         g["wall_time_mean"]])
    _write_csv(out / "summary.csv", ["variant", "form", "hidden", "params", "gap", "accuracy_mean", "accuracy_std",
                                     "best_accuracy_mean", "chance", "seeds", "steps_mean", "wall_time_s_mean"], rows)
    summary["files"]["csv"] = str(out / "summary.csv")
    _write_runs_csv(summary, out)
    summary["plot_message"] = None
    if plot:
        series = [
            Series(row["variant"], [float(g) for g in gaps],
                   [row["gaps"][str(g)]["accuracy_mean"] for g in gaps],
                   spread=[row["gaps"][str(g)]["accuracy_std"] for g in gaps] if len(settings.seeds) > 1 else None)
            for row in summary["rows"]
        ]
        written, message = try_plot_lines(
            series, out / "accuracy-vs-gap", title=f"Recall after a gap ({settings.num_keys} keys, "
                                                   f"{budget_text(summary['settings'])} per run)",
            xlabel="gap G (distractors between key and recall)", ylabel="recall accuracy (held-out)",
            xscale="log" if min(gaps) > 0 and max(gaps) / max(min(gaps), 1) >= 10 else "linear",
            xticks=[float(g) for g in gaps],
            ylim=(0.0, 1.02), hlines=[(summary["chance"], f"chance (1/{settings.num_keys})")],
        )
        for path in written:
            summary["files"][f"plot {path.suffix[1:]}"] = str(path)
        summary["plot_message"] = message
    _write_json(summary, out)


# --------------------------------------------------------------------------- tables

def budget_text(s: dict) -> str:
    """'500 steps', '90 s' or '500 steps or 90 s' from a summary's settings."""
    parts = []
    if s.get("max_steps"):
        parts.append(f"{s['max_steps']} steps")
    if s.get("max_time"):
        parts.append(f"{s['max_time']:g} s")
    return " or ".join(parts)


def _fmt(v, spec: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def make_table(summary: dict) -> Table:
    """The rich table of a summary (either task)."""
    return long_gap_table(summary) if summary["task"] == "long-gap" else corpus_table(summary)


def long_gap_table(summary: dict) -> Table:
    """A rich table: one row per variant, recall accuracy (%) per gap, chance in the caption."""
    s = summary["settings"]
    gaps, n_seeds = s["gaps"], len(s["seeds"])
    table = Table(
        title=f"Long-gap recall accuracy, held-out ({s['num_keys']} keys, chance {summary['chance']:.1%}; "
              f"{budget_text(s)} per run, {n_seeds} seed{'s' if n_seeds > 1 else ''})",
    )
    table.add_column("variant")
    table.add_column("form/backend")
    table.add_column("hidden", justify="right")
    table.add_column("params", justify="right")
    for gap in gaps:
        table.add_column(f"gap {gap}", justify="right")
    for row in summary["rows"]:
        cells = []
        for gap in gaps:
            g = row["gaps"][str(gap)]
            cells.append(format_pm(100 * g["accuracy_mean"], 100 * g["accuracy_std"], g["n"], digits=1) + "%")
        table.add_row(row["variant"], row["form"], str(row["hidden"]), f"{row['params']:,}", *cells)
    return table


def corpus_table(summary: dict) -> Table:
    """A rich table: one row per variant, sorted by best validation loss."""
    s = summary["settings"]
    n_seeds = len(s["seeds"])
    size = (f"sized to match an lstm of {s['hidden']} ({summary['reference_params']:,} params)"
            if s["match_params"] else f"{s['hidden']} units")
    table = Table(
        title=f"{Path(s['data']).name}: {s['layers']} layer{'s' if s['layers'] > 1 else ''}, {size}, "
              f"{budget_text(s)} per run, {n_seeds} seed{'s' if n_seeds > 1 else ''}",
        caption="sorted by best validation loss; nats/char, and bits/char (bpc) = nats / ln 2"
                + ("; mean ± std over seeds" if n_seeds > 1 else ""),
    )
    for name, justify in (("variant", "left"), ("form/backend", "left"), ("hidden", "right"), ("params", "right"),
                          ("best val nats", "right"), ("best val bpc", "right"), ("final val nats", "right"),
                          ("final val bpc", "right"), ("train chars/s", "right"), ("train s", "right"),
                          ("wall s", "right")):
        table.add_column(name, justify=justify)
    for r in summary["rows"]:
        n = r["seeds"]
        table.add_row(
            r["variant"], r["form"], str(r["hidden"]), f"{r['params']:,}",
            format_pm(r["best_val_loss_mean"], r["best_val_loss_std"], n),
            format_pm(r["best_val_bpc_mean"], r["best_val_bpc_std"], n),
            format_pm(r["final_val_loss_mean"], r["final_val_loss_std"], n),
            format_pm(r["final_val_bpc_mean"], r["final_val_bpc_std"], n),
            _fmt(r["chars_per_sec_mean"], ",.0f"), _fmt(r["train_time_mean"], ".0f"), _fmt(r["wall_time_mean"], ".0f"),
        )
    return table

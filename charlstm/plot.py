"""`charlstm plot RUN [RUN...]`: the training curves of several runs overlaid in one figure (PNG and
SVG), read from their metrics.jsonl; a compare-variants directory stands for the runs inside it."""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint as ckpt_mod
from . import configfile, plots, rundir
from .console import note
from .curves import Curve, draw_overlay, read_curve
from .errors import CharlstmError, UsageError

X_AXES = ("step", "time")
FIGURE_SUFFIXES = tuple("." + fmt for fmt in plots.FORMATS)
OTHER_IMAGE_SUFFIXES = (".pdf", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp", ".gif")
UNAVAILABLE = "charlstm plot needs matplotlib, an optional extra: pip install 'charlstm[plot]'"
NOT_A_RUN = ("give a run directory written by `charlstm train` (e.g. checkpoints/NAME) or a directory "
             "written by `charlstm compare-variants`")


def runs_of(path: Path) -> list[Path]:
    """The run directories that ``path`` names: a run directory (or a checkpoint or pointer inside one)
    is itself; a compare-variants directory is its runs. UsageError for anything else."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; {NOT_A_RUN}")
    if path.is_file() and path.name not in (*ckpt_mod.POINTERS, rundir.METRICS):
        raise UsageError(f"{path} is a file, not a run directory; {NOT_A_RUN}")
    if path.is_file() or ckpt_mod.CKPT_PATTERN.match(path.name):
        path = path.parent                     # a pointer, metrics.jsonl or checkpoint of the run
    if (path / rundir.METRICS).is_file():
        return [path]
    inside = sorted(p.parent for p in path.glob(f"*/{rundir.METRICS}"))
    if inside:
        return inside
    if _task_of_comparison(path) == "long-gap":
        raise UsageError(f"{path} is a long-gap comparison: its runs have no loss curves over text "
                         "(its accuracy-vs-gap figure is beside its summary.csv)")
    if rundir.holds_run(path):
        raise UsageError(f"{path} holds checkpoints but no {rundir.METRICS}, which the curves are drawn from")
    raise UsageError(f"{path} is not a run directory (no {rundir.METRICS}) nor a comparison of runs; {NOT_A_RUN}")


def _task_of_comparison(path: Path) -> str | None:
    try:
        return json.loads((path / "summary.json").read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError):
        return None


def variant_of(run: Path) -> str | None:
    """The cell variant a run trained (its config.toml, else its latest checkpoint's config.json)."""
    try:
        return configfile.read_toml(run / configfile.RUN_CONFIG)["model"]["variant"]
    except (CharlstmError, KeyError, TypeError):
        pass
    ckpt = ckpt_mod.read_pointer(run, "latest") or ckpt_mod.read_pointer(run, "best")
    try:
        return json.loads((ckpt / "config.json").read_text(encoding="utf-8"))["model"]["variant"]
    except (TypeError, OSError, ValueError, KeyError):
        return None


def labels_of(runs: list[Path]) -> list[str]:
    """A legend label per run: its name (with its parent's where two names clash), and its variant
    where the name does not say it: ``lstm-seed1``, ``cmpA/lstm-seed1``, ``mine (gru)``."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.parent.name}/{r.name}" for r in runs]
    out = []
    for run, name in zip(runs, names):
        variant = variant_of(run)
        out.append(name if variant is None or variant in run.name else f"{name} ({variant})")
    return out


def figure_stem(out: Path | None, x: str) -> Path:
    """Where the figure goes: ``--out`` without its .png/.svg suffix, else ``curves-by-STEP|TIME`` here."""
    if out is None:
        return Path(f"curves-by-{x}")
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        raise UsageError(f"--out {out}: charlstm plot writes PNG and SVG; give NAME.png, NAME.svg or NAME")
    if out.name in ("", ".", "..") or out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name such as {out / 'curves.png'}")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the directory {out.parent} does not exist")
    return out.with_suffix("") if suffix in FIGURE_SUFFIXES else out


def plot_runs(paths: list[Path], *, out: Path | None = None, x: str = "step", title: str | None = None) -> list[Path]:
    """Draw the runs ``paths`` name (comparisons expanded) overlaid; the PNG and SVG written.

    UsageError for a bad --x or --out or a path that is not a run; CharlstmError
    without matplotlib or when no run has a point yet.
    """
    if x not in X_AXES:
        raise UsageError(f"--x must be one of {', '.join(X_AXES)} (got {x!r})")
    if not paths:
        raise UsageError("give at least one run directory")
    stem = figure_stem(out, x)
    runs = list(dict.fromkeys(run.resolve() for p in paths for run in runs_of(p)))
    if not plots.have_matplotlib():
        raise CharlstmError(UNAVAILABLE)
    curves: list[Curve] = []
    for run, label in zip(runs, labels_of(runs)):
        curve = read_curve(run, label)
        if curve.empty:
            note(f"note: {run} has no points in its {rundir.METRICS} yet; left out")
        else:
            curves.append(curve)
    if not curves:
        raise CharlstmError(f"no run has a point to draw yet ({rundir.METRICS} is written every --log-every steps)")
    return draw_overlay(curves, stem, x=x, title=title or "")


def run_from_cli(runs: list[Path], *, out: Path | None, x: str, title: str | None) -> list[Path]:
    """`charlstm plot`: draw, and print the paths written on stdout (one a line)."""
    written = plot_runs(runs, out=out, x=x, title=title)
    for path in written:
        print(path)
    return written

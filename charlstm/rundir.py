"""Run directories: where a training run writes, never reusing one by accident, and its metrics.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import checkpoint as ckpt_mod
from .config import ModelConfig, TrainConfig
from .configfile import RUN_CONFIG
from .errors import UsageError

METRICS = "metrics.jsonl"
CURVES = "curves"                 # curves.png and curves.svg, drawn from metrics.jsonl
TENSORBOARD = "tensorboard"       # --tensorboard's event files
_RUN_ENTRIES = ("best", "latest", METRICS)
# Written beside the run's checkpoints (charlstm's own, not a run by themselves).
_SETTINGS = (RUN_CONFIG, f"{CURVES}.png", f"{CURVES}.svg", TENSORBOARD)
_TEMPORARY = (".tmp-ckpt-", ".old-ckpt-", ".best.tmp", ".latest.tmp", ".metrics.jsonl.tmp", f".{RUN_CONFIG}.tmp-",
              f".{CURVES}.png.tmp-", f".{CURVES}.svg.tmp-")


def default_run_name(model_cfg: ModelConfig, data: str) -> str:
    """VARIANT-DATA, e.g. ``lstm-pystdlib``."""
    stem = Path(str(data)).stem or "data"
    return f"{model_cfg.variant}-{stem}"


def requested_run_dir(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[Path, bool]:
    """The directory ``--out``/``--name`` ask for (default ``checkpoints/VARIANT-DATA``), and whether one was named."""
    name = train_cfg.name or default_run_name(model_cfg, train_cfg.data)
    path = Path(train_cfg.out) if train_cfg.out else Path("checkpoints") / name
    return path, bool(train_cfg.out or train_cfg.name)


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds (part of) a run: pointers, metrics or checkpoints."""
    return path.exists() and (any((path / e).exists() for e in _RUN_ENTRIES) or bool(ckpt_mod.list_checkpoints(path)))


def choose_run_dir(run_dir: Path, *, named: bool, overwrite: bool) -> Path:
    """The directory a fresh run writes to; never silently reuses one that holds a run.

    An unnamed run picks a free name (``lstm-pystdlib-2``); a named one that
    exists is an error unless ``overwrite`` (see :func:`clear_run_dir`).
    Nothing is deleted here.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} exists and is not a directory; choose another --out or --name")
    if not holds_run(run_dir):
        return run_dir
    if overwrite:
        run_files(run_dir)  # refuses a directory with files charlstm did not write
        return run_dir
    if named:
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                         "replace it with --overwrite, or choose another --name/--out")
    k = 2
    while holds_run(run_dir.with_name(f"{run_dir.name}-{k}")):
        k += 1
    return run_dir.with_name(f"{run_dir.name}-{k}")


def run_files(run_dir: Path) -> list[Path]:
    """charlstm's own entries in a run directory; UsageError if anything else is there."""
    ours = [p for p in run_dir.iterdir()
            if p.name in _RUN_ENTRIES + _SETTINGS or ckpt_mod.CKPT_PATTERN.match(p.name)
            or p.name.startswith(_TEMPORARY)]
    foreign = sorted(p.name for p in run_dir.iterdir() if p not in ours)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UsageError(f"--overwrite: {run_dir} also holds files charlstm did not write "
                         f"({', '.join(foreign[:5])}{more}); remove them or choose another --out")
    return ours


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's checkpoints, pointers and metrics (for --overwrite)."""
    if run_dir.is_dir():
        for p in run_files(run_dir):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop the lines of metrics.jsonl written after ``last_step`` (a run resumed from that step)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    ckpt_mod.write_text_atomic(path, "".join(line + "\n" for line in kept))


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as it comes."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

"""Run directories: where a training run writes, one writer at a time (a lock), never reusing one by
accident, deleting only charlstm's own files, and its metrics.jsonl."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from . import checkpoint as ckpt_mod
from .config import ModelConfig, TrainConfig
from .configfile import RUN_CONFIG
from .errors import CharlstmError, UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; one writer per run is then the user's care
    fcntl = None

METRICS = "metrics.jsonl"
CURVES = "curves"                 # curves.png and curves.svg, drawn from metrics.jsonl
TENSORBOARD = "tensorboard"       # --tensorboard's event files
LOCK = ".lock"                    # the writer's advisory lock, holding its pid (removed when it ends)
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


# --------------------------------------------------------------------------- one writer per run directory

class RunLocked(CharlstmError):
    """Another process is training this run directory."""

    def __init__(self, run_dir: Path, holder: str):
        self.run_dir, self.holder = run_dir, holder
        who = f"process {holder}" if holder else "another process"
        super().__init__(f"{run_dir} is being trained by {who}; wait for it or choose another --out")


class RunLock:
    """The one writer of a run directory: ``flock`` on RUN/.lock, which holds the writer's pid. The
    kernel drops the lock when the process ends, however it ends (kill -9 included), so it is never
    stale. :meth:`release` removes the file, and the directories the lock created if nothing else
    was written in them."""

    def __init__(self, run_dir: Path, file, created: list[Path]):
        self.run_dir, self._file, self._created = run_dir, file, created

    def release(self) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            (self.run_dir / LOCK).unlink()       # while held: a process that opened it re-checks (see lock_run_dir)
        self._file.close()
        self._file = None
        for d in self._created:                  # leaf first; stops at the first one that holds something
            try:
                d.rmdir()
            except OSError:
                break

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: Path, hint: str = "choose a writable --out") -> RunLock:
    """Create ``run_dir`` if needed and take its lock; RunLocked (with the holder's pid) when another
    process has it, CharlstmError (ending with ``hint``) when the directory cannot be written."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
            if _try_lock(f):
                break
    except OSError as e:
        raise CharlstmError(f"cannot write in {run_dir} ({e.strerror or e}); {hint}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return RunLock(run_dir, f, created)


def _try_lock(f) -> bool:
    """Lock the open lock file; False when the file was removed and replaced while it was opened (the
    lock is then on a file nobody else will see: open it again). RunLocked when another process holds it."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read(32).strip()
        f.close()
        raise RunLocked(Path(f.name).parent, holder) from None
    try:
        st = os.stat(f.name)
        same = (st.st_ino, st.st_dev) == (os.fstat(f.fileno()).st_ino, os.fstat(f.fileno()).st_dev)
    except FileNotFoundError:
        same = False
    if not same:
        f.close()
    return same


def open_run_dir(run_dir: Path, *, named: bool, overwrite: bool) -> RunLock:
    """The directory a fresh run writes to, locked; never silently reuses one that holds a run.

    An unnamed run takes the first free name (``lstm-pystdlib-2``) that no other
    process is training; a named one that holds a run is an error unless
    ``overwrite`` (see :func:`clear_run_dir`), and one that is being trained is
    refused with the trainer's pid. Nothing is deleted here.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} exists and is not a directory; choose another --out or --name")
    k = 1
    while True:
        candidate = run_dir if k == 1 else run_dir.with_name(f"{run_dir.name}-{k}")
        k += 1
        if not named and (holds_run(candidate) or (candidate.exists() and not candidate.is_dir())):
            continue
        try:
            lock = lock_run_dir(candidate)
        except RunLocked:
            if named:
                raise
            continue
        try:
            if holds_run(candidate):
                _reuse(candidate, named=named, overwrite=overwrite)
            return lock
        except CharlstmError:
            lock.release()
            if named:
                raise


def _reuse(run_dir: Path, *, named: bool, overwrite: bool) -> None:
    """Whether a fresh run may write into ``run_dir``, which holds a run: with --overwrite if only
    charlstm's files are there; CharlstmError otherwise (an unnamed run then takes the next name)."""
    if not named:
        raise CharlstmError(f"{run_dir} was taken meanwhile")
    if overwrite:
        run_files(run_dir)  # refuses a directory with files charlstm did not write
        return
    raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                     "replace it with --overwrite, or choose another --name/--out")


# --------------------------------------------------------------------------- deleting charlstm's own files

def run_files(run_dir: Path) -> list[Path]:
    """charlstm's own entries in a run directory; UsageError listing everything else (a symbolic link
    or an entry of the wrong kind under one of charlstm's names included)."""
    ours, foreign = [], []
    for p in sorted(run_dir.iterdir()):
        if p.name == LOCK:
            continue
        kind = _own_kind(p)
        if kind is None:
            ours.append(p)
        else:
            foreign.append(p.name + kind)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UsageError(f"--overwrite: {run_dir} also holds files charlstm did not write "
                         f"({', '.join(foreign[:5])}{more}); remove them or choose another --out")
    return ours


def _own_kind(p: Path) -> str | None:
    """None for an entry charlstm wrote; else what is shown after its name ('' or ' (a symbolic link)')."""
    if p.is_symlink():
        return " (a symbolic link)"
    if p.name in _RUN_ENTRIES + _SETTINGS:
        return None if p.is_file() else " (not a file)"
    if ckpt_mod.CKPT_PATTERN.match(p.name):
        return None if p.is_dir() else " (not a directory)"
    return None if p.name.startswith(_TEMPORARY) else ""


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's files (for --overwrite, under the run's lock): the pointers first, then
    each checkpoint as retention does (its manifest, then the directory renamed away and removed),
    then the rest. Refuses (before deleting anything) a directory holding anything else."""
    if not run_dir.is_dir():
        return
    files = run_files(run_dir)
    order = {"best": 0, "latest": 0}
    for p in sorted(files, key=lambda p: (order.get(p.name, 1), p.name)):
        if ckpt_mod.CKPT_PATTERN.match(p.name):
            ckpt_mod.remove_checkpoint(p)
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


# --------------------------------------------------------------------------- metrics.jsonl

def read_metrics(path: Path, last_step: int) -> list[str]:
    """The lines of a run's metrics.jsonl up to ``last_step`` (a line cut short by a crash is left out);
    CharlstmError naming the file when it is damaged (not a file, not UTF-8)."""
    if not path.exists() and not path.is_symlink():
        return []
    hint = "move it away to continue without the old metrics (the checkpoints hold the run's state)"
    if not path.is_file():
        raise CharlstmError(f"{path} is damaged: it is not a file; {hint}")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CharlstmError(f"{path} is damaged: line {line} is not UTF-8 text; {hint}") from None
    except OSError as e:
        raise CharlstmError(f"cannot read {path}: {e.strerror or e}") from None
    kept = []
    for line in text.splitlines():
        try:
            step = json.loads(line).get("step", 0)
            if step <= last_step:
                kept.append(line)
        except (ValueError, AttributeError, TypeError):
            continue
    return kept


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop the lines of metrics.jsonl written after ``last_step`` (a run resumed from that step)."""
    if path.exists():
        ckpt_mod.write_text_atomic(path, "".join(line + "\n" for line in read_metrics(path, last_step)))


def copy_metrics(source: Path, target: Path, last_step: int) -> None:
    """A fork's metrics.jsonl: the source run's lines up to the step it was forked at."""
    lines = read_metrics(source, last_step)
    ckpt_mod.write_text_atomic(target, "".join(line + "\n" for line in lines))


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

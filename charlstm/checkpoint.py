"""A run's checkpoints: save one (written, pointed to by `latest`/`best`, older ones pruned) and load
the one RUN names; their names, the pointers, listing, retention and deletion that cannot
half-happen, resolving `RUN`, the resume rules. One checkpoint directory's files are ckptdir.py's;
docs/checkpoint-format.md describes them for readers without charlstm."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from .ckptdir import (
    CKPT_FILES,
    MANIFEST,
    NO_SPACE,
    Checkpoint,
    NoSpaceError,
    checkpoint_files,
    free_bytes,
    is_checkpoint_dir,
    load_checkpoint_dir,
    load_optimizer_state,
    load_trainer_state,
    optimizer_from_files,
    optimizer_to_files,
    verify_checkpoint,
    write_checkpoint_dir,
)
from .console import note
from .datacache import format_bytes
from .diskfiles import fsync_dir, load_tensors, save_tensors, write_text_atomic
from .errors import CharlstmError

__all__ = [
    # a run's checkpoints (this module)
    "CKPT_PATTERN", "POINTERS", "READ_ATTEMPTS", "checkpoint_name", "list_checkpoints", "read_pointer",
    "save_checkpoint", "remove_checkpoint", "prune_checkpoints", "resolve_checkpoint", "run_dir_of", "step_of",
    "resume_checkpoint", "newer_checkpoints", "load_checkpoint",
    # one checkpoint's files (ckptdir.py) and the file helpers (diskfiles.py), for callers of `checkpoint`
    "CKPT_FILES", "MANIFEST", "Checkpoint", "NoSpaceError", "verify_checkpoint", "load_trainer_state",
    "load_optimizer_state", "optimizer_to_files", "optimizer_from_files", "load_tensors", "save_tensors",
    "write_text_atomic",
]

CKPT_PATTERN = re.compile(r"^ckpt-(\d{6,})$")
POINTERS = ("best", "latest")


# --------------------------------------------------------------------------- names and pointers

def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoint directories of a run, as (step, path), oldest first."""
    run_dir = Path(run_dir)
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = CKPT_PATTERN.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def read_pointer(run_dir: Path, which: str) -> Path | None:
    """The checkpoint directory a ``best``/``latest`` pointer names, if it exists and is complete."""
    pointer = Path(run_dir) / which
    try:
        target = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not CKPT_PATTERN.match(target):
        return None
    path = Path(run_dir) / target
    return path if (path / MANIFEST).is_file() else None


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model,
    optimizer,
    model_cfg,
    train_cfg,
    vocab,
    corpus_meta: dict,
    trainer_state: dict,
    is_best: bool,
    keep: int,
    extra_config: dict | None = None,
) -> Path:
    """Write checkpoint ``ckpt-<step>`` of a run atomically, update pointers, prune old ones.

    ``trainer_state`` is a JSON-safe dict that may hold tensors anywhere inside
    (carried hidden state, RNG states): those go to trainer_state.safetensors.
    An existing checkpoint is never replaced (CharlstmError); NoSpaceError when
    the disk is full, with the space it needed. Returns the checkpoint directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = run_dir / name
    _clear_the_way(final)
    files = checkpoint_files(step=step, model=model, optimizer=optimizer, model_cfg=model_cfg, train_cfg=train_cfg,
                             vocab=vocab, corpus_meta=corpus_meta, trainer_state=trainer_state,
                             extra_config=extra_config)
    write_checkpoint_dir(run_dir, name, files)
    _write_pointers(run_dir, name, is_best)
    prune_checkpoints(run_dir, keep)
    return final


def _clear_the_way(final: Path) -> None:
    """Refuse to replace checkpoint ``final``; remove what a deletion interrupted there left (a ckpt-*
    directory without MANIFEST.json is never a checkpoint)."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CharlstmError(f"cannot write checkpoint {final}: something that is not a checkpoint directory "
                            "has its name; move it away")
    if not final.exists():
        return
    if (final / MANIFEST).exists():
        raise CharlstmError(f"checkpoint {final} exists already and is never overwritten; continue the run from "
                            f"its latest checkpoint, or fork it into a new run with --out NEW")
    remove_checkpoint(final)


def _write_pointers(run_dir: Path, name: str, is_best: bool) -> None:
    try:
        write_text_atomic(run_dir / "latest", name + "\n")
        if is_best:
            write_text_atomic(run_dir / "best", name + "\n")
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise NoSpaceError(f"no space left in {run_dir} to name checkpoint {name} in its pointers "
                           f"({format_bytes(free_bytes(run_dir))} free); {name} itself is complete") from None


# --------------------------------------------------------------------------- retention

def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory so that no moment of it looks complete: MANIFEST.json goes first,
    then the directory is renamed out of the way (``.old-ckpt-...``) and removed. Never follows a
    symbolic link (a symlinked entry is left alone)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return
    (path / MANIFEST).unlink(missing_ok=True)
    fsync_dir(path)
    trash = path.with_name(f".old-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints, never the ``best`` or ``latest`` one, through
    :func:`remove_checkpoint`; also remove leftovers of interrupted saves and deletions. Symbolic
    links are never followed nor removed. Returns what was removed."""
    run_dir = Path(run_dir)
    protected = {p.name for p in (read_pointer(run_dir, w) for w in POINTERS) if p is not None}
    ckpts = [(s, p) for s, p in list_checkpoints(run_dir) if not p.is_symlink()]
    removed = []
    for _, path in ckpts[: max(0, len(ckpts) - keep)]:
        if path.name not in protected:
            remove_checkpoint(path)
            removed.append(path)
    for p in run_dir.iterdir():
        if p.is_symlink() or not p.is_dir():
            continue
        if p.name.startswith((".tmp-ckpt-", ".old-ckpt-")):
            shutil.rmtree(p, ignore_errors=True)      # a save or a deletion that was interrupted
            removed.append(p)
        elif CKPT_PATTERN.match(p.name) and not (p / MANIFEST).exists() and p.name not in protected:
            remove_checkpoint(p)                      # a deletion interrupted after its first step
            removed.append(p)
    if removed:
        fsync_dir(run_dir)
    return removed


# --------------------------------------------------------------------------- resolve

def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (bool(list_checkpoints(path)) or any((path / w).is_file() for w in POINTERS))


def resolve_checkpoint(run: Path | None, root: Path = Path("checkpoints"), *, prefer: str = "best") -> Path:
    """The checkpoint directory that ``RUN`` names.

    A checkpoint directory is itself; a pointer file (``best``/``latest``) is
    what it names; a run directory gives its best checkpoint (or its latest
    with ``prefer='latest'``), falling back to the other pointer and then to
    the newest complete ``ckpt-*`` directory; None gives the most recent run
    under ``root``. CharlstmError when nothing loadable is there.
    """
    if prefer not in POINTERS:
        raise ValueError(f"prefer must be one of {POINTERS}")
    if run is None:
        root = Path(root)
        runs = [p for p in root.iterdir() if _is_run_dir(p)] if root.is_dir() else []
        if not runs:
            raise CharlstmError(f"no training runs under {root}/; train one with `charlstm train` "
                                "or name a run directory")
        run = max(runs, key=_run_mtime)
    run = Path(run)
    if not run.exists():
        raise CharlstmError(f"{run} does not exist; give a run directory (e.g. checkpoints/NAME) "
                            "or a checkpoint directory")
    if run.is_file():
        if run.name in POINTERS:
            target = read_pointer(run.parent, run.name)
            if target is None:
                raise CharlstmError(f"{run} names no complete checkpoint; give the run directory {run.parent} instead")
            return target
        raise CharlstmError(f"{run} is a file, not a charlstm run or checkpoint directory")
    if is_checkpoint_dir(run):
        return run
    order = (prefer,) + tuple(w for w in POINTERS if w != prefer)
    for which in order:
        target = read_pointer(run, which)
        if target is not None:
            return target
    ckpts = list_checkpoints(run)
    if ckpts:
        return ckpts[-1][1]
    raise CharlstmError(f"{run} holds no charlstm checkpoint (expected ckpt-* directories or a config.json)")


def _run_mtime(run_dir: Path) -> float:
    times = []
    for p in [run_dir / w for w in POINTERS] + [p for _, p in list_checkpoints(run_dir)]:
        try:
            times.append(p.stat().st_mtime)
        except OSError:           # removed by the run's retention meanwhile
            pass
    return max(times) if times else run_dir.stat().st_mtime


def run_dir_of(run: Path) -> Path:
    """The run directory RUN belongs to (a checkpoint directory's or a pointer's parent), unverified."""
    run = Path(run)
    if run.is_file() or is_checkpoint_dir(run):
        return run.parent
    return run


def step_of(path: Path) -> int:
    """The step of a ``ckpt-<step>`` directory (-1 for another name)."""
    m = CKPT_PATTERN.match(Path(path).name)
    return int(m.group(1)) if m else -1


def resume_checkpoint(run: Path) -> Path:
    """The checkpoint ``--resume RUN`` continues from: a checkpoint directory (or the ``best`` pointer)
    is what it names; a run directory or its ``latest`` pointer gives the newest complete checkpoint
    (newer than ``latest`` names only when a save was interrupted between its rename and the pointer)."""
    path = resolve_checkpoint(run, prefer="latest")
    run = Path(run)
    if (run.is_dir() and not is_checkpoint_dir(run)) or run.name == "latest":
        ckpts = list_checkpoints(path.parent)
        if ckpts and ckpts[-1][0] > step_of(path):
            return ckpts[-1][1]
    return path


def newer_checkpoints(path: Path) -> list[Path]:
    """The complete checkpoints of ``path``'s run written after it (history a resume from it would replace)."""
    return [p for s, p in list_checkpoints(Path(path).parent) if s > step_of(path)]


# --------------------------------------------------------------------------- load

READ_ATTEMPTS = 5      # a reader racing a run's retention resolves the run again this many times


def load_checkpoint(run: Path | None, map_location="cpu", *, backend: str | None = None,
                    root: Path = Path("checkpoints"), prefer: str = "best") -> Checkpoint:
    """Load and validate the checkpoint RUN names (see :func:`resolve_checkpoint`) onto ``map_location``.

    The model is built from config.json, its weights loaded strictly, and put
    in eval mode. ``backend`` ('cudnn'/'custom') rebuilds it on the other
    backend with converted weights. CharlstmError for a damaged, foreign or
    incompatible checkpoint; nothing on disk is ever modified. When RUN is a
    run directory (or a pointer, or None) and the run's retention removes the
    checkpoint while it is read, the run is resolved again and a note says so.
    """
    named = run is not None and is_checkpoint_dir(Path(run))
    for attempt in range(READ_ATTEMPTS):
        path = Path(run) if named else resolve_checkpoint(run, root, prefer=prefer)
        try:
            ckpt = load_checkpoint_dir(path, map_location, backend)
        except CharlstmError:
            # Removed meanwhile (its manifest goes first), or damaged? A named one counts as removed when it is gone.
            gone = not path.is_dir() if named else not (path / MANIFEST).is_file()
            if not gone or attempt == READ_ATTEMPTS - 1:
                raise
            if named:
                raise CharlstmError(f"checkpoint {path} was removed while it was read (the retention of a run "
                                    f"being trained?); give the run directory {path.parent} to read its newest "
                                    "checkpoint") from None
            removed = path
            continue
        if attempt:
            note(f"{removed.name} was removed by the run's retention while it was read; "
                 f"read {ckpt.path.name} instead, the newest complete checkpoint {run or root} names")
        return ckpt
    raise AssertionError("unreachable")  # pragma: no cover

"""The on-disk format of a run: checkpoints written atomically (safetensors and JSON, no pickle),
pointers, retention, resolving `RUN`, loading and validation. docs/checkpoint-format.md describes
the files for readers without charlstm."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch

from .console import note
from .datacache import format_bytes
from .errors import CharlstmError

FORMAT_NAME = "charlstm-checkpoint"
FORMAT_VERSION = 1
CKPT_PATTERN = re.compile(r"^ckpt-(\d{6,})$")
POINTERS = ("best", "latest")
MANIFEST = "MANIFEST.json"
CKPT_FILES = (
    "config.json",
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "trainer_state.safetensors",
    "trainer_state.json",
)


# --------------------------------------------------------------------------- safetensors files
#
# The safetensors library writes and reads the files: ``serialize_file`` from each tensor's memory
# (``safetensors.torch.save_file`` would need NumPy, which charlstm does not depend on) and
# ``safe_open``. A file is written inside a checkpoint's temporary directory and fsync'ed there.

_TensorSpec = getattr(safetensors, "TensorSpec", None)   # safetensors >= 0.8; before, the bytes themselves
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _tensor_spec(t: torch.Tensor):
    """What ``safetensors.serialize_file`` takes for one contiguous CPU tensor."""
    dtype, nbytes = str(t.dtype).removeprefix("torch."), t.numel() * t.element_size()
    if _TensorSpec is None:
        data = ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""
        return {"dtype": dtype, "shape": list(t.shape), "data": data}
    return _TensorSpec(dtype=dtype, shape=list(t.shape), data_ptr=t.data_ptr(), data_len=nbytes)


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a dict of named tensors to ``path`` in the safetensors format and fsync it.

    An I/O failure (a full disk, a read-only directory) is an OSError with its errno. Several
    ``metadata`` keys are written in no fixed order (the same tensors give the same bytes with one)."""
    kept = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}  # alive while written
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    try:
        safetensors.serialize_file({name: _tensor_spec(t) for name, t in kept.items()}, str(path), metadata=meta)
    except safetensors.SafetensorError as e:
        found = _OS_ERROR.search(str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
    _fsync_file(path)


def load_tensors(path: Path) -> tuple[dict, dict]:
    """Read a safetensors file into ({name: CPU tensor}, metadata); CharlstmError if it is malformed."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except safetensors.SafetensorError as e:
        raise CharlstmError(f"{path} is not a valid safetensors file ({e})") from e
    except OSError as e:
        raise CharlstmError(f"cannot read {path}: {e.strerror or e}") from e
    except RuntimeError as e:   # torch maps the tensors from the file: it can vanish in between (a run's retention)
        if path.is_file():
            raise
        raise CharlstmError(f"cannot read {path}: it was removed while it was read") from e
    return tensors, metadata


# --------------------------------------------------------------------------- small atomic file helpers

def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (renames inside it become durable)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a file written by another writer (the safetensors library) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Write a text file and fsync it (inside a directory that is renamed later)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` so that readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_text(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)   # a full disk or an interruption leaves nothing behind
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    """Versions of the software that wrote a checkpoint (stored in config.json)."""
    from . import __version__

    return {
        "charlstm": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "safetensors": safetensors.__version__,
    }


# --------------------------------------------------------------------------- optimizer state <-> safetensors + JSON

def optimizer_to_files(optimizer) -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into (tensors, JSON structure) with no pickle.

    Tensors are named ``state.<param index>.<key>``; the JSON holds the param
    groups and every non-tensor per-parameter value.
    """
    sd = optimizer.state_dict()
    tensors: dict = {}
    scalars: dict = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    structure = {
        "class": type(optimizer).__name__,
        "param_groups": groups,
        "state_keys": sorted({k for p in sd["state"].values() for k in p}),
        "scalars": scalars,
        "tensor_params": sorted({int(i) for i in sd["state"]}),
    }
    return tensors, structure


def optimizer_from_files(tensors: dict, structure: dict) -> dict:
    """Rebuild an optimizer ``state_dict`` from what :func:`optimizer_to_files` wrote."""
    state: dict = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, values in structure.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in structure["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _split_tensors(obj, prefix: str, tensors: dict):
    """Replace tensors inside a nested dict/list by {"__tensor__": name}; collect them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {k: _split_tensors(v, f"{prefix}.{k}" if prefix else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj, tensors: dict):
    """Inverse of :func:`_split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------- save

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


class NoSpaceError(CharlstmError):
    """A checkpoint did not fit on its disk (the partial one is removed, the earlier ones are intact)."""


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


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
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "vocab": vocab.to_json(),
        "corpus": corpus_meta,
        "versions": versions(),
        **(extra_config or {}),
    }
    if optimizer is not None:
        opt_tensors, opt_structure = optimizer_to_files(optimizer)
    else:
        opt_tensors, opt_structure = {}, {"class": None, "param_groups": [], "scalars": {}}
    opt_structure["param_names"] = [n for n, p in model.named_parameters() if p.requires_grad]
    state_tensors: dict = {}
    state_json = _split_tensors(trainer_state, "", state_tensors)
    files = {
        "config.json": config,
        # One metadata key: the library writes them in no fixed order, and a state's files stay byte-identical.
        "model.safetensors": (dict(model.state_dict()), {"format": FORMAT_NAME}),
        "optimizer.safetensors": (opt_tensors, None),
        "optimizer.json": opt_structure,
        "trainer_state.safetensors": (state_tensors, None),
        "trainer_state.json": state_json,
    }
    _write_checkpoint_dir(run_dir, name, files)
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


def _write_checkpoint_dir(run_dir: Path, name: str, files: dict) -> None:
    """Write the files into a hidden directory, MANIFEST.json last, fsync, rename it to ``name``."""
    tmp = run_dir / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.mkdir()
        for fname, content in files.items():
            if fname.endswith(".safetensors"):
                save_tensors(tmp / fname, *content)
            else:
                _write_json(tmp / fname, content)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in CKPT_FILES},
        }
        _write_json(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        os.rename(tmp, run_dir / name)
        _fsync_dir(run_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise NoSpaceError(f"no space left in {run_dir} for checkpoint {name}: it needs about "
                               f"{format_bytes(_checkpoint_bytes(files))}, {format_bytes(_free_bytes(run_dir))} "
                               "are free (the partial checkpoint was removed, the earlier ones are intact)") from None
        raise


def _write_pointers(run_dir: Path, name: str, is_best: bool) -> None:
    try:
        write_text_atomic(run_dir / "latest", name + "\n")
        if is_best:
            write_text_atomic(run_dir / "best", name + "\n")
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        raise NoSpaceError(f"no space left in {run_dir} to name checkpoint {name} in its pointers "
                           f"({format_bytes(_free_bytes(run_dir))} free); {name} itself is complete") from None


def _checkpoint_bytes(files: dict) -> int:
    """About the size of a checkpoint on disk: the tensors' bytes and the JSON files."""
    total = 0
    for fname, content in files.items():
        if fname.endswith(".safetensors"):
            total += 1024 + sum(t.numel() * t.element_size() + 100 for t in content[0].values())
        else:
            total += len(json.dumps(content, indent=1, default=str)) + 1
    return total


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory so that no moment of it looks complete: MANIFEST.json goes first,
    then the directory is renamed out of the way (``.old-ckpt-...``) and removed. Never follows a
    symbolic link (a symlinked entry is left alone)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return
    (path / MANIFEST).unlink(missing_ok=True)
    _fsync_dir(path)
    trash = path.with_name(f".old-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    _fsync_dir(path.parent)
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
        _fsync_dir(run_dir)
    return removed


# --------------------------------------------------------------------------- resolve

def _is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


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
    if _is_checkpoint_dir(run):
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
    if run.is_file() or _is_checkpoint_dir(run):
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
    if (run.is_dir() and not _is_checkpoint_dir(run)) or run.name == "latest":
        ckpts = list_checkpoints(path.parent)
        if ckpts and ckpts[-1][0] > step_of(path):
            return ckpts[-1][1]
    return path


def newer_checkpoints(path: Path) -> list[Path]:
    """The complete checkpoints of ``path``'s run written after it (history a resume from it would replace)."""
    return [p for s, p in list_checkpoints(Path(path).parent) if s > step_of(path)]


# --------------------------------------------------------------------------- load

@dataclass
class Checkpoint:
    """A loaded checkpoint: configs, vocabulary, corpus description, the model (eval mode) and state."""

    path: Path
    model_cfg: object
    train_cfg: object
    vocab: object
    corpus_meta: dict
    model: object
    trainer_state: dict
    metrics: dict
    config: dict = field(default_factory=dict)   # the whole config.json
    step: int = 0

    @property
    def versions(self) -> dict:
        return self.config.get("versions", {})


def _read_json(path: Path, ckpt: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CharlstmError(f"checkpoint {ckpt} is incomplete: {path.name} is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CharlstmError(f"checkpoint {ckpt} is damaged: {path.name} is not readable JSON") from e


def verify_checkpoint(path: Path) -> dict:
    """Check that ``path`` is a complete, undamaged charlstm checkpoint of a supported version.

    Returns its config.json. CharlstmError says what is wrong: foreign, newer
    format, missing or truncated or altered files.
    """
    path = Path(path)
    if not path.is_dir():
        raise CharlstmError(f"{path} is not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise CharlstmError(f"{path} is not a charlstm checkpoint (no config.json); "
                            "give a run or ckpt-* directory written by `charlstm train`")
    config = _read_json(path / "config.json", path)
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CharlstmError(f"{path} is not a charlstm checkpoint "
                            f"(its config.json has no \"format\": \"{FORMAT_NAME}\")")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CharlstmError(
            f"{path} has checkpoint format version {version!r}; "
            f"this charlstm reads up to {FORMAT_VERSION}: upgrade charlstm"
        )
    manifest = _read_json(path / MANIFEST, path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CharlstmError(f"checkpoint {path} is damaged: {MANIFEST} lists no files")
    for name, entry in files.items():
        f = path / name
        try:
            size, digest = f.stat().st_size, _sha256(f)
        except OSError as e:
            if f.exists() or not isinstance(e, FileNotFoundError):
                raise CharlstmError(f"cannot read {f}: {e.strerror or e}") from e
            raise CharlstmError(f"checkpoint {path} is incomplete: {name} is missing") from None
        if size != entry.get("bytes"):
            raise CharlstmError(f"checkpoint {path} is damaged: {name} has {size} bytes, "
                                f"{entry.get('bytes')} expected (truncated?)")
        if digest != entry.get("sha256"):
            raise CharlstmError(f"checkpoint {path} is damaged: {name} does not match its sha256 in {MANIFEST} "
                                "(changed or corrupted)")
    for name in CKPT_FILES:
        if name not in files:
            raise CharlstmError(f"checkpoint {path} is damaged: {MANIFEST} does not list {name}")
    return config


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint (JSON with its tensors put back in place, on CPU)."""
    path = Path(path)
    tensors, _ = load_tensors(path / "trainer_state.safetensors")
    state = _read_json(path / "trainer_state.json", path)
    try:
        return _join_tensors(state, tensors)
    except KeyError as e:
        raise CharlstmError(f"checkpoint {path} is damaged: trainer state refers to a missing tensor {e}") from e


def load_optimizer_state(path: Path, optimizer) -> None:
    """Load a checkpoint's optimizer state into ``optimizer`` (same parameters, same order)."""
    path = Path(path)
    tensors, _ = load_tensors(path / "optimizer.safetensors")
    structure = _read_json(path / "optimizer.json", path)
    if structure.get("class") != type(optimizer).__name__:
        raise CharlstmError(
            f"checkpoint {path} holds {structure.get('class')} state, not {type(optimizer).__name__}; "
            "use --init-from for a fresh optimizer"
        )
    try:
        optimizer.load_state_dict(optimizer_from_files(tensors, structure))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CharlstmError(f"checkpoint {path}: its optimizer state does not fit this model ({e})") from e


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
    named = run is not None and _is_checkpoint_dir(Path(run))
    for attempt in range(READ_ATTEMPTS):
        path = Path(run) if named else resolve_checkpoint(run, root, prefer=prefer)
        try:
            ckpt = _load_checkpoint_dir(path, map_location, backend)
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


def _load_checkpoint_dir(path: Path, map_location, backend: str | None) -> Checkpoint:
    from .config import ModelConfig, TrainConfig
    from .corpus import Vocab
    from .errors import UsageError
    from .model import build_model, convert_state_dict

    config = verify_checkpoint(path)
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
        train_cfg = TrainConfig.from_dict(config["train"])
        vocab = Vocab.from_json(config["vocab"])
    except (KeyError, TypeError, ValueError, UsageError) as e:
        raise CharlstmError(f"checkpoint {path} is incompatible with this charlstm: "
                            f"its config.json does not parse ({e})") from e
    if len(vocab) != model_cfg.vocab_size:
        raise CharlstmError(
            f"checkpoint {path} is inconsistent: {len(vocab)} characters in its vocabulary, "
            f"model built for {model_cfg.vocab_size}"
        )
    weights, _ = load_tensors(path / "model.safetensors")
    if backend is not None and backend != model_cfg.backend:
        weights = convert_state_dict(weights, model_cfg, backend)
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "backend": backend})
    try:
        model = build_model(model_cfg)
    except CharlstmError as e:
        raise CharlstmError(f"checkpoint {path} cannot be rebuilt by this charlstm: {e}") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CharlstmError(
            f"checkpoint {path} is incompatible: its weights do not match the {model_cfg.variant} model "
            "its config describes"
            f" (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, t in weights.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CharlstmError(
                f"checkpoint {path} is incompatible: {name} has shape {tuple(t.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights, strict=True)
    model.to(map_location)
    model.eval()
    trainer_state = load_trainer_state(path)
    metrics = trainer_state.get("metrics", {}) if isinstance(trainer_state, dict) else {}
    return Checkpoint(
        path=path,
        model_cfg=model_cfg,
        train_cfg=train_cfg,
        vocab=vocab,
        corpus_meta=config.get("corpus", {}),
        model=model,
        trainer_state=trainer_state,
        metrics=metrics,
        config=config,
        step=int(config.get("step", 0)),
    )

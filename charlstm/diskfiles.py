"""Files written durably: tensors in the safetensors format (and read back), JSON and text fsync'ed,
a file replaced atomically. The checkpoints (ckptdir.py, checkpoint.py) and the commands' outputs
are written through them."""

from __future__ import annotations

import ctypes
import json
import os
import re
from pathlib import Path

import safetensors
import torch

from .errors import CharlstmError

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

def fsync_dir(path: Path) -> None:
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


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON and fsync it (inside a directory that is renamed later)."""
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
    fsync_dir(path.parent)

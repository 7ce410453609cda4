"""Compiling the C kernels once per version of the sources into the user's cache, and loading them."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from . import abi

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("sample_step.c", "train_loops.c")             # compiled into one library with the headers beside them
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared"]
OPENMP = "-fopenmp"     # threads share out each step; without OpenMP the library is built single-threaded

_LIB: dict = {}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    """Where compiled libraries are kept: $XDG_CACHE_HOME/charlstm (default ~/.cache/charlstm)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "charlstm"


def _build(cc: str, flags: list[str]) -> tuple[Optional[Path], str]:
    """Compile the sources with these flags into the cache (once per version of the sources and flags):
    its path, or None and why."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    target = cache_dir() / f"charlstm-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target, "cached"
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        done = subprocess.run([cc, *flags, "-o", tmp, *(str(CSRC / name) for name in SOURCES)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            os.unlink(tmp)
            return None, f"compiling {', '.join(SOURCES)} failed: {done.stderr.strip()[:300]}"
        os.replace(tmp, target)          # atomic: a concurrent run sees no file or the whole file
    except (OSError, subprocess.SubprocessError) as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return None, f"cannot compile into {target.parent}: {e}"
    return target, "compiled"


def _compile() -> tuple[Optional[ctypes.CDLL], str]:
    """The compiled library, or None and why not."""
    if os.environ.get("CHARLSTM_NO_NATIVE", "") not in ("", "0"):
        return None, "turned off by CHARLSTM_NO_NATIVE"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None, "no C compiler (set $CC or install cc)"
    target, why, threaded = None, "", False
    for flags in ([*FLAGS, OPENMP], FLAGS):
        target, why = _build(cc, flags)
        if target is not None:
            threaded = OPENMP in flags
            break
    if target is None:
        return None, why
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"cannot load {target}: {e}"
    abi.declare(lib)
    return lib, "ready" + ("" if threaded else " (built without OpenMP: one thread)")


def library() -> tuple[Optional[ctypes.CDLL], str]:
    """The native library (compiled on first use) and a word on it: 'ready' (and how it was built)
    or why it is unavailable."""
    if "lib" not in _LIB:
        _LIB["lib"], _LIB["why"] = _compile()
    return _LIB["lib"], _LIB["why"]

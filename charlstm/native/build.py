"""Compiling the C kernels once per version of the sources into the user's cache, and loading them.

The library is built at run time, the first time a process needs it (about two seconds of CPU),
into $XDG_CACHE_HOME/charlstm (default ~/.cache/charlstm) under a file lock, so that concurrent
processes (torchrun ranks, compare-variants --jobs) compile once and the others wait and load.
Beside each library its sha256 is recorded: a damaged or truncated file is rebuilt, never loaded.
A loaded library is checked against abi.py before any call (abi.mismatch); one that disagrees is
rebuilt once, then given up on with the reason. Callers that time things call ``library()``
before their clocks start.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..console import note
from . import abi

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("sample_step.c", "train_loops.c", "panels.c", "abi.c")   # one library, headers beside them
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC"]
OPENMP = "-fopenmp"     # threads share out each step; without OpenMP the library is built single-threaded
BUILD_SECONDS = 5       # what the notice promises (about 2 s of CPU, compiled two files at a time)

_LIB: dict = {}
_LOCK = threading.Lock()


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


def target_for(flags: list[str]) -> Path:
    """The cached library of these flags and this version of the sources and of the ABI."""
    digest = hashlib.sha256(f"abi {abi.VERSION} ".encode() + " ".join(flags).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return cache_dir() / f"charlstm-{digest.hexdigest()[:16]}.so"


def _sha_file(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(target: Path) -> bool:
    """Whether target is a whole library as it was built: its size and sha256 as recorded beside it."""
    try:
        size, digest = _sha_file(target).read_text().split()
        return target.stat().st_size == int(size) and _sha256(target) == digest
    except (OSError, ValueError):
        return False


def _shown(path: Path) -> str:
    home = os.path.expanduser("~")
    return "~" + str(path)[len(home):] if str(path).startswith(home + os.sep) else str(path)


def _compile(cc: str, flags: list[str], target: Path) -> str | None:
    """Compile the sources (each its own process, then one link) into target and record its sha256
    beside it, both renamed into place (a reader sees no file or a whole one). None, or why it failed."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        objects = [os.path.join(tmp, name + ".o") for name in SOURCES]
        jobs = [subprocess.Popen([cc, *flags, "-c", str(CSRC / name), "-o", obj], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for name, obj in zip(SOURCES, objects)]
        for job in jobs:
            _, err = job.communicate(timeout=300)
            if job.returncode != 0:
                return f"compiling {Path(job.args[-3]).name} failed: {err.strip()[:300]}"
        so = os.path.join(tmp, "lib.so")
        done = subprocess.run([cc, *flags, "-shared", "-o", so, *objects], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return f"linking the native kernels failed: {done.stderr.strip()[:300]}"
        sha = os.path.join(tmp, "lib.sha256")
        Path(sha).write_text(f"{os.path.getsize(so)} {_sha256(Path(so))}\n")
        os.replace(so, target)
        os.replace(sha, _sha_file(target))
    return None


def _ensure(cc: str | None, flags: list[str]) -> tuple[Path | None, str]:
    """The verified library of these flags, built under the cache's lock where it is missing or
    damaged: its path, or None and why."""
    target = target_for(flags)
    if verified(target):
        return target, "cached"
    if cc is None:
        return None, "no C compiler (set $CC or install cc)"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)          # another process building it: wait, then find it built
            if verified(target):
                return target, "cached"
            note(f"charlstm: compiling its native kernels into {_shown(target.parent)} (about {BUILD_SECONDS} s, "
                 "once per version of charlstm)...")
            start = time.perf_counter()
            why = _compile(cc, flags, target)
            _LIB["seconds"] = time.perf_counter() - start
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot compile into {target.parent}: {e}"
    return (None, why) if why else (target, "compiled")


def _forget(lib: ctypes.CDLL, target: Path) -> None:
    """Unload a library and remove its file and record (the next build makes them anew)."""
    import _ctypes

    _ctypes.dlclose(lib._handle)
    for path in (target, _sha_file(target)):
        path.unlink(missing_ok=True)


def _load(target: Path) -> tuple[ctypes.CDLL | None, str, bool]:
    """The library at target once it agrees with abi.py: (lib, '', False), or (None, why not, whether
    a rebuild may help: the library disagreed with abi.py and was removed)."""
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"cannot load {target}: {e}", False
    bad = abi.mismatch(lib)
    if bad:
        _forget(lib, target)
        return None, f"{target.name} does not match charlstm/native/abi.py: {bad}", True
    abi.declare(lib)
    return lib, "", False


def _unavailable() -> str | None:
    if os.environ.get("CHARLSTM_NO_NATIVE", "") not in ("", "0"):
        return "turned off by CHARLSTM_NO_NATIVE"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    return None


def _find() -> tuple[ctypes.CDLL | None, str]:
    """The library, built where needed, or None and why not."""
    why = _unavailable()
    if why:
        return None, why
    cc = shutil.which(os.environ.get("CC", "cc"))
    for flags in ([*FLAGS, OPENMP], FLAGS):
        for _ in range(2):                            # a library that disagrees with abi.py is rebuilt once
            target, why = _ensure(cc, flags)
            if target is None:
                break
            lib, why, rebuild = _load(target)
            if lib is not None:
                return lib, "ready" + ("" if OPENMP in flags else " (built without OpenMP: one thread)")
            if not rebuild:
                break
    return None, why


def library() -> tuple[ctypes.CDLL | None, str]:
    """The native library (compiled on first use, once per version) and a word on it: 'ready' (and
    how it was built) or why it is unavailable. Call it before starting a clock: the first call of a
    process may compile."""
    with _LOCK:
        if "lib" not in _LIB:
            _LIB["lib"], _LIB["why"] = _find()
        return _LIB["lib"], _LIB["why"]


def status() -> str:
    """One line on what runs in C here, for `charlstm bench` and `info` (may compile, as library())."""
    lib, why = library()
    if lib is None:
        return f"unavailable ({why}): torch loops and the TorchScript step"
    return ("C training loops for every custom variant and form (float32 on the CPU, H a multiple of 8); "
            "C sampling step for every variant (fp32, fp16, int8 weights)" + why.removeprefix("ready"))

"""Process-level settings shared by the commands: the device and torch's threads."""

from __future__ import annotations

import contextlib
import os

import torch

from .console import note
from .errors import UsageError

DEVICES = ("auto", "cpu", "cuda")

# The FLOPs of one time step that each CPU thread must get. A recurrent layer's threads meet at a
# barrier every time step: a few microseconds when the cores are free, but a scheduler time slice
# when another multi-threaded process shares them (two tiny trainings at once ran 40x slower on two
# threads each than on one), so small models run on one thread (docs/performance.md).
GRAIN = 1 << 18


def resolve_device(name: str) -> torch.device:
    """The device ``--device NAME`` asks for: 'auto' is cuda where a CUDA device is present, else cpu.

    UsageError (exit 2) for a name other than auto, cpu or cuda, and for cuda on a machine without one.
    """
    if name not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)} (got {name!r})")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def check_threads(threads: int | None) -> None:
    """UsageError unless ``threads`` is None (the default) or at least 1."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {threads})")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_threads(threads: int | None, option: str = "--threads") -> int | None:
    """``threads`` capped at the cores this process has, with a note when it was more (more threads
    than cores only make torch's threads wait for each other); UsageError below 1; None stays None."""
    check_threads(threads)
    cores = cpu_cores()
    if threads is not None and threads > cores:
        note(f"note: {option} {threads} is more than the {cores} CPU core(s) here; using {cores}")
        return cores
    return threads


def threads_for(flops_per_step: int, threads: int | None = None) -> int:
    """The threads to share a time step of ``flops_per_step`` FLOPs among: at most one per GRAIN,
    at least one, at most ``threads`` (default torch's)."""
    threads = torch.get_num_threads() if threads is None else threads
    return max(1, min(threads, flops_per_step // GRAIN))


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the body with ``threads`` torch intra-op threads (None: leave torch's setting; more than
    the cores: capped with a note, see `usable_threads`), then restore."""
    threads = usable_threads(threads)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""Process-level settings shared by the commands: the device and torch's threads."""

from __future__ import annotations

import contextlib

import torch

from .errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


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


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the body with ``threads`` torch intra-op threads (None: leave torch's setting), then restore."""
    check_threads(threads)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

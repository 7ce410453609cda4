"""Process-level settings shared by the commands (torch threads)."""

from __future__ import annotations

import contextlib

import torch

from .errors import UsageError


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

"""The one way charlstm talks to people on stderr: notes that do not break a progress bar."""

from __future__ import annotations

import os
import sys

DEBUG_ENV = "CHARLSTM_DEBUG"      # set by --debug (anywhere on the command line)


def note(message: str) -> None:
    """Print one message on stderr, above any progress bar that is being drawn (stdout stays for results)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def debug_enabled() -> bool:
    """Whether --debug was given (tracebacks for errors, and the notes of `debug`)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def debug(message: str) -> None:
    """A note shown only under --debug (what ran and why a faster path did not)."""
    if debug_enabled():
        note(f"debug: {message}")

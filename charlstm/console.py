"""The one way charlstm talks to people on stderr: notes that do not break a progress bar."""

from __future__ import annotations

import sys


def note(message: str) -> None:
    """Print one message on stderr, above any progress bar that is being drawn (stdout stays for results)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()

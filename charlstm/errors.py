"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations


class CharlstmError(Exception):
    """A mistake the user can fix (bad path, bad value, damaged checkpoint...).

    The CLI prints ``error: <message>`` on stderr and exits with ``exit_code``.
    """

    exit_code = 1


class UsageError(CharlstmError):
    """A bad option value or combination of options (exit status 2, like click)."""

    exit_code = 2

"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import errno


class CharlstmError(Exception):
    """A mistake the user can fix (bad path, bad value, damaged checkpoint...).

    The CLI prints ``error: <message>`` on stderr and exits with ``exit_code``.
    """

    exit_code = 1


class UsageError(CharlstmError):
    """A bad option value or combination of options (exit status 2, like click)."""

    exit_code = 2


# What the environment does to a command (permissions, a read-only or full disk, too many open files):
# the CLI reports these OSErrors as one line, exit 1, wherever they happen.
_ENVIRONMENT_HINTS = {
    errno.EACCES: "choose a place you may write to",
    errno.EPERM: "choose a place you may write to",
    errno.EROFS: "choose a writable place",
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EFBIG: "the file system refuses a file this large",
    errno.EIO: "the disk reported an input/output error",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files",
}


def environment_message(e: OSError) -> str | None:
    """The one line for an OSError the environment caused ("cannot write R/x: Read-only file system;
    choose a writable place"), None for any other (a bug keeps its traceback)."""
    hint = _ENVIRONMENT_HINTS.get(e.errno)
    if hint is None:
        return None
    what = f"{e.filename}" + (f" -> {e.filename2}" if getattr(e, "filename2", None) else "") if e.filename else ""
    return f"{what + ': ' if what else ''}{e.strerror or e}; {hint}"

"""The one way charlstm talks to people on stderr: notes that do not break a progress bar, and
progress itself (tqdm bars on a terminal, plain rate-limited lines in a log file)."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

DEBUG_ENV = "CHARLSTM_DEBUG"      # set by --debug (anywhere on the command line)
PLAIN_INTERVAL = 10.0             # seconds between two plain progress lines of one operation
PLAIN_DONE_AFTER = 2.0            # an operation shorter than this ends without a plain "done" line


def note(message: str) -> None:
    """Print one message on stderr, above any progress bar that is being drawn (stdout stays for results)."""
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def debug_enabled() -> bool:
    """Whether --debug was given (tracebacks for errors, and the notes of `debug`)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def debug(message: str) -> None:
    """A note shown only under --debug (what ran and why a faster path did not)."""
    if debug_enabled():
        note(f"debug: {message}")


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars) rather than a file or a pipe (plain lines)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):     # a closed stream
        return False


def progress(total: float | None = None, *, desc: str = "", unit: str = "it", unit_scale: bool = False,
             enabled: bool = True, leave: bool = False, interval: float = PLAIN_INTERVAL, **bar_options):
    """Progress of one long operation on stderr: a tqdm bar on a terminal; in a file or a pipe a
    :class:`PlainProgress` that writes a plain line at most every ``interval`` seconds and one at
    the end (a log gets lines, not hundreds of redrawn frames); nothing when not ``enabled``.

    The object returned has tqdm's ``update``, ``set_postfix_str``, ``set_description_str``,
    ``close`` and works as a context manager. ``bar_options`` go to tqdm only.
    """
    if not enabled:
        return tqdm(total=total, disable=True)
    if stderr_is_terminal():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave, file=sys.stderr,
                    dynamic_ncols=True, **bar_options)
    return PlainProgress(total, desc=desc, unit=unit, unit_scale=unit_scale, interval=interval)


class PlainProgress:
    """A progress reporter for logs: ``desc: 12.3M/45.6M chars (27%), 1.20M chars/s, ETA 0:27`` at most
    every ``interval`` seconds (0: at every update), and ``desc: done, 45.6M chars in 0:38`` at the end
    when a line was written or the operation took ``PLAIN_DONE_AFTER`` seconds or more."""

    def __init__(self, total: float | None, *, desc: str = "", unit: str = "it", unit_scale: bool = False,
                 interval: float = PLAIN_INTERVAL, clock=time.monotonic):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.interval, self.clock = interval, clock
        self.n = 0
        self.postfix = ""
        self.start = self.last = clock()
        self.lines = 0
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:         # failed or interrupted: no "done" line
            self.closed = True
        self.close()
        return False

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._write(self._status(now))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.set_description_str(desc)

    def refresh(self) -> None:
        """(tqdm's redraw: nothing to redraw in a log.)"""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.start
        if self.lines or elapsed >= PLAIN_DONE_AFTER:
            self._write(f"done, {self._amount(self.n)} {self.unit} in {format_time(elapsed)}")

    def _status(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        parts = [f"{self._amount(self.n)}" + (f"/{self._amount(self.total)}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{self._amount(rate)} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {format_time(max(self.total - self.n, 0) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _amount(self, x: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(x)
        return f"{x:,.0f}" if float(x).is_integer() or x >= 100 else f"{x:.3g}"

    def _write(self, text: str) -> None:
        self.lines += 1
        note(f"{self.desc}: {text}" if self.desc else text)


def format_time(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

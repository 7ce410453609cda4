"""The corpus byte stream: a source's files read in bounded chunks and joined by newlines, as
UTF-8 decoded pieces (``read_pieces``, ``coalesce``) or hashed (``stream_sha256``); and the byte
progress bar of each pass over it (``Progress``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import console
from .errors import CharlstmError

CHUNK_BYTES = 4 * 1024 * 1024     # bytes read, decoded and encoded at a time (bounds memory)
PROGRESS_MIN_BYTES = 16 * 1024 * 1024  # no progress bar for work smaller than this


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence."""
    n = len(data)
    i = n - 1
    while i >= max(0, n - 4) and (data[i] & 0xC0) == 0x80:  # step back over continuation bytes
        i -= 1
    if i < 0 or data[i] < 0xC0:
        return n
    lead = data[i]
    need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 else 1
    return n if n - i >= need else i


def _decode(data: bytes, path: Path, offset: int, invalid_utf8: str) -> str:
    try:
        return data.decode("utf-8", errors="strict" if invalid_utf8 == "strict" else "replace")
    except UnicodeDecodeError as e:
        raise CharlstmError(
            f"{path}: invalid UTF-8 at byte offset {offset + e.start} ({e.reason}); "
            f"fix the file, or pass --invalid-utf8 replace to read bad bytes as U+FFFD"
        ) from None


def read_pieces(files: list[Path], invalid_utf8: str, hasher=None,
                 on_bytes=None) -> Iterator[tuple[bytes, str | None]]:
    """The corpus in pieces (raw, text): text is the decoded str, or None when raw is ASCII.

    An ASCII piece's bytes are its code points, so it needs no decoding.
    Files are joined by a newline when one does not end with one. Every byte
    read is fed to `hasher`; `on_bytes(n)` is told how many bytes were read.
    """
    for k, path in enumerate(files):
        offset = 0            # byte offset of `pending` in the file
        pending = b""
        last = b"\n"
        try:
            f = open(path, "rb")
        except OSError as e:
            raise CharlstmError(f"cannot read {path}: {e.strerror or e}") from e
        with f:
            while True:
                block = f.read(CHUNK_BYTES)
                if hasher is not None:
                    hasher.update(block)
                if on_bytes is not None:
                    on_bytes(len(block))
                data = pending + block if pending else block
                if not data:
                    break
                last = data[-1:]
                if data.isascii():
                    yield data, None
                    offset += len(data)
                    pending = b""
                    continue
                cut = len(data) if not block else _complete_utf8_prefix(data)
                if cut:
                    raw = data[:cut]
                    yield raw, _decode(raw, path, offset, invalid_utf8)
                offset += cut
                pending = data[cut:]
                if not block:
                    break
        if k + 1 < len(files) and last != b"\n":
            if hasher is not None:
                hasher.update(b"\n")
            yield b"\n", None


def coalesce(pieces: Iterable[tuple[bytes, str | None]],
              size: int = CHUNK_BYTES) -> Iterator[tuple[bytes, str | None]]:
    """Join consecutive small pieces (many small files) into pieces of at most about `size` bytes."""
    buf: list[tuple[bytes, str | None]] = []
    buffered = 0
    for piece in pieces:
        if buf and buffered + len(piece[0]) > size:
            yield _join(buf)
            buf, buffered = [], 0
        buf.append(piece)
        buffered += len(piece[0])
    if buf:
        yield _join(buf)


def _join(buf: list[tuple[bytes, str | None]]) -> tuple[bytes, str | None]:
    if len(buf) == 1:
        return buf[0]
    raw = b"".join(r for r, _ in buf)
    if all(t is None for _, t in buf):
        return raw, None
    return raw, "".join(r.decode("ascii") if t is None else t for r, t in buf)


def stream_sha256(files: list[Path], on_bytes=None) -> str:
    """sha256 of the corpus byte stream (the files joined as `read_pieces` joins them)."""
    h = hashlib.sha256()
    for k, path in enumerate(files):
        last = b"\n"
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                    h.update(block)
                    last = block[-1:]
                    if on_bytes is not None:
                        on_bytes(len(block))
        except OSError as e:
            raise CharlstmError(f"cannot read {path}: {e.strerror or e}") from e
        if k + 1 < len(files) and last != b"\n":
            h.update(b"\n")
    return h.hexdigest()


class Progress:
    """A byte counter on stderr (console.progress), or nothing when disabled or the work is small."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and total >= PROGRESS_MIN_BYTES:
            self.bar = console.progress(total, unit="B", unit_scale=True, desc=desc)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Corpus sources, UTF-8 decoding, the character vocabulary, the token cache and splits.

A corpus is a stream of bytes (one file, or several files joined by newlines)
decoded as UTF-8; a token is one Unicode code point. The encoded corpus is
written once under ``tokens/`` of the user's data cache (datacache.py) keyed by
the sha256 of those bytes, in the smallest integer dtype that holds the
vocabulary, with the sha256 of the ids it holds (checked when it is loaded), and
memory-mapped from there on, so that a large corpus costs little RAM. See docs/data.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import mmap
import os
import platform
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import console, datacache
from .config import TrainConfig
from .console import note
from .errors import CharlstmError, UsageError
from .textfiles import check_regular

# --------------------------------------------------------------------------- constants

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_URL_ENV = "CHARLSTM_TINYSHAKESPEARE_URL"  # overrides the URL (mirrors, tests)

PYSTDLIB_CAP_BYTES = 6 * 1024 * 1024  # the built-in corpus: first stdlib files (sorted) within 6 MiB
# Directory names never taken into the built-in corpus: tests, third-party packages,
# caches, and generated tables (codec maps, pydoc's topic dump) that are not code.
PYSTDLIB_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
    "encodings", "pydoc_data", "lib-dynload",
})

CACHE_FORMAT = 2                  # bump when the token cache layout changes (2: ids_sha256 in the header)
BUILT_IN = ("pystdlib", "tinyshakespeare")   # --data names that are not paths
CHUNK_BYTES = 4 * 1024 * 1024     # bytes read, decoded and encoded at a time (bounds memory)
UTF32_SLICE_CHARS = 1024 * 1024   # characters turned into a UTF-32 buffer at a time
BINARY_SNIFF_BYTES = 8192         # a NUL byte in the first 8 KiB marks a binary file (as git does)
PROGRESS_MIN_BYTES = 16 * 1024 * 1024  # no progress bar for work smaller than this


# --------------------------------------------------------------------------- vocabulary

def _describe_chars(chars: Iterable[str], limit: int = 10) -> str:
    """'é' (U+00E9), '\\x00' (U+0000), ... for error messages; at most `limit` shown."""
    chars = list(chars)
    shown = [f"{c!r} (U+{ord(c):04X})" for c in chars[:limit]]
    if len(chars) > limit:
        shown.append(f"and {len(chars) - limit} more")
    return ", ".join(shown)


def dtype_for_vocab_size(size: int) -> torch.dtype:
    """The smallest integer dtype that holds token ids 0..size-1."""
    if size <= 256:
        return torch.uint8
    if size <= 32768:
        return torch.int16
    return torch.int32


class Vocab:
    """The sorted set of code points of a corpus; token id i is ``chars[i]``."""

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise CharlstmError(f"vocabulary entry {i} is {c!r}, not a single character: the vocabulary is damaged")
            if i and ord(chars[i - 1]) >= ord(c):
                raise CharlstmError("vocabulary is not sorted by code point without repeats: the vocabulary is damaged")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}
        self._lut: torch.Tensor | None = None

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        """The vocabulary of the distinct characters of `text`."""
        return cls(sorted(set(text)))

    @classmethod
    def from_code_points(cls, code_points: Iterable[int]) -> Vocab:
        return cls(chr(cp) for cp in sorted(set(code_points)))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"Vocab({len(self)} chars)"

    @property
    def dtype(self) -> torch.dtype:
        """Smallest integer dtype of this vocabulary's token ids."""
        return dtype_for_vocab_size(len(self))

    def lookup_table(self) -> torch.Tensor:
        """(max code point + 1,) int32: token id of each code point, -1 for characters outside."""
        if self._lut is None:
            top = ord(self.chars[-1]) if self.chars else 0
            lut = torch.full((top + 1,), -1, dtype=torch.int32)
            if self.chars:
                cps = torch.tensor([ord(c) for c in self.chars], dtype=torch.long)
                lut[cps] = torch.arange(len(self.chars), dtype=torch.int32)
            self._lut = lut
        return self._lut

    def unknown(self, text: str) -> list[str]:
        """Sorted distinct characters of `text` that are not in the vocabulary."""
        return sorted(set(text).difference(self.stoi), key=ord)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; CharlstmError naming any characters outside the vocabulary."""
        return encode_text(text, self).tolist()

    def decode(self, ids) -> str:
        """The text of token ids (a list, or a tensor of any shape read in order)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self.chars)):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ValueError(f"token id {bad} is outside the vocabulary of {len(self.chars)} characters")
        return "".join(map(self.chars.__getitem__, ids))

    def to_json(self) -> list[str]:
        """JSON-safe form: the list of characters (json escapes NUL, newline; astral chars round-trip)."""
        return list(self.chars)

    @classmethod
    def from_json(cls, data) -> Vocab:
        """Inverse of `to_json`; CharlstmError for anything that is not a valid vocabulary."""
        if not isinstance(data, list):
            raise CharlstmError(f"vocabulary must be a list of characters, got {type(data).__name__}: "
                                "the vocabulary is damaged")
        return cls(data)


def _code_points(text: str) -> torch.Tensor:
    """(N,) int32 code points of `text` (via UTF-32, no Python loop)."""
    if not text:
        return torch.empty(0, dtype=torch.int32)
    with warnings.catch_warnings():  # read-only buffer: the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(text.encode("utf-32-le"), dtype=torch.int32)


def _ids_of_code_points(cps: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """(N,) int32 token ids of int32 code points through a lookup table; -1 where unknown."""
    inside = cps < lut.numel()
    if bool(inside.all()):
        return lut.index_select(0, cps)
    ids = torch.full_like(cps, -1)
    ids[inside] = lut.index_select(0, cps[inside])
    return ids


def encode_text(text: str, vocab: Vocab, unknown: str = "error", *,
                hint: str = "remove them or pass --unknown skip") -> torch.Tensor:
    """(N,) int64 token ids of `text` under `vocab` (for prompts and `eval --text-file`).

    ``unknown='error'`` raises CharlstmError naming the characters outside the
    vocabulary (``hint`` says what the user can do); ``'skip'`` drops them.
    """
    if unknown not in ("error", "skip"):
        raise UsageError(f"unknown must be 'error' or 'skip' (got {unknown!r})")
    ids = _ids_of_code_points(_code_points(text), vocab.lookup_table())
    missing = ids < 0
    if bool(missing.any()):
        if unknown == "error":
            bad = vocab.unknown(text)
            raise CharlstmError(
                f"{len(bad)} character(s) are not in the model's vocabulary of {len(vocab)}: "
                f"{_describe_chars(bad)}; {hint}"
            )
        ids = ids[~missing]
    return ids.long()


# --------------------------------------------------------------------------- sources

@dataclass
class _Source:
    """Where a corpus's bytes come from: files read in order, joined by newlines."""

    name: str
    description: str
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)
    path: str | None = None        # the absolute path of a file or directory source


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def pystdlib_files(root: Path | None = None, cap_bytes: int = PYSTDLIB_CAP_BYTES) -> list[Path]:
    """The built-in corpus: stdlib .py files in sorted path order, as many as fit in `cap_bytes`.

    Tests, site-packages and generated tables are excluded (PYSTDLIB_EXCLUDED_DIRS,
    and the build-specific ``_sysconfigdata_*.py``). Selection stops at the first
    file that would take the total past the cap, so it depends only on the
    interpreter's files.
    """
    root = stdlib_root() if root is None else Path(root)
    candidates: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in PYSTDLIB_EXCLUDED_DIRS and not d.startswith((".", "config-"))]
        for fn in filenames:
            if fn.endswith(".py") and not fn.startswith("_sysconfigdata_"):
                path = Path(dirpath) / fn
                candidates.append((path.relative_to(root).as_posix(), path))
    candidates.sort()
    chosen, total = [], 0
    for _, path in candidates:
        size = path.stat().st_size
        if total + size > cap_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def _is_binary(path: Path) -> bool:
    """True when the file has a NUL byte in its first 8 KiB (git's heuristic)."""
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def _directory_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(text files, binary files) under `root`, sorted by relative path; hidden entries ignored."""
    text, binary = [], []
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.startswith("."):
                continue
            path = Path(dirpath) / fn
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    for _, path in sorted(found):
        try:
            (binary if _is_binary(path) else text).append(path)
        except OSError as e:
            raise CharlstmError(f"cannot read {path}: {e.strerror or e}") from e
    return text, binary


def _tinyshakespeare_url() -> str:
    return os.environ.get(TINYSHAKESPEARE_URL_ENV) or TINYSHAKESPEARE_URL


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


LEGACY_DATA_DIR = Path("data")    # where charlstm cached data before the user cache (read once, never written)


def _adopt_legacy_download(target: Path) -> bool:
    """Copy ./data/tinyshakespeare.txt (the cache of older versions) into the user cache when its
    checksum is right, instead of downloading it again; True when it did."""
    legacy = LEGACY_DATA_DIR / target.name
    try:
        if legacy.resolve() == target.resolve() or not legacy.is_file() \
                or _file_sha256(legacy) != TINYSHAKESPEARE_SHA256:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f"{target.name}.part-{os.getpid()}")
        shutil.copyfile(legacy, part)
        os.replace(part, target)
    except OSError:
        return False
    note(f"note: copied {legacy} into the user cache {target.parent} (charlstm no longer caches under "
         f"./data; it can be removed)")
    return True


def download_tinyshakespeare(data_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Path of tinyshakespeare under `data_dir` (default: the user's data cache), downloaded and
    checksummed on first use.

    The URL is TINYSHAKESPEARE_URL unless the environment variable
    CHARLSTM_TINYSHAKESPEARE_URL names another (a mirror, a file:// URL). With the default
    `data_dir`, a checksummed ./data/tinyshakespeare.txt of older versions is copied, not fetched.
    """
    default_dir = data_dir is None
    data_dir = Path(data_dir) if data_dir is not None else datacache.data_dir()
    target = data_dir / "tinyshakespeare.txt"
    if target.is_file() and _file_sha256(target) == TINYSHAKESPEARE_SHA256:
        datacache.touch(target)
        return target
    if default_dir and _adopt_legacy_download(target):
        return target
    url = _tinyshakespeare_url()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharlstmError(f"cannot create the data directory {data_dir}: {e.strerror or e}") from e
    part = data_dir / f"tinyshakespeare.txt.part-{os.getpid()}"
    offline_hint = ("if this machine is offline, fetch input.txt from the char-rnn repository elsewhere "
                    "and pass it with --data PATH/TO/input.txt")
    h = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
                total = response.headers.get("Content-Length") if hasattr(response, "headers") else None
                with console.progress(int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                                      desc="downloading tinyshakespeare", enabled=progress) as bar:
                    for block in iter(lambda: response.read(64 * 1024), b""):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, ValueError) as e:
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP {e.code} {e.reason}"
            else:
                reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            raise CharlstmError(f"could not download tinyshakespeare from {url}: {reason}; {offline_hint}") from e
        digest = h.hexdigest()
        if digest != TINYSHAKESPEARE_SHA256:
            raise CharlstmError(
                f"the file downloaded from {url} has sha256 {digest}, expected {TINYSHAKESPEARE_SHA256}; "
                f"nothing was kept. Check the URL ({TINYSHAKESPEARE_URL_ENV} overrides it) "
                "or pass a file with --data PATH"
            )
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)  # after a failure or an interruption; gone after os.replace
    return target


def _resolve_source(source: str, data_dir: Path | None, progress: bool) -> _Source:
    """Turn a --data value into the list of files to read."""
    if source == "pystdlib":
        root = stdlib_root()
        files = pystdlib_files(root)
        if not files:
            raise CharlstmError(
                f"the Python standard library sources were not found under {root}, so the built-in corpus "
                f"is unavailable; pass a text file or directory with --data PATH"
            )
        size = sum(p.stat().st_size for p in files)
        desc = (f"Python {platform.python_version()} standard library at {root}: first {len(files)} .py files "
                f"in sorted order, {size} bytes (cap {PYSTDLIB_CAP_BYTES})")
        return _Source("pystdlib", desc, files)
    if source == "tinyshakespeare":
        path = download_tinyshakespeare(data_dir, progress=progress)
        return _Source("tinyshakespeare", f"{_tinyshakespeare_url()} (sha256 {TINYSHAKESPEARE_SHA256[:12]}...)", [path])
    path = Path(source).expanduser()
    if not path.exists():
        raise CharlstmError(
            f"--data {source}: no such file or directory; pass pystdlib (built in), tinyshakespeare "
            f"(downloaded once), a UTF-8 text file, or a directory of text files"
        )
    if path.is_dir():
        text, binary = _directory_files(path)
        if binary:
            names = ", ".join(str(p.relative_to(path)) for p in binary[:20])
            more = f" and {len(binary) - 20} more" if len(binary) > 20 else ""
            note(f"warning: skipped {len(binary)} binary file(s) under {path}: {names}{more}")
        if not text:
            raise CharlstmError(
                f"--data {source}: the directory has no text files"
                + (f" ({len(binary)} binary file(s) skipped)" if binary else "")
                + "; pass a directory containing UTF-8 text files, or a file"
            )
        return _Source(source, f"directory {path.resolve()} ({len(text)} text files)", text, binary,
                       path=str(path.resolve()))
    check_regular(path, "--data", directory_ok=True)   # a FIFO, a device, a socket: one line, never a hang
    return _Source(source, f"file {path.resolve()}", [path], path=str(path.resolve()))


# --------------------------------------------------------------------------- reading and decoding

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


def _read_pieces(files: list[Path], invalid_utf8: str, hasher=None,
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


def _coalesce(pieces: Iterable[tuple[bytes, str | None]],
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


def _stream_sha256(files: list[Path], on_bytes=None) -> str:
    """sha256 of the corpus byte stream (the files joined as `_read_pieces` joins them)."""
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


class _Progress:
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


# --------------------------------------------------------------------------- token cache

def _writer_tag() -> str:
    """host-pid: unique among processes that may share data/ (torchrun ranks, hosts on a shared disk)."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in platform.node()) or "host"
    return f"{host}-{os.getpid()}"


_MAPPED_FILES: set[str] = set()   # token cache files this process has memory-mapped (for release_pages)
MADV_DONTNEED = 4                 # <sys/mman.h> on Linux


def _map_tokens(bin_path: Path, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(N,) tokens of a cache file, memory-mapped privately: pages are read when first touched."""
    path = os.path.realpath(bin_path)
    tokens = torch.from_file(path, shared=False, size=n, dtype=dtype)  # (N,) memory-mapped
    _MAPPED_FILES.add(path)
    return tokens


def _mappings_of(start: int, end: int) -> list[tuple[int, int]]:
    """Parts of [start, end) that are, right now, mappings of a token cache file this process mapped."""
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[5].rstrip("\n").removesuffix(" (deleted)") not in _MAPPED_FILES:
                    continue
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                lo, hi = max(lo, start), min(hi, end)
                if lo < hi:
                    found.append((lo, hi))
    except OSError:
        return []
    return found


def release_pages(tokens: torch.Tensor) -> int:
    """Drop this process's resident pages of memory-mapped tokens; returns the bytes advised.

    Reading a memory-mapped corpus leaves its pages mapped into the process,
    and they count in its RSS until the kernel needs the memory back. A long
    run over a large corpus would show an RSS as large as the corpus although
    the pages are only page cache. ``madvise(MADV_DONTNEED)`` unmaps them from
    this process (they stay in the page cache, so reading them again is
    cheap). Only address ranges that /proc/self/maps shows as a token cache
    file are touched: never anonymous memory (tokens kept in memory, remapped
    copies), so calling this on any tensor is safe. Linux only; elsewhere 0.
    """
    if not _MAPPED_FILES or not sys.platform.startswith("linux") or tokens.numel() == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = tokens.data_ptr()
    end = start + tokens.numel() * tokens.element_size()
    start, end = start - start % page, -(-end // page) * page
    advised = 0
    for lo, hi in _mappings_of(start, end):
        if _madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            advised += hi - lo
    return advised


_libc = None


def _madvise(addr: int, length: int, advice: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise(addr, length, advice)


def _cache_paths(data_dir: Path, key: str) -> tuple[Path, Path]:
    base = Path(data_dir) / "tokens"
    return base / f"{key}.json", base / f"{key}.bin"


_VERIFIED: dict[str, tuple[int, int, int]] = {}   # cache files whose ids matched their sha256 in this process


def _ids_sha256(path: Path) -> str:
    """sha256 of a token cache file, read through a memory map (about 0.15 s per 100 MB)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return hashlib.sha256(m).hexdigest()


def _ids_match(bin_path: Path, expected: str) -> bool:
    """Whether the ids file still holds what was written (its sha256); hashed once per process
    for as long as the file's size, time and inode stay the same."""
    st = bin_path.stat()
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    real = os.path.realpath(bin_path)
    if _VERIFIED.get(real) == stamp:
        return True
    if _ids_sha256(bin_path) != expected:
        return False
    _VERIFIED[real] = stamp
    return True


def _load_cached(data_dir: Path, key: str) -> tuple[Vocab, torch.Tensor, dict] | None:
    """(vocab, memory-mapped tokens, header) from the cache, or None when absent or unusable
    (missing, another format, the wrong size, or ids that do not match their stored sha256)."""
    meta_path, bin_path = _cache_paths(data_dir, key)
    try:
        header = json.loads(meta_path.read_text(encoding="utf-8"))
        if header.get("format") != CACHE_FORMAT:
            return None
        vocab = Vocab.from_json(header["vocab"])
        n = int(header["n_tokens"])
        dtype = vocab.dtype
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if n <= 0 or bin_path.stat().st_size != n * itemsize:
            return None
        if not _ids_match(bin_path, str(header["ids_sha256"])):
            note(f"warning: the token cache {bin_path} does not match its stored sha256 (damaged); rebuilding it")
            return None
        datacache.touch(meta_path)                     # its last use, for least-recently-used pruning
        return vocab, _map_tokens(bin_path, n, dtype), header
    except (OSError, ValueError, KeyError, TypeError, CharlstmError, RuntimeError):
        return None


class _HashingWriter:
    """A binary file that also hashes what is written to it."""

    def __init__(self, out):
        self.out, self.sha256 = out, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.out.write(data)


def _build_cache(src: _Source, data_dir: Path, sha: str, invalid_utf8: str, total_bytes: int,
                 progress: bool) -> tuple[Vocab, torch.Tensor, dict]:
    """Decode the source twice (vocabulary, then ids) and write the token cache; return it mapped."""
    # Pass 1: which code points occur, and how many there are.
    seen: set[int] = set()                                        # code points seen in str pieces
    ascii_seen = b""                                              # ASCII bytes seen so far
    n_tokens = 0
    bar = _Progress(total_bytes, "reading corpus", progress)
    h = hashlib.sha256()
    for raw, text in _coalesce(_read_pieces(src.files, invalid_utf8, hasher=h, on_bytes=bar.update)):
        n_tokens += len(raw) if text is None else len(text)
        # Only characters not seen yet matter. Deleting ASCII bytes from valid UTF-8
        # leaves valid UTF-8, so in strict mode the rest can be decoded on its own.
        if text is None or invalid_utf8 == "strict":
            rest = raw.translate(None, ascii_seen)
            if not rest:
                continue
            if rest.isascii():
                counts = torch.bincount(torch.frombuffer(bytearray(rest), dtype=torch.uint8), minlength=128)
                ascii_seen += bytes(torch.nonzero(counts).flatten().tolist())
                continue
            text = rest.decode("utf-8")
        if len(text) < UTF32_SLICE_CHARS:   # set() is faster on short text, bincount on long
            new = {ord(c) for c in set(text)}
        else:
            new = set()
            for start in range(0, len(text), UTF32_SLICE_CHARS):
                counts = torch.bincount(_code_points(text[start:start + UTF32_SLICE_CHARS]))
                new.update(torch.nonzero(counts).flatten().tolist())
        seen.update(new)
        ascii_seen += bytes(sorted(cp for cp in new if cp < 128 and cp not in ascii_seen))
    bar.close()
    seen.update(ascii_seen)
    if h.hexdigest() != sha:
        raise CharlstmError(f"{src.name} changed while it was being read; try again once it is stable")
    if n_tokens == 0:
        raise CharlstmError(
            f"--data {src.name} contains no text (0 characters); a corpus needs at least batch size x seq len + 1 "
            f"characters in its training split ({TrainConfig.batch_size * TrainConfig.seq_len + 1:,} with the "
            f"defaults --batch-size {TrainConfig.batch_size} --seq-len {TrainConfig.seq_len})"
        )
    replaced = invalid_utf8 == "replace" and 0xFFFD in seen
    vocab = Vocab.from_code_points(seen)
    dtype = vocab.dtype
    lut = vocab.lookup_table().to(dtype)                   # (max cp + 1,) code point -> id
    header = {
        "format": CACHE_FORMAT, "sha256": sha, "name": src.name, "source": src.description,
        "n_tokens": n_tokens, "dtype": str(dtype).removeprefix("torch."),
        "invalid_utf8": invalid_utf8 if replaced else "strict", "vocab": vocab.to_json(),
    }   # + ids_sha256 once the ids are written
    key = sha + ("-replace" if replaced else "")
    meta_path, bin_path = _cache_paths(data_dir, key)
    tmp_bin = bin_path.with_name(f"{bin_path.name}.tmp-{_writer_tag()}")
    tmp_meta = meta_path.with_name(f"{meta_path.name}.tmp-{_writer_tag()}")
    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(tmp_bin, "wb")
    except OSError as e:
        note(f"warning: cannot write the token cache under {bin_path.parent} ({e.strerror or e}); "
             "keeping the tokens in memory")
        tmp_bin, tmp_meta, out = None, None, io.BytesIO()
    try:
        with out:
            hashed = _HashingWriter(out)
            written = _write_ids(src, vocab, lut, invalid_utf8, hashed, total_bytes, progress)
            if written != n_tokens:
                raise CharlstmError(f"{src.name} changed while it was being read; try again once it is stable")
            header["ids_sha256"] = hashed.sha256.hexdigest()
            if tmp_bin is None:
                buffer = bytearray(out.getbuffer())
                return vocab, torch.frombuffer(buffer, dtype=dtype), header
        tmp_meta.write_text(json.dumps(header), encoding="utf-8")
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_meta, meta_path)
        st = bin_path.stat()
        _VERIFIED[os.path.realpath(bin_path)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    finally:
        for leftover in (tmp_bin, tmp_meta):
            if leftover is not None:
                try:
                    leftover.unlink(missing_ok=True)
                except OSError:
                    pass
    return vocab, _map_tokens(bin_path, n_tokens, dtype), header


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a contiguous CPU tensor (without numpy)."""
    t = t.contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def _write_ids(src: _Source, vocab: Vocab, lut: torch.Tensor, invalid_utf8: str, out,
               total_bytes: int, progress: bool) -> int:
    """Pass 2: write the token ids of the source to `out` chunk by chunk; return how many."""
    table = None                                           # ASCII fast path: bytes.translate
    if lut.dtype == torch.uint8:
        table = bytearray(256)
        for i, c in enumerate(vocab.chars):
            if ord(c) < 128:
                table[ord(c)] = i
        table = bytes(table)
    written = 0
    bar = _Progress(total_bytes, "encoding corpus", progress)
    for raw, text in _coalesce(_read_pieces(src.files, invalid_utf8, on_bytes=bar.update)):
        if text is None and table is not None:
            out.write(raw.translate(table))
            written += len(raw)
            continue
        if text is None:
            text = raw.decode("ascii")
        for start in range(0, len(text), UTF32_SLICE_CHARS):  # bounds the UTF-32 buffer
            cps = _code_points(text[start:start + UTF32_SLICE_CHARS])   # (n,) int32
            out.write(tensor_bytes(lut.index_select(0, cps)))           # (n,) ids in the cache dtype
            written += cps.numel()
            del cps
    bar.close()
    return written


# --------------------------------------------------------------------------- corpus

@dataclass
class Corpus:
    """A decoded, encoded corpus: its identity, vocabulary and memory-mapped tokens."""

    name: str                      # 'pystdlib', 'tinyshakespeare', or the path given
    source: str                    # human description (path, URL, interpreter version)
    sha256: str                    # of the raw bytes that were decoded
    vocab: Vocab
    tokens: torch.Tensor           # (N,) smallest integer dtype, memory-mapped from data/
    n_files: int = 1
    skipped: list[str] = field(default_factory=list)   # binary files skipped in a directory
    invalid_utf8: str = "strict"   # 'replace' when undecodable bytes were read as U+FFFD
    path: str | None = None        # absolute path of a file or directory source (None: built in)

    def __len__(self) -> int:
        return self.tokens.numel()

    def split(self, val_frac: float = 0.1, test_frac: float = 0.0) -> dict[str, torch.Tensor]:
        """{'train', 'val', 'test'}: contiguous views; val is the last part, test just before it.

        train is the first floor(N * (1 - val_frac - test_frac)) tokens (nanoGPT's
        ``int(0.9 * n)`` by default); an unused split is an empty tensor.
        """
        if not (0.0 <= val_frac < 1.0 and 0.0 <= test_frac < 1.0 and val_frac + test_frac < 1.0):
            raise UsageError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1 "
                             f"(got {val_frac} and {test_frac})")
        n = self.tokens.numel()
        train_end = int(n * (1.0 - val_frac - test_frac))
        test_end = max(int(n * (1.0 - val_frac)), train_end)
        return {
            "train": self.tokens[:train_end],
            "test": self.tokens[train_end:test_end],
            "val": self.tokens[test_end:],
        }

    def meta(self) -> dict:
        """JSON-safe identity of the corpus, stored in checkpoints ("path": the absolute path of a file
        or directory source, so that a run finds its data from any working directory)."""
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "n_chars": self.tokens.numel(),
            "vocab_size": len(self.vocab),
            "n_files": self.n_files,
            "invalid_utf8": self.invalid_utf8,
            **({"path": self.path} if self.path is not None else {}),
        }


def load_corpus(source: str = "pystdlib", *, data_dir: Path | None = None,
                invalid_utf8: str = "strict", progress: bool = True) -> Corpus:
    """Load a corpus by --data value: read, decode, encode (cached under data_dir/tokens), map.

    `data_dir` defaults to the user's data cache (datacache.data_dir: $CHARLSTM_DATA_DIR, else
    $XDG_CACHE_HOME/charlstm/data). `invalid_utf8` is 'strict' (CharlstmError naming file and byte
    offset) or 'replace' (bad bytes become U+FFFD). Progress bars go to stderr.
    """
    if invalid_utf8 not in ("strict", "replace"):
        raise UsageError(f"--invalid-utf8 must be strict or replace (got {invalid_utf8!r})")
    source = str(source)
    src = _resolve_source(source, None if data_dir is None else Path(data_dir), progress)
    data_dir = datacache.data_dir() if data_dir is None else Path(data_dir)
    total = sum(p.stat().st_size for p in src.files)
    bar = _Progress(total, "hashing corpus", progress)
    sha = _stream_sha256(src.files, on_bytes=bar.update)
    bar.close()
    cached = _load_cached(data_dir, sha)
    if cached is None and invalid_utf8 == "replace":
        cached = _load_cached(data_dir, sha + "-replace")
    if cached is None:
        cached = _build_cache(src, data_dir, sha, invalid_utf8, total, progress)
        _prune(data_dir, sha)
    vocab, tokens, header = cached
    return Corpus(
        name=src.name, source=src.description, sha256=sha, vocab=vocab, tokens=tokens,
        n_files=len(src.files), skipped=[str(p) for p in src.skipped],
        invalid_utf8=header.get("invalid_utf8", "strict"), path=src.path,
    )


def _prune(data_dir: Path, sha: str) -> None:
    """Keep the token caches within their cap after a new one was written (never the new one)."""
    try:
        removed = datacache.prune(data_dir, keep=sha, cap=datacache.cap_bytes())
    except OSError:
        return
    if removed:
        freed = datacache.format_bytes(sum(e.bytes for e in removed))
        note(f"note: removed {len(removed)} least recently used token cache(s) ({freed}) from {data_dir} to stay "
             f"under {datacache.CACHE_MAX_ENV}={datacache.format_bytes(datacache.cap_bytes() or 0)}")


def map_tokens(path: Path, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(N,) tokens of a raw ids file, memory-mapped privately (`release_pages` drops what was read)."""
    return _map_tokens(path, n, dtype)


# --------------------------------------------------------------------------- where a run's data is

def stored_path(meta: dict | None) -> str | None:
    """The absolute path of a run's file or directory corpus, from its stored corpus meta: "path"
    where the run stored it, else read from "source" (runs written before "path" existed)."""
    meta = meta or {}
    if isinstance(meta.get("path"), str):
        return meta["path"]
    source = str(meta.get("source", ""))
    for kind in ("file ", "directory "):
        if source.startswith(kind):
            rest = source[len(kind):]
            return rest.rsplit(" (", 1)[0] if kind == "directory " else rest
    return None


def locate_data(data: str, meta: dict | None) -> str:
    """The --data value that finds a run's corpus (stored as `data`, with its corpus `meta`) from the
    current directory: `data` itself where it is a built-in name or names the stored path from here;
    else the absolute path the run stored, where it exists; else `data` (relative to here: a moved
    project)."""
    path = stored_path(meta)
    if data in BUILT_IN or path is None or os.path.abspath(os.path.expanduser(data)) == path:
        return data
    return path if os.path.exists(path) else data


def same_source(stored_meta: dict | None, given: str) -> bool:
    """Whether --data `given` names the data a run was trained on (its stored corpus meta): the same
    built-in name, the same absolute path, or a file or directory whose bytes have the stored sha256."""
    meta = stored_meta or {}
    given = str(given)
    if given in BUILT_IN or meta.get("name") in BUILT_IN:
        return given == meta.get("name")
    path = stored_path(meta)
    if path is not None and os.path.abspath(os.path.expanduser(given)) == path:
        return True
    if not meta.get("sha256"):
        return False
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # no binary-file warnings for a mere comparison
            src = _resolve_source(given, None, progress=False)
        return _stream_sha256(src.files) == meta["sha256"]
    except CharlstmError:
        return False

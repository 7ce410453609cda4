"""The token cache: a corpus encoded once into ``tokens/`` of the data cache (datacache.py), keyed
by the sha256 of its bytes: KEY.bin holds the ids in the vocabulary's smallest integer dtype,
KEY.json the header (vocabulary, count, the ids' own sha256, checked when loaded). Loaded caches
are memory-mapped; ``release_pages`` drops the pages a process has read (docs/data.md, "Token cache")."""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import mmap
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import datacache
from .config import TrainConfig
from .console import note
from .errors import CharlstmError
from .sources import Source
from .textstream import Progress, coalesce, read_pieces
from .vocab import Vocab, code_points

CACHE_FORMAT = 2                  # bump when the token cache layout changes (2: ids_sha256 in the header)
UTF32_SLICE_CHARS = 1024 * 1024   # characters turned into a UTF-32 buffer at a time


# --------------------------------------------------------------------------- memory maps

_MAPPED_FILES: set[str] = set()   # token cache files this process has memory-mapped (for release_pages)
MADV_DONTNEED = 4                 # <sys/mman.h> on Linux


def map_tokens(bin_path: Path, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(N,) tokens of a raw ids file, memory-mapped privately: pages are read when first touched
    (`release_pages` drops what was read)."""
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


# --------------------------------------------------------------------------- files and their integrity

def _cache_paths(data_dir: Path, key: str) -> tuple[Path, Path]:
    base = Path(data_dir) / "tokens"
    return base / f"{key}.json", base / f"{key}.bin"


_VERIFIED: dict[str, tuple[int, int, int]] = {}   # cache files whose ids matched their sha256 in this process


def _ids_sha256(path: Path) -> str:
    """sha256 of a token cache file, read through a memory map."""
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


def load(data_dir: Path, key: str) -> tuple[Vocab, torch.Tensor, dict] | None:
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
        return vocab, map_tokens(bin_path, n, dtype), header
    except (OSError, ValueError, KeyError, TypeError, CharlstmError, RuntimeError):
        return None


# --------------------------------------------------------------------------- building

def build(src: Source, data_dir: Path, sha: str, invalid_utf8: str, total_bytes: int,
          progress: bool) -> tuple[Vocab, torch.Tensor, dict]:
    """Decode the source twice (vocabulary, then ids) and write the token cache; return it mapped."""
    seen, n_tokens = _scan(src, sha, invalid_utf8, total_bytes, progress)
    replaced = invalid_utf8 == "replace" and 0xFFFD in seen
    vocab = Vocab.from_code_points(seen)
    header = {
        "format": CACHE_FORMAT, "sha256": sha, "name": src.name, "source": src.description,
        "n_tokens": n_tokens, "dtype": str(vocab.dtype).removeprefix("torch."),
        "invalid_utf8": invalid_utf8 if replaced else "strict", "vocab": vocab.to_json(),
    }   # + ids_sha256 once the ids are written
    key = sha + ("-replace" if replaced else "")

    def write_ids(out) -> None:                            # pass 2, into the cache file or memory
        written = _write_ids(src, vocab, invalid_utf8, out, total_bytes, progress)
        if written != n_tokens:
            raise CharlstmError(f"{src.name} changed while it was being read; try again once it is stable")

    return vocab, _write(data_dir, key, header, vocab.dtype, write_ids), header


def _scan(src: Source, sha: str, invalid_utf8: str, total_bytes: int, progress: bool) -> tuple[set[int], int]:
    """Pass 1: which code points occur, and how many characters there are; CharlstmError when the
    source changed since it was hashed or holds no text."""
    seen: set[int] = set()                                        # code points seen in str pieces
    ascii_seen = b""                                              # ASCII bytes seen so far
    n_tokens = 0
    bar = Progress(total_bytes, "reading corpus", progress)
    h = hashlib.sha256()
    for raw, text in coalesce(read_pieces(src.files, invalid_utf8, hasher=h, on_bytes=bar.update)):
        n_tokens += len(raw) if text is None else len(text)
        new, ascii_seen = _new_code_points(raw, text, invalid_utf8, ascii_seen)
        seen.update(new)
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
    return seen, n_tokens


def _new_code_points(raw: bytes, text: str | None, invalid_utf8: str,
                     ascii_seen: bytes) -> tuple[set[int], bytes]:
    """The code points of one piece that may not have been seen yet, and the ASCII bytes seen
    once the piece is counted."""
    # Only characters not seen yet matter. Deleting ASCII bytes from valid UTF-8
    # leaves valid UTF-8, so in strict mode the rest can be decoded on its own.
    if text is None or invalid_utf8 == "strict":
        rest = raw.translate(None, ascii_seen)
        if not rest:
            return set(), ascii_seen
        if rest.isascii():
            counts = torch.bincount(torch.frombuffer(bytearray(rest), dtype=torch.uint8), minlength=128)
            return set(), ascii_seen + bytes(torch.nonzero(counts).flatten().tolist())
        text = rest.decode("utf-8")
    if len(text) < UTF32_SLICE_CHARS:   # set() is faster on short text, bincount on long
        new = {ord(c) for c in set(text)}
    else:
        new = set()
        for start in range(0, len(text), UTF32_SLICE_CHARS):
            counts = torch.bincount(code_points(text[start:start + UTF32_SLICE_CHARS]))
            new.update(torch.nonzero(counts).flatten().tolist())
    return new, ascii_seen + bytes(sorted(cp for cp in new if cp < 128 and cp not in ascii_seen))


def _writer_tag() -> str:
    """host-pid: unique among processes that may share data/ (torchrun ranks, hosts on a shared disk)."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in platform.node()) or "host"
    return f"{host}-{os.getpid()}"


def _write(data_dir: Path, key: str, header: dict, dtype: torch.dtype, write_ids: Callable) -> torch.Tensor:
    """The cache KEY: ``write_ids(out)`` writes the ids to a temporary file, then the header
    (with ``ids_sha256`` added) goes beside it and both are renamed into place; returns the ids
    mapped. Where the cache directory is not writable, the ids stay in memory (with a warning)."""
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
            write_ids(hashed)
            header["ids_sha256"] = hashed.sha256.hexdigest()
            if tmp_bin is None:
                buffer = bytearray(out.getbuffer())
                return torch.frombuffer(buffer, dtype=dtype)
        tmp_meta.write_text(json.dumps(header), encoding="utf-8")
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_meta, meta_path)
        st = bin_path.stat()
        _VERIFIED[os.path.realpath(bin_path)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    finally:
        _remove(tmp_bin, tmp_meta)
    return map_tokens(bin_path, header["n_tokens"], dtype)


def _remove(*paths: Path | None) -> None:
    """Delete what is left of temporary files (after a failure or an interruption)."""
    for leftover in paths:
        if leftover is not None:
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass


class _HashingWriter:
    """A binary file that also hashes what is written to it."""

    def __init__(self, out):
        self.out, self.sha256 = out, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.out.write(data)


def _write_ids(src: Source, vocab: Vocab, invalid_utf8: str, out, total_bytes: int, progress: bool) -> int:
    """Pass 2: write the token ids of the source to `out` chunk by chunk; return how many."""
    lut = vocab.lookup_table().to(vocab.dtype)             # (max cp + 1,) code point -> id
    table = None                                           # ASCII fast path: bytes.translate
    if lut.dtype == torch.uint8:
        table = bytearray(256)
        for i, c in enumerate(vocab.chars):
            if ord(c) < 128:
                table[ord(c)] = i
        table = bytes(table)
    written = 0
    bar = Progress(total_bytes, "encoding corpus", progress)
    for raw, text in coalesce(read_pieces(src.files, invalid_utf8, on_bytes=bar.update)):
        if text is None and table is not None:
            out.write(raw.translate(table))
            written += len(raw)
            continue
        if text is None:
            text = raw.decode("ascii")
        for start in range(0, len(text), UTF32_SLICE_CHARS):  # bounds the UTF-32 buffer
            cps = code_points(text[start:start + UTF32_SLICE_CHARS])   # (n,) int32
            out.write(tensor_bytes(lut.index_select(0, cps)))           # (n,) ids in the cache dtype
            written += cps.numel()
            del cps
    bar.close()
    return written


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a contiguous CPU tensor (without numpy)."""
    t = t.contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def prune(data_dir: Path, sha: str) -> None:
    """Keep the token caches within their cap after a new one was written (never the new one)."""
    try:
        removed = datacache.prune(data_dir, keep=sha, cap=datacache.cap_bytes())
    except OSError:
        return
    if removed:
        freed = datacache.format_bytes(sum(e.bytes for e in removed))
        note(f"note: removed {len(removed)} least recently used token cache(s) ({freed}) from {data_dir} to stay "
             f"under {datacache.CACHE_MAX_ENV}={datacache.format_bytes(datacache.cap_bytes() or 0)}")

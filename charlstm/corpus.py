"""A corpus: ``load_corpus`` turns a --data value into a ``Corpus`` (its identity, vocabulary and
memory-mapped tokens, encoded once into the token cache), split into train, val and test; and
where a run's data is from any directory (``locate_data``, ``same_source``). See docs/data.md.

The parts live in sources.py (--data values to files), textstream.py (reading and decoding),
vocab.py (``Vocab``, ``encode_text``) and tokencache.py (the cache, ``release_pages``); the names
callers use are importable from here too.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import datacache, tokencache
from .errors import CharlstmError, UsageError
from .sources import (
    BUILT_IN,
    TINYSHAKESPEARE_SHA256,
    TINYSHAKESPEARE_URL,
    TINYSHAKESPEARE_URL_ENV,
    download_tinyshakespeare,
    pystdlib_files,
    resolve_source,
    stdlib_root,
)
from .textstream import Progress, stream_sha256
from .tokencache import CACHE_FORMAT, map_tokens, release_pages, tensor_bytes
from .vocab import Vocab, dtype_for_vocab_size, encode_text

__all__ = [
    "BUILT_IN", "CACHE_FORMAT", "TINYSHAKESPEARE_SHA256", "TINYSHAKESPEARE_URL", "TINYSHAKESPEARE_URL_ENV",
    "Corpus", "Vocab", "download_tinyshakespeare", "dtype_for_vocab_size", "encode_text", "load_corpus",
    "locate_data", "map_tokens", "pystdlib_files", "release_pages", "same_source", "stdlib_root", "stored_path",
    "tensor_bytes",
]


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
    src = resolve_source(source, None if data_dir is None else Path(data_dir), progress)
    data_dir = datacache.data_dir() if data_dir is None else Path(data_dir)
    total = sum(p.stat().st_size for p in src.files)
    bar = Progress(total, "hashing corpus", progress)
    sha = stream_sha256(src.files, on_bytes=bar.update)
    bar.close()
    cached = tokencache.load(data_dir, sha)
    if cached is None and invalid_utf8 == "replace":
        cached = tokencache.load(data_dir, sha + "-replace")
    if cached is None:
        cached = tokencache.build(src, data_dir, sha, invalid_utf8, total, progress)
        tokencache.prune(data_dir, sha)
    vocab, tokens, header = cached
    return Corpus(
        name=src.name, source=src.description, sha256=sha, vocab=vocab, tokens=tokens,
        n_files=len(src.files), skipped=[str(p) for p in src.skipped],
        invalid_utf8=header.get("invalid_utf8", "strict"), path=src.path,
    )


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
            src = resolve_source(given, None, progress=False)
        return stream_sha256(src.files) == meta["sha256"]
    except CharlstmError:
        return False

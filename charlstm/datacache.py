"""The user's data cache: where downloads and token caches live, their size cap, listing and clearing.

The cache is one directory per user (``$XDG_CACHE_HOME/charlstm/data`` on Linux, the platform's
cache directory elsewhere; ``CHARLSTM_DATA_DIR`` or ``--data-dir`` move it), shared by every working
directory. Downloads (``tinyshakespeare.txt``) stay until cleared; token caches (``tokens/<key>.bin``
and ``.json``) are pruned, least recently used first, when they pass the cap (``CHARLSTM_CACHE_MAX``,
default 2 GiB). See docs/data.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UsageError

DATA_DIR_ENV = "CHARLSTM_DATA_DIR"      # moves the cache (as --data-dir does for one command)
CACHE_MAX_ENV = "CHARLSTM_CACHE_MAX"    # cap of the token caches: 2G, 500M, 1048576, or none
DEFAULT_CAP_BYTES = 2 * 1024 ** 3
DOWNLOADS = ("tinyshakespeare.txt",)    # files fetched from the network, kept until cleared
TOKENS = "tokens"                       # the subdirectory of the token caches
STALE_TEMP_SECONDS = 600               # a temporary file not written to for this long is a killed writer's
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def user_cache_root() -> Path:
    """The platform's per-user cache directory for charlstm (without the ``data`` part)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "charlstm"
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "charlstm" / "Cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "charlstm"


def data_dir() -> Path:
    """Where downloads and token caches go: $CHARLSTM_DATA_DIR, else the user cache's ``data``."""
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override).expanduser() if override else user_cache_root() / "data"


@contextlib.contextmanager
def using_data_dir(path: Path | str | None):
    """Run the body with the data cache at ``path`` (None: unchanged), also for processes it starts."""
    if path is None:
        yield
        return
    before = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(Path(path).expanduser().absolute())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = before


def parse_size(text: str, option: str = CACHE_MAX_ENV) -> int | None:
    """'2G', '500M', '1.5GiB', '1048576' -> bytes; 'none' (no cap) -> None. UsageError otherwise."""
    s = str(text).strip().lower()
    if s in ("none", "off", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", s)
    if not m:
        raise UsageError(f"{option} takes a size such as 2G, 500M or 1048576 bytes, or none (got {text!r})")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def cap_bytes() -> int | None:
    """The token caches' cap: $CHARLSTM_CACHE_MAX, else DEFAULT_CAP_BYTES; None: no cap."""
    text = os.environ.get(CACHE_MAX_ENV)
    return DEFAULT_CAP_BYTES if not text else parse_size(text)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the cap is given)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


# --------------------------------------------------------------------------- entries

@dataclass
class Entry:
    """One thing in the cache: a download, or a token cache (its .bin and .json together)."""

    kind: str            # 'download' or 'tokens'
    key: str             # file name of a download; sha256 key of a token cache
    name: str            # what it holds: 'tinyshakespeare', or the --data the tokens came from
    bytes: int
    last_used: float     # seconds since the epoch (a token cache's header is touched at each use)
    paths: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def touch(path: Path) -> None:
    """Mark a cache entry as used now (its mtime is its last use); silently nothing where read-only."""
    try:
        os.utime(path)
    except OSError:
        pass


def _token_entries(root: Path) -> list[Entry]:
    out = []
    base = root / TOKENS
    for meta in sorted(base.glob("*.json")) if base.is_dir() else []:
        key = meta.name[:-len(".json")]
        files = [p for p in (meta, base / f"{key}.bin") if p.exists()]
        try:
            header = json.loads(meta.read_text(encoding="utf-8"))
            name = str(header.get("name", "?"))
        except (OSError, ValueError, AttributeError):
            name = "? (unreadable header)"
        out.append(Entry("tokens", key, name, sum(_size(p) for p in files), _mtime(meta), [str(p) for p in files]))
    for orphan in sorted(base.glob("*.bin")) if base.is_dir() else []:   # a .bin without its header
        if not orphan.with_suffix(".json").exists():
            out.append(Entry("tokens", orphan.stem, "? (no header)", _size(orphan), _mtime(orphan), [str(orphan)]))
    return out


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def entries(root: Path | None = None) -> list[Entry]:
    """Everything in the cache: downloads first, then token caches, most recently used first."""
    root = Path(root) if root is not None else data_dir()
    downloads = [Entry("download", n, Path(n).stem, _size(root / n), _mtime(root / n), [str(root / n)])
                 for n in DOWNLOADS if (root / n).is_file()]
    tokens = sorted(_token_entries(root), key=lambda e: -e.last_used)
    return downloads + tokens


def _temp_files(root: Path) -> list[Path]:
    """Temporary files of interrupted writes (``.tmp-``/``.part-`` in their names)."""
    found = []
    for d in (root, root / TOKENS):
        if d.is_dir():
            found += [p for p in d.iterdir() if p.is_file() and (".tmp-" in p.name or ".part-" in p.name)]
    return found


def _stale_temp_files(root: Path) -> list[Path]:
    """Temporary files nobody has written to for STALE_TEMP_SECONDS (a running writer keeps its fresh)."""
    now = time.time()
    return [p for p in _temp_files(root) if now - _mtime(p) > STALE_TEMP_SECONDS]


def _remove(paths) -> int:
    freed = 0
    for p in map(Path, paths):
        size = _size(p)
        try:
            p.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


def prune(root: Path | None = None, *, cap: int | None | str = "env", keep: str | None = None) -> list[Entry]:
    """Remove the least recently used token caches until they fit in ``cap`` bytes (default: the
    env's or 2 GiB; None: no cap), never the entry ``keep``; also the temporary files of killed
    writers. Downloads are never pruned. Returns the entries removed."""
    root = Path(root) if root is not None else data_dir()
    cap = cap_bytes() if cap == "env" else cap
    _remove(_stale_temp_files(root))
    if cap is None:
        return []
    tokens = sorted(_token_entries(root), key=lambda e: e.last_used)   # oldest first
    total = sum(e.bytes for e in tokens)
    removed = []
    for e in tokens:
        if total <= cap:
            break
        if e.key == keep:
            continue
        _remove(e.paths)
        total -= e.bytes
        removed.append(e)
    return removed


def clear(root: Path | None = None, *, downloads: bool = True, tokens: bool = True) -> tuple[int, int]:
    """Remove the downloads and/or the token caches (and killed writers' temporary files); (files, bytes)."""
    root = Path(root) if root is not None else data_dir()
    chosen = [e for e in entries(root) if (e.kind == "download" and downloads) or (e.kind == "tokens" and tokens)]
    paths = [p for e in chosen for p in e.paths] + [str(p) for p in _stale_temp_files(root)]
    return len(paths), _remove(paths)

"""Where a corpus's bytes come from: a --data value (the built-in pystdlib, tinyshakespeare
downloaded once into the data cache, a UTF-8 text file, a directory of text files) resolved to
the list of files to read, in order (docs/data.md, "Sources")."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import console, datacache
from .console import note
from .errors import CharlstmError
from .textfiles import check_regular
from .textstream import CHUNK_BYTES

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_URL_ENV = "CHARLSTM_TINYSHAKESPEARE_URL"  # overrides the URL (mirrors, tests)
OFFLINE_HINT = ("if this machine is offline, fetch input.txt from the char-rnn repository elsewhere "
                "and pass it with --data PATH/TO/input.txt")

PYSTDLIB_CAP_BYTES = 6 * 1024 * 1024  # the built-in corpus: first stdlib files (sorted) within 6 MiB
# Directory names never taken into the built-in corpus: tests, third-party packages,
# caches, and generated tables (codec maps, pydoc's topic dump) that are not code.
PYSTDLIB_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
    "encodings", "pydoc_data", "lib-dynload",
})

BUILT_IN = ("pystdlib", "tinyshakespeare")   # --data names that are not paths
BINARY_SNIFF_BYTES = 8192         # a NUL byte in the first 8 KiB marks a binary file (as git does)


@dataclass
class Source:
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


def tinyshakespeare_url() -> str:
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
    url = tinyshakespeare_url()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharlstmError(f"cannot create the data directory {data_dir}: {e.strerror or e}") from e
    part = data_dir / f"tinyshakespeare.txt.part-{os.getpid()}"
    try:
        digest = _fetch(url, part, progress)
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


def _fetch(url: str, part: Path, progress: bool) -> str:
    """Download `url` into the file `part` (a progress bar on stderr) and return its sha256;
    CharlstmError, with what to do offline, when the download fails."""
    h = hashlib.sha256()
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
        raise CharlstmError(f"could not download tinyshakespeare from {url}: {reason}; {OFFLINE_HINT}") from e
    return h.hexdigest()


def resolve_source(source: str, data_dir: Path | None, progress: bool) -> Source:
    """Turn a --data value into the list of files to read."""
    if source == "pystdlib":
        return _pystdlib_source()
    if source == "tinyshakespeare":
        path = download_tinyshakespeare(data_dir, progress=progress)
        return Source("tinyshakespeare", f"{tinyshakespeare_url()} (sha256 {TINYSHAKESPEARE_SHA256[:12]}...)", [path])
    path = Path(source).expanduser()
    if not path.exists():
        raise CharlstmError(
            f"--data {source}: no such file or directory; pass pystdlib (built in), tinyshakespeare "
            f"(downloaded once), a UTF-8 text file, or a directory of text files"
        )
    if path.is_dir():
        return _directory_source(source, path)
    check_regular(path, "--data", directory_ok=True)   # a FIFO, a device, a socket: one line, never a hang
    return Source(source, f"file {path.resolve()}", [path], path=str(path.resolve()))


def _pystdlib_source() -> Source:
    """The built-in corpus of the running interpreter."""
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
    return Source("pystdlib", desc, files)


def _directory_source(source: str, path: Path) -> Source:
    """The text files of a directory (a warning names the binary files skipped)."""
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
    return Source(source, f"directory {path.resolve()} ({len(text)} text files)", text, binary,
                  path=str(path.resolve()))

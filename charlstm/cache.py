"""`charlstm cache`: what the data cache holds (downloads, token caches: sizes, last use), clearing
and pruning it. The cache itself is datacache.py's; docs/data.md describes it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import datacache


def describe(root: Path | None = None) -> dict:
    """The cache as a JSON-safe dict: directory, cap, totals and every entry (most recently used first)."""
    root = Path(root) if root is not None else datacache.data_dir()
    found = datacache.entries(root)
    cap = datacache.cap_bytes()
    return {
        "data_dir": str(root),
        "cap_bytes": cap,
        "token_bytes": sum(e.bytes for e in found if e.kind == "tokens"),
        "download_bytes": sum(e.bytes for e in found if e.kind == "download"),
        "entries": [e.to_dict() for e in found],
    }


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def make_table(d: dict) -> Table:
    """The rich table `charlstm cache` prints."""
    cap = "no cap" if d["cap_bytes"] is None else f"cap {datacache.format_bytes(d['cap_bytes'])}"
    table = Table(title=f"{d['data_dir']}: downloads {datacache.format_bytes(d['download_bytes'])}, token caches "
                        f"{datacache.format_bytes(d['token_bytes'])} ({cap}, {datacache.CACHE_MAX_ENV})",
                  title_justify="left")
    for name, justify in (("kind", "left"), ("holds", "left"), ("size", "right"), ("last used", "left"),
                          ("key", "left")):
        table.add_column(name, justify=justify)
    for e in d["entries"]:
        table.add_row(e["kind"], e["name"], datacache.format_bytes(e["bytes"]), _when(e["last_used"]),
                      e["key"][:16] + ("..." if len(e["key"]) > 16 else ""))
    return table


def list_command(data_dir: Path | None, json_out: bool) -> dict:
    """`charlstm cache [list]`: print what the cache holds (one JSON object with --json)."""
    d = describe(data_dir)
    if json_out:
        print(json.dumps(d))
    elif not d["entries"]:
        print(f"{d['data_dir']}: empty")
    else:
        Console().print(make_table(d))
    return d


def clear_command(data_dir: Path | None, downloads: bool, tokens: bool) -> tuple[int, int]:
    """`charlstm cache clear`: remove downloads and/or token caches (both when neither is chosen)."""
    root = Path(data_dir) if data_dir is not None else datacache.data_dir()
    if not downloads and not tokens:
        downloads = tokens = True
    files, freed = datacache.clear(root, downloads=downloads, tokens=tokens)
    what = " and ".join(w for w, on in (("downloads", downloads), ("token caches", tokens)) if on)
    print(f"removed {what} from {root}: {files} file(s), {datacache.format_bytes(freed)}")
    return files, freed


def prune_command(data_dir: Path | None, max_size: str | None) -> int:
    """`charlstm cache prune`: remove least recently used token caches past the cap (or ``max_size``)."""
    root = Path(data_dir) if data_dir is not None else datacache.data_dir()
    cap = datacache.cap_bytes() if max_size is None else datacache.parse_size(max_size, "--max-size")
    removed = datacache.prune(root, cap=cap)
    freed = sum(e.bytes for e in removed)
    print(f"removed {len(removed)} token cache(s), {datacache.format_bytes(freed)}, from {root}")
    return len(removed)

"""Shared pytest fixtures: the read-only shared data directory and a tiny corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/data relative to the repository root (never copied into the repo).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A few KB of text with some non-ASCII code points (accents, CJK, an emoji from
# the astral plane, a tab) so that tests exercise more than ASCII.
_TINY_LINES = [
    "First Citizen:",
    "Before we proceed any further, hear me speak.",
    "",
    "All:",
    "Speak, speak.",
    "",
    "def greet(name):\n\treturn f'héllo, {name}!'",
    "Café crème, naïve façade, 日本語のテキスト, emoji 🙂 and ünïcödé.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


def tiny_text(repeat: int = 40) -> str:
    """The text of `tiny_corpus_file`: a few KB, multi-line, some Unicode."""
    return "\n".join(_TINY_LINES * repeat) + "\n"


@pytest.fixture(autouse=True)
def _clean_charlstm_env():
    """Each test starts and ends without CHARLSTM_* switches (``--debug`` sets CHARLSTM_DEBUG in-process)."""
    names = ("CHARLSTM_DEBUG", "CHARLSTM_TINYSHAKESPEARE_URL")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    yield
    for n in names:
        os.environ.pop(n, None)
    os.environ.update(saved)


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data (tinyshakespeare.txt lives there); skips when absent."""
    if not (SHARED_DATA / "tinyshakespeare.txt").is_file():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (expected tinyshakespeare.txt there)")
    return SHARED_DATA


@pytest.fixture
def tiny_corpus_file(tmp_path: Path) -> Path:
    """A small UTF-8 text file (about 10 KB, some non-ASCII) in tmp_path."""
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_text(), encoding="utf-8")
    return path

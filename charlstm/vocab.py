"""The character vocabulary: ``Vocab``, the sorted code points of a corpus (token id i is
``chars[i]``), and ``encode_text``, text to token ids through a lookup table over code points."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from .errors import CharlstmError, UsageError


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


def code_points(text: str) -> torch.Tensor:
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
    ids = _ids_of_code_points(code_points(text), vocab.lookup_table())
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

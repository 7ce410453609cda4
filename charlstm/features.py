"""Simple features of a text, one number per character, for finding interpretable units.

Each feature describes the text *after* reading a character, which is what the
recurrent state holds at that step: the opening quote itself is already
"inside quotes", the closing one is not; a newline starts a line at position 0.
These are the properties Karpathy, Johnson and Fei-Fei (2015) found single LSTM
cells tracking: quotes, bracket depth, position in the line, indentation.
"""

from __future__ import annotations

import torch
from torch import Tensor

FEATURES = ("inside_quotes", "bracket_depth", "position_in_line", "start_of_word", "indentation")

FEATURE_HELP = {
    "inside_quotes": "1 between an opening and its closing quote (' or \"), else 0; "
                     "an apostrophe between letters is not a quote",
    "bracket_depth": "nesting depth of (, [ and { outside quotes",
    "position_in_line": "characters since the last newline",
    "start_of_word": "1 on the first letter, digit or _ after a non-word character",
    "indentation": "columns of leading whitespace of the current line read so far (tab = 4)",
}

_OPEN, _CLOSE = "([{", ")]}"
TAB_WIDTH = 4


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def text_features(text: str) -> dict[str, Tensor]:
    """Every feature of FEATURES for each character of ``text``: name -> (T,) float32."""
    T = len(text)
    quote: str | None = None   # the open quote character, None outside quotes
    depth = 0
    column = 0
    indent = 0
    in_indent = True           # still inside the current line's leading whitespace
    vals = {name: [0.0] * T for name in FEATURES}
    for t, ch in enumerate(text):
        prev = text[t - 1] if t > 0 else "\n"
        nxt = text[t + 1] if t + 1 < len(text) else " "
        if ch in "'\"":
            apostrophe = ch == "'" and prev.isalpha() and nxt.isalpha()
            if quote is None and not apostrophe:
                quote = ch
            elif quote == ch:
                quote = None
        elif quote is None and ch in _OPEN:
            depth += 1
        elif quote is None and ch in _CLOSE:
            depth = max(depth - 1, 0)
        if ch == "\n":
            column, indent, in_indent = 0, 0, True
        else:
            column += 1
            if in_indent and ch in " \t":
                indent += TAB_WIDTH if ch == "\t" else 1
            else:
                in_indent = False
        vals["inside_quotes"][t] = 1.0 if quote is not None else 0.0
        vals["bracket_depth"][t] = float(depth)
        vals["position_in_line"][t] = float(column)
        vals["start_of_word"][t] = 1.0 if _is_word(ch) and not _is_word(prev) else 0.0
        vals["indentation"][t] = float(indent)
    return {name: torch.tensor(vals[name], dtype=torch.float32) for name in FEATURES}


def pearson(acts: Tensor, feats: Tensor) -> Tensor:
    """Pearson correlation of every feature with every unit: acts (T, N), feats (T, F) -> (F, N).

    Computed in float64 in one matrix product. A constant column (a unit that
    never moves, or a feature absent from the text) has no correlation: 0.
    """
    a = acts.double()
    f = feats.double()
    a = a - a.mean(0, keepdim=True)
    f = f - f.mean(0, keepdim=True)
    a_norm = a.norm(dim=0)  # (N,)
    f_norm = f.norm(dim=0)  # (F,)
    cov = f.T @ a  # (F, N)
    denom = f_norm[:, None] * a_norm[None, :]
    eps = 1e-12
    r = torch.where(denom > eps, cov / denom.clamp_min(eps), torch.zeros_like(cov))
    return r.clamp(-1.0, 1.0)

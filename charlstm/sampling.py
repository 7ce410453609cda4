"""How the next character is drawn from the logits: temperature, top-k, nucleus or greedy.

Draws are Gumbel-max with seeded noise: with q_i ~ Exp(1), argmax (l_i / T - log q_i) is i with
probability softmax(l / T)_i, torch.multinomial's distribution, in an add and an argmax per
character once a chunk's noise is drawn. The same seed gives the same text on the same machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import UsageError


@dataclass
class SamplingOptions:
    """How the next character is chosen from the logits."""

    temperature: float = 1.0     # divide the logits by this (> 0); lower is more conservative
    top_k: int = 0               # keep only the K most likely characters (0: all)
    top_p: float = 1.0           # keep the smallest set whose probability reaches P (1: all)
    greedy: bool = False         # always the most likely character (the options above are ignored)

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise UsageError(f"--temperature must be > 0 (got {self.temperature}); "
                             "use --greedy for the most likely character")
        if self.top_k is None:
            self.top_k = 0
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 1 (got {self.top_k})")
        if self.top_p is None:
            self.top_p = 1.0
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")
        self.temperature = float(self.temperature)
        self.top_k = int(self.top_k)
        self.top_p = float(self.top_p)


def gumbel_noise(n: int, B: int, V: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Noise for n draws of B streams from V characters: (n, B, V) float32, -log of Exp(1) variates.

    Drawn once per chunk of characters, so that each step adds it and takes an argmax (two operations
    instead of a softmax and a fresh draw)."""
    q = torch.empty(n, B, V, device=device).exponential_(1.0, generator=generator)
    return q.clamp_min_(1e-30).log_().neg_()


def choose(logits: Tensor, temperature: float, top_k: int, top_p: float, greedy: bool,
            noise: Tensor | None) -> Tensor:
    """The next character of each stream: logits (B, V) and its row of `gumbel_noise` -> ids (B,) long.

    The Gumbel-max draw: with q_i ~ Exp(1), argmax (l_i / T - log q_i) is i with probability
    softmax(l / T)_i, the distribution torch.multinomial draws from (the same race as argmax p_i / q_i,
    taken in logs, so the softmax is never needed)."""
    if greedy or noise is None:
        return logits.argmax(1)
    V = logits.size(1)
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, 1).values[:, -1:]                    # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(logits / temperature, 1)                       # (B, V)
        sorted_p, order = probs.sort(1, descending=True)
        before = sorted_p.cumsum(1) - sorted_p                               # mass of the likelier ones
        drop = torch.zeros_like(probs).scatter(1, order, (before >= top_p).to(probs.dtype))   # the likeliest stays
        logits = logits.masked_fill(drop > 0, float("-inf"))
    return torch.add(noise, logits, alpha=1.0 / temperature).argmax(1)


def choose_next(logits: Tensor, temperature: float, top_k: int, top_p: float, greedy: bool,
                generator: torch.Generator | None) -> Tensor:
    """The next character of each stream: logits (B, V) -> ids (B,) long, drawn with `generator`."""
    noise = None if greedy else gumbel_noise(1, logits.size(0), logits.size(1), generator, logits.device)[0]
    return choose(logits, temperature, top_k, top_p, greedy, noise)

"""Scoring a model on a split: mean cross-entropy with the state carried (or windowed), and the
short samples the trainer prints at each evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import console
from .batches import eval_windows
from .errors import CharlstmError
from .model import detach_state

PROGRESS_MIN_CHARS = 200_000    # no progress bar for evaluations shorter than this
SLOW_EVAL_SECONDS = 30.0        # an evaluation of the whole split longer than this gets a note
TARGET_EVAL_SECONDS = 5.0       # what the note's suggested --eval-chars aims at


def eval_slice(tokens: torch.Tensor, eval_chars: int) -> torch.Tensor:
    """The part of a split that ``--eval-chars N`` scores: its first N + 1 tokens (N targets, the
    same every time so that figures stay comparable); all of it for 0 or an N past its end."""
    if eval_chars and eval_chars + 1 < tokens.numel():
        return tokens[:eval_chars + 1]
    return tokens


def slow_eval_note(seconds: float, chars: int, eval_chars: int) -> str | None:
    """The note a trainer prints when scoring the whole validation split took long (None otherwise):
    how long, and the --eval-chars that would take about TARGET_EVAL_SECONDS."""
    if eval_chars or seconds < SLOW_EVAL_SECONDS or chars <= 0:
        return None
    suggest = max(1000, int(chars * TARGET_EVAL_SECONDS / seconds) // 1000 * 1000)
    return (f"note: scoring the whole validation split ({chars:,} characters) took {seconds:.0f} s; "
            f"--eval-chars {suggest} would score its first {suggest:,} characters in about "
            f"{TARGET_EVAL_SECONDS:.0f} s (the same characters at every evaluation)")


def _progress_bar(tokens: torch.Tensor, enabled: bool, desc: str):
    """Progress over the characters scored (console.progress: a bar, or plain lines in a log), for long
    evaluations only."""
    n = tokens.numel() - 1
    return console.progress(n, desc=desc, unit="chars", unit_scale=True, enabled=enabled and n >= PROGRESS_MIN_CHARS)


def evaluate_loss(model, tokens: torch.Tensor, *, batch_size: int, seq_len: int, device,
                  carry_state: bool = True, token_map: torch.Tensor | None = None,
                  progress: bool = False, desc: str = "evaluating") -> tuple[float, int]:
    """Mean cross-entropy in nats/char over the whole of ``tokens`` and the number of chars scored.

    ``batch_size`` streams run in parallel and each window starts from the
    previous window's final state (``carry_state=False`` starts every window
    from zeros instead: the windowed protocol). ``token_map`` (V_corpus,) long
    translates the ids into the model's vocabulary (a run --init-from another
    model). ``progress``: progress on stderr when the text is long (a bar on a
    terminal, plain lines in a log). The model's training mode and the global RNG are left as they were.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    state = None
    bar = _progress_bar(tokens, progress, desc)
    try:
        with torch.no_grad(), bar:
            for x, y, mask in eval_windows(tokens, batch_size, seq_len, token_map=token_map):
                x, y, mask = x.to(device), y.to(device), mask.to(device)
                if not carry_state or state is None or state.h.shape[1] != x.shape[1]:
                    state = None
                logits, state = model(x, state)                          # (T, B, V)
                state = detach_state(state)
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                      reduction="none")                  # (T*B,)
                m = mask.reshape(-1)
                total += nll[m].double().sum().cpu()
                count += int(m.sum())
                bar.update(int(m.sum()))
    finally:
        model.train(was_training)
    if count == 0:
        raise CharlstmError("the evaluation split is empty: nothing to evaluate")
    return float(total / count), count


def sample_text(model, vocab, length: int, *, device, seed: int, temperature: float = 0.8,
                prime: str = "\n") -> str:
    """A short sample for the progress display, drawn with its own generator (global RNG untouched)."""
    if length <= 0:
        return ""
    gen = torch.Generator().manual_seed(seed)
    prime = "".join(c for c in prime if c in vocab.stoi) or vocab.chars[0]
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            idx = torch.tensor([[vocab.stoi[c]] for c in prime], dtype=torch.long, device=device)  # (T, 1)
            logits, state = model(idx)
            for _ in range(length):
                probs = torch.softmax(logits[-1, 0].float() / temperature, dim=-1).cpu()  # (V,)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
                out.append(nxt)
                logits, state = model(torch.tensor([[nxt]], dtype=torch.long, device=device), state)
    finally:
        model.train(was_training)
    return vocab.decode(out)

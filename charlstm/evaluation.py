"""Scoring a model on a split: mean cross-entropy with the state carried (or windowed), and the
short samples the trainer prints at each evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batches import eval_windows
from .errors import CharlstmError
from .model import detach_state


def evaluate_loss(model, tokens: torch.Tensor, *, batch_size: int, seq_len: int, device,
                  carry_state: bool = True, token_map: torch.Tensor | None = None) -> tuple[float, int]:
    """Mean cross-entropy in nats/char over the whole of ``tokens`` and the number of chars scored.

    ``batch_size`` streams run in parallel and each window starts from the
    previous window's final state (``carry_state=False`` starts every window
    from zeros instead: the windowed protocol). ``token_map`` (V_corpus,) long
    translates the ids into the model's vocabulary (a run --init-from another
    model). The model's training mode and the global RNG are left as they were.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    state = None
    try:
        with torch.no_grad():
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

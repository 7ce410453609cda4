"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals, ICML 2018): score a text segment by
segment, and after scoring each segment take one gradient step on it, so that the model adapts to
the text it is reading.

It is a different protocol from the static figure of :func:`charlstm.evaluation.evaluate_loss`
and is reported beside it, never instead of it; it reads the same windows of the same streams
(state carried), so the two figures are comparable. The model passed in is not changed: the steps
go to a copy. docs/dynamic-eval.md describes the protocol and the update rules.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from .batches import eval_windows
from .config import DynamicConfig
from .errors import CharlstmError, UsageError
from .model import detach_state

RULES = ("rms", "sgd")

DEFAULTS = DynamicConfig()   # config.py holds the defaults and where they come from
STAT_BATCH_SIZE = 100       # streams of the training-gradient statistics (Krause et al.'s --batch_size)


def _check(rule: str, lr: float, decay: float, epsilon: float) -> None:
    if rule not in RULES:
        raise UsageError(f"the dynamic evaluation rule must be one of {', '.join(RULES)} (got {rule!r})")
    for name, value in (("learning rate", lr), ("decay", decay), ("epsilon", epsilon)):
        if not value >= 0:
            raise UsageError(f"the dynamic evaluation {name} must be >= 0 (got {value})")


def adaptable_copy(model, device) -> torch.nn.Module:
    """A copy of ``model`` on ``device`` to take gradients through while it scores: evaluation mode
    (no dropout), except that PyTorch's recurrent modules (nn.LSTM, nn.GRU, nn.RNN) are put in
    training mode with their dropout at 0, which computes the same and which cuDNN needs: its
    kernels refuse a backward in evaluation mode ("cudnn RNN backward can only be called in
    training mode", seen on an H200)."""
    copied = copy.deepcopy(model).to(device).eval()
    for module in copied.modules():
        if isinstance(module, torch.nn.RNNBase):
            module.dropout = 0.0
            module.train()
    return copied


def _segment_loss(model, x, y, mask, state):
    """The per-character losses (T*B,) float32, the mask (T*B,) and the final state of one window."""
    logits, state = model(x, state)                                       # (T, B, V)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return nll, mask.reshape(-1), detach_state(state)


def gradient_rms(model, tokens: Tensor, *, batch_size: int = STAT_BATCH_SIZE, seq_len: int = DEFAULTS.segment,
                 max_segments: int | None = None, device="cpu",
                 token_map: Tensor | None = None) -> list[Tensor]:
    """The RMS rule's statistics: per parameter (in ``model.parameters()`` order), the root mean
    square over training segments of the gradient of each segment's mean loss, the state carried
    across segments (``tokens`` from the training split). The model is not changed."""
    work = adaptable_copy(model, device)
    params = [p.requires_grad_(True) for p in work.parameters()]
    sums = [torch.zeros_like(p) for p in params]
    n, state = 0, None
    for x, y, mask in eval_windows(tokens, batch_size, seq_len, split="train", token_map=token_map):
        if max_segments is not None and n >= max_segments:
            break
        nll, m, state = _segment_loss(work, x.to(device), y.to(device), mask.to(device), state)
        grads = torch.autograd.grad(nll[m].mean(), params, allow_unused=True)
        for s, g in zip(sums, grads):
            if g is not None:
                s.addcmul_(g, g)
        n += 1
    if n == 0:
        raise CharlstmError("no training segment to measure the gradients on")
    return [s.div_(n).sqrt_() for s in sums]


class _Step:
    """One dynamic-evaluation step on every parameter, from the trained weights theta0:

    sgd: theta <- theta - lr * g + decay * (theta0 - theta)
    rms: theta <- theta - lr * g / (rms + eps) + min(1, decay * rms / mean(rms)) * (theta0 - theta)

    where mean(rms) is over every weight of the model (Krause et al. 2018, section 5)."""

    def __init__(self, params: list[Tensor], rule: str, lr: float, decay: float, epsilon: float,
                 grad_rms: list[Tensor] | None):
        self.params, self.lr = params, lr
        self.theta0 = [p.detach().clone() for p in params]
        if rule == "sgd":
            self.scale = [None] * len(params)                            # g as it is
            self.rate = [decay] * len(params)
        else:
            rms = [r.to(p) for r, p in zip(grad_rms, params)]
            mean = sum(r.sum() for r in rms) / sum(r.numel() for r in rms)
            self.scale = [1.0 / (r + epsilon) for r in rms]
            self.rate = [(decay * r / mean).clamp_(max=1.0) if mean > 0 else torch.zeros_like(r) for r in rms]

    @torch.no_grad()
    def __call__(self, grads) -> None:
        for p, p0, g, scale, rate in zip(self.params, self.theta0, grads, self.scale, self.rate):
            delta = (p0 - p).mul_(rate)                                  # towards the trained weights
            if g is not None:
                delta.add_(g if scale is None else g * scale, alpha=-self.lr)
            p.add_(delta)


def dynamic_evaluate(model, tokens: Tensor, *, batch_size: int, seq_len: int, lr: float, decay: float,
                     rule: str = DEFAULTS.rule, epsilon: float = DEFAULTS.epsilon, grad_rms: list[Tensor] | None = None,
                     device="cpu", token_map: Tensor | None = None) -> tuple[float, int]:
    """Mean cross-entropy in nats/char over the whole of ``tokens`` under dynamic evaluation, and the
    number of characters scored.

    The windows and streams are evaluate_loss's with the state carried (``batch_size`` streams,
    ``seq_len`` characters a segment); each window is scored by the current weights, then a copy
    of the model takes one step (see ``_Step``; ``rule`` 'rms' needs ``grad_rms``, from
    :func:`gradient_rms` on the training split) on that window's mean loss. ``lr = 0`` gives
    evaluate_loss's figure. The model passed in, its mode and the global RNG are left as they were.
    """
    _check(rule, lr, decay, epsilon)
    if rule == "rms" and grad_rms is None:
        raise UsageError("the rms rule needs the training gradients' statistics (grad_rms, from gradient_rms)")
    work = adaptable_copy(model, device)
    params = [p.requires_grad_(True) for p in work.parameters()]
    if grad_rms is not None and [r.shape for r in grad_rms] != [p.shape for p in params]:
        raise UsageError("grad_rms does not match the model's parameters")
    step = _Step(params, rule, lr, decay, epsilon, grad_rms)
    total = torch.zeros((), dtype=torch.float64)
    count, state = 0, None
    for x, y, mask in eval_windows(tokens, batch_size, seq_len, token_map=token_map):
        nll, m, state = _segment_loss(work, x.to(device), y.to(device), mask.to(device), state)
        scored = nll[m]
        total += scored.detach().double().sum().cpu()
        count += int(m.sum())
        step(torch.autograd.grad(scored.mean(), params, allow_unused=True))
    if count == 0:
        raise CharlstmError("the evaluation split is empty: nothing to evaluate")
    return float(total / count), count

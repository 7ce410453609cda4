"""Optimisation shared by every training loop: AdamW's parameter groups, the learning-rate schedule,
budgets, and the one optimisation step (forward, cross-entropy, backward, clipping, optimizer step)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .config import TrainConfig

_NO_DECAY_MODULES = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, embeddings or norms)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, _NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)


def adamw(params, **options) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel over all parameters where this torch and device have one
    (CPU since torch 2.4): a step of the 2.5M parameters of the shakespeare preset takes 0.9 ms
    fused against 6.8 ms looped on the development CPU (docs/performance.md). A checkpoint's
    optimizer state loads into either; what it was saved with (fused or not) comes back with it."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):     # no fused AdamW for this torch or device
        return torch.optim.AdamW(params, **options)


def budget_fraction(cfg: TrainConfig, step: int, epochs: float, elapsed: float) -> float:
    """How much of the budget is used, 0..1+: the largest of steps, epochs and time used."""
    parts = []
    if cfg.max_steps:
        parts.append(step / cfg.max_steps)
    if cfg.max_epochs:
        parts.append(epochs / cfg.max_epochs)
    if cfg.max_time:
        parts.append(elapsed / cfg.max_time)
    return max(parts) if parts else 0.0


def which_budget(cfg: TrainConfig, step: int, epochs: float, elapsed: float) -> str:
    """The budget that ran out: max_steps, max_epochs or max_time (the first of them that is used up)."""
    for name, used in (("max_steps", step / cfg.max_steps if cfg.max_steps else 0),
                       ("max_epochs", epochs / cfg.max_epochs if cfg.max_epochs else 0),
                       ("max_time", elapsed / cfg.max_time if cfg.max_time else 0)):
        if used >= 1.0:
            return name
    return "budget"


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) at budget fraction ``progress``.

    Every schedule starts with a linear warmup over ``warmup`` steps. cosine
    then decays from ``lr`` to ``lr * min_lr_frac`` over the budget (steps,
    epochs or time, whichever runs out first); step multiplies by
    ``lr_decay`` every ``lr_decay_every`` steps; constant stays.
    """
    ramp = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    if cfg.schedule == "constant":
        factor = 1.0
    elif cfg.schedule == "step":
        factor = cfg.lr_decay ** (step // cfg.lr_decay_every)
    else:
        p = min(max(progress, 0.0), 1.0)
        floor = cfg.min_lr_frac
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lr * ramp * factor


class Diverged(Exception):
    """The loss or the gradient norm of a step was not finite (raised before the optimizer stepped)."""


class StepOutcome(NamedTuple):
    """What one optimisation step gives back."""

    loss: torch.Tensor           # the mean cross-entropy of this process's targets (a 0-d tensor)
    loss_value: float | None     # the checked float (see optimisation_step's ``check_finite``), else None
    grad_norm: float | None      # the global gradient norm before clipping, when it was checked
    state: Any                   # the model's final state (the next window's initial state, not detached)


def optimisation_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                      state=None, clip: float = 0.0, check_finite: bool = False,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      reduce: Callable[[torch.Tensor], float] | None = None) -> StepOutcome:
    """One optimisation step on a batch: forward, cross-entropy, backward, clipping, the optimizer's step.

    ``x`` (T, B) long; ``y`` (T, B) targets at every position, or (B,) for
    the last position only (the long-gap task). ``state`` is the initial
    state (None: zeros). The loss is computed in float32 whatever ``autocast``
    runs the forward in. ``clip`` > 0 clips the global gradient norm to it.

    ``check_finite`` raises :class:`Diverged` when the loss (as ``reduce``
    turns it into a float: the mean over processes under torchrun; default
    ``loss.item()``) or the gradient norm is NaN or infinite, before the
    optimizer steps, so the weights stay those of the last good step. It costs
    a device synchronisation; without it nothing is read back.
    """
    with autocast():
        logits, new_state = net(x, state)                                    # (T, B, V)
    if y.dim() == 1:
        logits, targets = logits[-1], y                                      # (B, V), (B,)
    else:
        logits, targets = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)  # (T*B, V), (T*B,)
    loss = F.cross_entropy(logits.float(), targets)
    value = None
    if check_finite:
        value = reduce(loss) if reduce is not None else float(loss.item())
        if not math.isfinite(value):
            raise Diverged(f"the training loss became {value}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if check_finite or clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip > 0 else float("inf"))
        if check_finite:
            grad_norm = float(norm)
            if not math.isfinite(grad_norm):
                raise Diverged(f"the gradient norm became {grad_norm}")
    optimizer.step()
    return StepOutcome(loss, value, grad_norm, new_state)

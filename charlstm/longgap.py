"""The long-gap recall task: can a cell carry one symbol across G distractors? The sequences
(a pure function of the seed), the recall evaluation, and a training run on fresh sequences.
See docs/compare.md, "The long-gap task".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import console
from .config import ModelConfig
from .errors import UsageError
from .model import build_model
from .optim import optimisation_step
from .runtime import resolve_device

KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DISTRACTOR_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MARKER = "?"

# Offsets that separate the training and held-out streams of one seed.
_TRAIN_STREAM = 0
_EVAL_STREAM = 7_919


@dataclass(frozen=True)
class LongGapTask:
    """One gap length of the recall task: its alphabet and its sequences."""

    gap: int                 # G, distractors between the key and the marker
    num_keys: int = 8        # K, keys to choose from (chance = 1/K)
    num_distractors: int = 8  # D, distinct distractor characters

    def __post_init__(self) -> None:
        if self.gap < 0:
            raise UsageError(f"--gaps must be >= 0 (got {self.gap})")
        if not 2 <= self.num_keys <= len(KEY_ALPHABET):
            raise UsageError(f"--keys must be between 2 and {len(KEY_ALPHABET)} (got {self.num_keys})")
        if not 1 <= self.num_distractors <= len(DISTRACTOR_ALPHABET):
            raise UsageError(
                f"--distractors must be between 1 and {len(DISTRACTOR_ALPHABET)} (got {self.num_distractors})"
            )

    @property
    def keys(self) -> str:
        return KEY_ALPHABET[: self.num_keys]

    @property
    def distractors(self) -> str:
        return DISTRACTOR_ALPHABET[: self.num_distractors]

    @property
    def chars(self) -> list[str]:
        """The vocabulary, sorted by code point (as ``corpus.Vocab`` orders characters)."""
        return sorted(self.keys + self.distractors + MARKER)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def seq_len(self) -> int:
        """Length of one sequence: key, G distractors, marker."""
        return self.gap + 2

    @property
    def chance(self) -> float:
        return 1.0 / self.num_keys

    def _ids(self, alphabet: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in alphabet], dtype=torch.long)

    @property
    def key_ids(self) -> torch.Tensor:
        return self._ids(self.keys)  # (K,)

    @property
    def distractor_ids(self) -> torch.Tensor:
        return self._ids(self.distractors)  # (D,)

    @property
    def marker_id(self) -> int:
        return self.chars.index(MARKER)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n sequences: inputs (G+2, n) long and the key to recall at the last step, (n,) long."""
        key_pick = torch.randint(self.num_keys, (n,), generator=generator)  # (n,)
        distractor_pick = torch.randint(self.num_distractors, (self.gap, n), generator=generator)  # (G, n)
        keys = self.key_ids[key_pick]  # (n,)
        x = torch.empty(self.seq_len, n, dtype=torch.long)  # (G+2, n)
        x[0] = keys
        x[1 : self.gap + 1] = self.distractor_ids[distractor_pick]
        x[self.gap + 1] = self.marker_id
        return x, keys

    def decode(self, column: torch.Tensor) -> str:
        """The text of one sequence (a column of ``sample``'s inputs)."""
        return "".join(self.chars[int(i)] for i in column)

    def train_generator(self, seed: int) -> torch.Generator:
        """The stream that training batches are drawn from."""
        return torch.Generator().manual_seed(seed * 1_000_003 + self.gap * 101 + _TRAIN_STREAM)

    def eval_set(self, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out sequences for this seed: (G+2, n) inputs and (n,) keys, always the same."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + self.gap * 101 + _EVAL_STREAM)
        return self.sample(n, g)


@dataclass
class LongGapResult:
    """What one training run on the task measured (stored as result.json)."""

    accuracy: float               # recall accuracy on the held-out set at the end
    best_accuracy: float          # best accuracy seen at any evaluation
    final_loss: float             # cross-entropy at the recall position (nats), held-out, at the end
    steps: int                    # optimizer steps taken
    wall_time: float              # seconds of training (evaluations included)
    params: int                   # trainable parameters of the model
    chance: float                 # 1/K
    curve: list[dict] = field(default_factory=list)  # [{step, time, accuracy, loss}] at each evaluation

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "best_accuracy": self.best_accuracy,
            "final_loss": self.final_loss,
            "steps": self.steps,
            "wall_time": self.wall_time,
            "params": self.params,
            "chance": self.chance,
            "curve": self.curve,
        }


def recall_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits at the recall position (the marker): (B, V) from inputs (T, B)."""
    logits, _ = model(x)  # (T, B, V)
    return logits[-1]  # (B, V)


@torch.no_grad()
def evaluate_recall(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> tuple[float, float]:
    """Accuracy (argmax over the whole vocabulary) and mean loss at the recall position."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, y.numel(), batch_size):
        xb = x[:, start : start + batch_size].to(device)  # (T, b)
        yb = y[start : start + batch_size].to(device)  # (b,)
        logits = recall_logits(model, xb).float()  # (b, V)
        correct += int((logits.argmax(-1) == yb).sum())
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    return correct / y.numel(), loss_sum / y.numel()


def train_long_gap(task: LongGapTask, model_cfg: ModelConfig, *, seed: int = 1, max_steps: int | None = 1000,
                   max_time: float | None = None, batch_size: int = 32, lr: float = 3e-3, clip: float = 1.0,
                   eval_size: int = 1000, eval_every: int = 100, device: str = "cpu", progress: bool = False,
                   desc: str | None = None) -> tuple[LongGapResult, torch.nn.Module]:
    """Train a fresh model on the task under a step and/or time budget; return its result and the model.

    Each step is :func:`charlstm.optim.optimisation_step`, the trainer's, with
    the loss at the recall position only (the distractors are random and carry
    nothing to learn) and Adam at a constant learning rate, gradients clipped
    to ``clip`` (0: no clipping). What it does not share with the trainer: no
    carried state (every sequence starts from zeros and is one window) and no
    NaN check (a diverged run shows as chance accuracy in the results, it does
    not stop the comparison).
    """
    _check_run(task, model_cfg, max_steps, max_time)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = build_model(model_cfg, dev).to(dev)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = task.train_generator(seed)
    x_eval, y_eval = task.eval_set(seed, eval_size)
    bar = console.progress(max_steps, desc=desc or f"{model_cfg.variant} gap {task.gap}", unit="steps",
                           enabled=progress) if progress else None
    curve: list[dict] = []
    step = 0
    start = time.perf_counter()
    while not ((max_steps is not None and step >= max_steps)
               or (max_time is not None and time.perf_counter() - start >= max_time)):
        x, y = task.sample(batch_size, gen)                                  # (T, B), (B,)
        out = optimisation_step(model, optimizer, x.to(dev), y.to(dev), clip=clip)
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{out.loss.item():.3f}")
        if step % eval_every == 0:
            curve.append(_curve_point(model, x_eval, y_eval, step, start))
    train_time = time.perf_counter() - start
    if not curve or curve[-1]["step"] != step:
        curve.append(_curve_point(model, x_eval, y_eval, step, start))
    if bar is not None:
        bar.close()
    return _result(task, curve, step, train_time, model), model


def _check_run(task: LongGapTask, model_cfg: ModelConfig, max_steps: int | None, max_time: float | None) -> None:
    """A budget is given and the model reads the task's symbols (UsageError otherwise)."""
    if max_steps is None and max_time is None:
        raise UsageError("the long-gap task needs a budget: --max-steps and/or --max-time")
    if model_cfg.vocab_size != task.vocab_size:
        raise UsageError(f"model vocab_size {model_cfg.vocab_size} does not match the task's {task.vocab_size}")


def _result(task: LongGapTask, curve: list[dict], steps: int, train_time: float, model) -> LongGapResult:
    """The run's result from its evaluation curve (the last point is the final model's)."""
    final = curve[-1]
    return LongGapResult(accuracy=final["accuracy"], best_accuracy=max(c["accuracy"] for c in curve),
                         final_loss=final["loss"], steps=steps, wall_time=train_time, params=model.num_parameters(),
                         chance=task.chance, curve=curve)


def _curve_point(model, x_eval: torch.Tensor, y_eval: torch.Tensor, step: int, start: float) -> dict:
    """An evaluation on the held-out set: {step, time (seconds since ``start``, evaluation included),
    accuracy, loss}."""
    acc, loss = evaluate_recall(model, x_eval, y_eval)
    return {"step": step, "time": time.perf_counter() - start, "accuracy": acc, "loss": loss}

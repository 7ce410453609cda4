"""The long-gap recall task: can a cell carry one symbol across G distractors?

Each sequence is ``key, d_1 ... d_G, ?``: a key drawn from K keys (upper-case
letters), G distractor characters drawn from a separate alphabet (lower-case
letters), and a recall marker. At the marker the model must output the key,
so the only information it needs crossed the whole gap. Chance is 1/K.

This is the seed essay's claim made testable: a vanilla RNN's gradient through
G steps of ``tanh`` shrinks geometrically, while the LSTM family's additive
cell path (and the GRU's interpolation) can keep it.

Sequences are a pure function of the seed (``torch.Generator``), training
draws fresh sequences at every step, and accuracy is measured on a held-out
set drawn from a different stream of the same seed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import UsageError
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


def train_long_gap(
    task: LongGapTask,
    model_cfg: ModelConfig,
    *,
    seed: int = 1,
    max_steps: int | None = 1000,
    max_time: float | None = None,
    batch_size: int = 32,
    lr: float = 3e-3,
    clip: float = 1.0,
    eval_size: int = 1000,
    eval_every: int = 100,
    device: str = "cpu",
    progress: bool = False,
    desc: str | None = None,
) -> tuple[LongGapResult, torch.nn.Module]:
    """Train a fresh model on the task under a step and/or time budget; return its result and the model.

    The loss is the cross-entropy at the recall position only (the distractors
    are random and carry nothing to learn). Adam at a constant learning rate,
    gradients clipped to ``clip`` (0: no clipping).
    """
    from .model import build_model  # imported here so that the generator works without a model

    if max_steps is None and max_time is None:
        raise UsageError("the long-gap task needs a budget: --max-steps and/or --max-time")
    if model_cfg.vocab_size != task.vocab_size:
        raise UsageError(f"model vocab_size {model_cfg.vocab_size} does not match the task's {task.vocab_size}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = build_model(model_cfg).to(dev)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = task.train_generator(seed)
    x_eval, y_eval = task.eval_set(seed, eval_size)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, desc=desc or f"{model_cfg.variant} gap {task.gap}", unit="step", leave=False,
                   file=sys.stderr, dynamic_ncols=True)

    curve: list[dict] = []
    best = 0.0
    step = 0
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if (max_steps is not None and step >= max_steps) or (max_time is not None and elapsed >= max_time):
            break
        x, y = task.sample(batch_size, gen)  # (T, B), (B,)
        logits = recall_logits(model, x.to(dev))  # (B, V)
        loss = F.cross_entropy(logits.float(), y.to(dev))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % eval_every == 0:
            acc, eval_loss = evaluate_recall(model, x_eval, y_eval)
            best = max(best, acc)
            curve.append({"step": step, "time": time.perf_counter() - start, "accuracy": acc, "loss": eval_loss})
    train_time = time.perf_counter() - start
    if not curve or curve[-1]["step"] != step:
        acc, eval_loss = evaluate_recall(model, x_eval, y_eval)
        best = max(best, acc)
        curve.append({"step": step, "time": time.perf_counter() - start, "accuracy": acc, "loss": eval_loss})
    if bar is not None:
        bar.close()
    final = curve[-1]
    return LongGapResult(
        accuracy=final["accuracy"],
        best_accuracy=best,
        final_loss=final["loss"],
        steps=step,
        wall_time=train_time,
        params=model.num_parameters(),
        chance=task.chance,
        curve=curve,
    ), model

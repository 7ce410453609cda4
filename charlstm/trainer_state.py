"""The trainer state of a checkpoint (trainer_state.json and trainer_state.safetensors): what resumes
a run exactly beside the weights and the optimizer, and the RNG states it carries."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from .model import State

LN2 = math.log(2.0)


@dataclass
class TrainerState:
    """What resumes a run exactly, beside the weights and the optimizer: the trainer_state files.

    :meth:`to_dict` and :meth:`from_dict` are the only writer and reader of
    that dict (checkpoint.save_checkpoint puts its tensors in
    trainer_state.safetensors, the rest in trainer_state.json). The keys are
    those of format version 1: step, epoch, epochs_done, batcher, hidden {h, c},
    rng, rng_ranks and world_size (under torchrun), best_val_loss, best_step,
    val_loss, train_time, chars_seen, and metrics (a summary for readers).
    """

    step: int = 0
    epoch: int = 0
    epochs_done: float = 0.0
    batcher: dict | None = None          # StreamBatcher.state_dict(): the global data position
    carried: State | None = None         # the full carried state, (L, B, H) float32 on the CPU ('hidden' on disk)
    rng: dict | None = None              # rank 0's RNG states
    rng_ranks: list[dict] | None = None  # every process's RNG states (under torchrun)
    world_size: int | None = None        # processes that wrote it (under torchrun)
    best_val_loss: float | None = None
    best_step: int | None = None
    val_loss: float | None = None        # the last evaluation's
    train_time: float = 0.0              # seconds of training steps so far (the budget's clock)
    chars_seen: int = 0
    train_loss: float | None = None      # the last step's loss (metrics only)
    params: int | None = None            # trainable parameters (metrics only)

    def to_dict(self) -> dict:
        """The on-disk form (tensors stay tensors; checkpoint.save_checkpoint files them)."""
        carried = None if self.carried is None else {"h": self.carried.h, "c": self.carried.c}
        torchrun = {"rng_ranks": self.rng_ranks, "world_size": self.world_size} if self.world_size is not None else {}
        return {
            "step": self.step, "epoch": self.epoch, "epochs_done": self.epochs_done, "batcher": self.batcher,
            "hidden": carried, "rng": self.rng, **torchrun,
            "best_val_loss": self.best_val_loss, "best_step": self.best_step, "val_loss": self.val_loss,
            "train_time": self.train_time, "chars_seen": self.chars_seen, "metrics": self.metrics(),
        }

    def metrics(self) -> dict:
        """The summary readers show (charlstm info, eval, compare-variants)."""
        val, best = self.val_loss, self.best_val_loss
        return {
            "step": self.step, "epochs": self.epochs_done, "train_loss": self.train_loss, "val_loss": val,
            "val_bpc": None if val is None else val / LN2,
            "best_val_loss": best, "best_val_bpc": None if best is None else best / LN2,
            "best_step": self.best_step, "train_time": self.train_time, "params": self.params,
            "chars_per_sec": self.chars_seen / self.train_time if self.train_time > 0 else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TrainerState:
        """Read the on-disk form (as checkpoint.load_trainer_state returns it); keys added after
        the first checkpoints may be missing."""
        carried = d.get("hidden")
        metrics = d.get("metrics") or {}
        return cls(
            step=int(d["step"]), epoch=d.get("epoch", 0), epochs_done=d.get("epochs_done", 0.0),
            batcher=d["batcher"], carried=None if carried is None else State(carried["h"], carried.get("c")),
            rng=d["rng"], rng_ranks=d.get("rng_ranks"), world_size=d.get("world_size"),
            best_val_loss=d.get("best_val_loss"), best_step=d.get("best_step"), val_loss=d.get("val_loss"),
            train_time=float(d.get("train_time", 0.0)), chars_seen=int(d.get("chars_seen", 0)),
            train_loss=metrics.get("train_loss"), params=metrics.get("params"),
        )


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: torch's CPU (and CUDA) generator and Python's."""
    st = random.getstate()
    state = {"torch_cpu": torch.get_rng_state(), "python": [st[0], list(st[1]), st[2]]}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put back what :func:`rng_state` took."""
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"].to(torch.uint8), device)

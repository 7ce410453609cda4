"""The Trainer: one training run (truncated BPTT over contiguous streams, AdamW, schedules, budgets,
evaluation, checkpoints that resume bit for bit), and the Observer hooks on which what is shown
and logged hangs (observers.py). See docs/training.md."""

from __future__ import annotations

import functools
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_mod
from . import distributed as dist_mod
from .config import TrainConfig
from .console import note
from .errors import CharlstmError
from .evaluation import evaluate_loss, sample_text, slow_eval_note
from .model import State, describe_backend, detach_state
from .optim import Diverged, budget_fraction, learning_rate, optimisation_step, which_budget
from .trainer_setup import TrainerSetup


def reset_streams(state: State, cfg: TrainConfig, step: int, streams: range) -> State:
    """The carried state with each stream's zeroed with probability ``cfg.state_reset`` (--state-reset),
    so that the model also learns to start from nothing, as windowed evaluation starts every window.
    The draw depends only on the seed and the step, for the whole batch of cfg.batch_size streams
    (this process's share is ``streams``): a resumed run and any number of processes draw alike."""
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) % 2**63)
    keep = torch.rand(cfg.batch_size, generator=gen) >= cfg.state_reset                 # (B,)
    keep = keep[streams.start:streams.stop].to(device=state.h.device, dtype=state.h.dtype).view(1, -1, 1)
    return State(state.h * keep, None if state.c is None else state.c * keep)


@dataclass
class TrainResult:
    """What a training run did (also shown in the summary)."""

    run_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    steps: int
    epochs: float
    train_loss: float | None
    val_loss: float | None            # at the end, nats/char, state carried over the whole split
    best_val_loss: float | None
    params: int
    train_time: float                 # seconds spent in training steps (the budget's clock)
    wall_time: float                  # seconds of this invocation, evaluation and saving included
    chars_per_sec: float
    stopped_by: str                   # max_steps | max_epochs | max_time | interrupted | already_done
    interrupted: bool = False
    signal: int | None = None         # the signal that interrupted it (SIGINT, SIGTERM)
    layers_run_by: str = ""           # what ran the recurrent layers (model.describe_backend)

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal for an interrupted run (130 for Ctrl-C), as shells report it."""
        return 128 + (self.signal or signal.SIGINT) if self.interrupted else 0


@dataclass
class Evaluation:
    """One evaluation on the validation split (what on_eval observers receive)."""

    step: int
    loss: float                       # nats/char over the whole split, state carried
    chars: int                        # characters scored
    sample: str                       # the sample drawn after it ('' with --sample-chars 0)
    improved: bool                    # a new best
    best_loss: float
    best_step: int


# --------------------------------------------------------------------------- observers

class Observer:
    """Follows a run; override the hooks you need (each does nothing here) and pass it to the Trainer.

    Order: on_start; after each step on_step, then on_eval and on_save when
    they happen; on_loop_end when the steps are over; the final on_eval and
    on_save; on_end with the result. A run that fails (diverged, aborted)
    calls on_loop_end and on_end(trainer, None). A run resumed after its
    budget ran out calls none.
    """

    def on_start(self, trainer: Trainer) -> None:
        """Before the first step of this invocation (setup done, any checkpoint restored)."""

    def on_step(self, trainer: Trainer) -> None:
        """After every optimisation step (``trainer.last_loss``, ``trainer.steps_done``...)."""

    def on_eval(self, trainer: Trainer, evaluation: Evaluation) -> None:
        """After every evaluation on the validation split."""

    def on_save(self, trainer: Trainer, checkpoint: Path, is_best: bool) -> None:
        """After every checkpoint written."""

    def on_loop_end(self, trainer: Trainer) -> None:
        """The steps are over (budget, signal or failure); the final evaluation and save follow."""

    def on_end(self, trainer: Trainer, result: TrainResult | None) -> None:
        """The run is over: its result, or None when it failed and an error follows."""


class StopFlag:
    """SIGINT/SIGTERM handler: the first Ctrl-C (or a kill) asks the loop to stop after the current
    step and save; a second one aborts at once without saving."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self, distributed: bool = False):
        self.requested = False
        self.signum: int | None = None
        self.distributed = distributed   # under torchrun: torchrun's copy of the signal does not abort
        self._first = 0.0
        self._old: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals keep their usual effect
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and self.distributed and (signum != signal.SIGINT or time.monotonic() - self._first < 2.0):
            # Ctrl-C reaches every process and torchrun, which passes it on to them (or sends
            # SIGTERM): that copy is the same request, not a second Ctrl-C.
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum, self._first = True, signum, time.monotonic()
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        note(f"\n{what}: stopping after this step and saving a checkpoint (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# --------------------------------------------------------------------------- the trainer

class Trainer(TrainerSetup):
    """One training run: set up on construction, then :meth:`run` (or :meth:`step`, :meth:`evaluate`,
    :meth:`save` one at a time). Knows nothing of which cell the model runs.

    ``resume`` continues the run holding that checkpoint exactly (its configs
    must be passed in: train.resume_configs), or with ``fork_to`` another
    directory, forks it there; ``init_from`` starts from a checkpoint's weights
    with a fresh optimizer; ``progress`` shows the corpus's loading bars. The
    run directory is locked (rundir.RunLock) from setup to the end of
    :meth:`run` (or :meth:`close`). Under torchrun every process builds a
    Trainer; rank 0 alone holds the lock, evaluates, writes and talks.
    """

    # ------------------------------------------------------------ what observers read

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def chars_per_sec(self) -> float | None:
        return self.chars_seen / self.train_time if self.train_time > 0 else None

    def budget_used(self) -> float:
        """The fraction of the budget used so far (see optim.budget_fraction)."""
        return budget_fraction(self.train_cfg, self.steps_done, self.epochs_done, self.train_time)

    def add_observer(self, observer) -> None:
        self.observers.append(observer)

    def _notify(self, event: str, *args) -> None:
        for observer in self.observers:
            hook = getattr(observer, event, None)
            if hook is not None:
                hook(self, *args)

    # ------------------------------------------------------------ step, evaluate, save, run

    def step(self, used: float | None = None) -> float:
        """One optimisation step on the next window, the learning rate at budget fraction ``used``
        (default :meth:`budget_used`); returns its loss (the mean over all processes' targets).
        optim.Diverged for a NaN or infinite loss or gradient norm."""
        t0 = self.clock()
        lr = learning_rate(self.train_cfg, self.steps_done, self.budget_used() if used is None else used)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y, starts_epoch = self.batcher.next_batch()
        if starts_epoch:
            self.carried = None                                                # zeros at each epoch start
        elif self.train_cfg.state_reset > 0 and self.carried is not None:
            self.carried = reset_streams(self.carried, self.train_cfg, self.steps_done, self.batcher.streams)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)  # (T, B/W)
        self.net.train()
        # The loss is the mean over this process's targets; DDP averages the gradients over the W
        # processes, which gives the gradient of the mean over all T x B targets.
        out = optimisation_step(self.net, self.optimizer, x, y, state=self.carried, clip=self.train_cfg.clip,
                                check_finite=True, autocast=self.autocast,
                                reduce=functools.partial(dist_mod.mean, ctx=self.ctx))
        self.carried = detach_state(out.state)                                 # the next window's initial state
        self.steps_done += 1
        self.chars_seen += self.chars_per_step
        self.train_time += self.clock() - t0
        self.last_loss = out.loss_value
        self.loss_ema = out.loss_value if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * out.loss_value
        self._notify("on_step")
        return out.loss_value

    def evaluate(self) -> Evaluation:
        """The loss on the whole validation split and a sample; keeps the best. Under torchrun rank 0
        evaluates and the others wait for its figures."""
        started = time.perf_counter()
        loss, chars, text = dist_mod.on_main(self._evaluate_here, self.ctx)
        if self.eval_step < 0 and self.ctx.is_main:       # the first evaluation: say so when it is slow
            slow = slow_eval_note(time.perf_counter() - started, chars, self.train_cfg.eval_chars)
            if slow:
                note(slow)
        improved = self.best_val_loss is None or loss < self.best_val_loss
        self.val_loss, self.eval_step = loss, self.steps_done
        if improved:
            self.best_val_loss, self.best_step = loss, self.steps_done
        evaluation = Evaluation(self.steps_done, loss, chars, text, improved, self.best_val_loss, self.best_step)
        self._notify("on_eval", evaluation)
        return evaluation

    def _evaluate_here(self) -> tuple[float, int, str]:
        cfg = self.train_cfg
        # training RNG untouched
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            loss, chars = evaluate_loss(self.model, self.val_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                        device=self.device, token_map=self.token_map,
                                        progress=self.progress and self.ctx.is_main)
            text = sample_text(self.model, self.vocab, cfg.sample_chars, device=self.device,
                               seed=cfg.seed + self.steps_done)
        return loss, chars, text

    def save(self, is_best: bool = False) -> Path:
        """Write checkpoint ckpt-<step> (rank 0 writes; under torchrun a collective, the others wait)."""
        self._write(is_best)
        self._notify("on_save", self.last_checkpoint, is_best)
        return self.last_checkpoint

    def run(self) -> TrainResult:
        """Train until a budget runs out or a signal asks to stop, evaluate and save at the end; the result.

        CharlstmError when the loss diverges (the last good checkpoint is kept)
        or a second Ctrl-C aborts without saving. The run directory's lock is
        released at the end.
        """
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> TrainResult:
        if self.resume_path is not None and self.budget_used() >= 1.0:
            return self._already_done()
        self._notify("on_start")
        try:
            with StopFlag(distributed=self.ctx.enabled) as stop:
                stopped_by = self._loop(stop)
        except Diverged as d:
            self._fail()
            raise CharlstmError(
                f"training diverged at step {self.steps_done + 1}: {d}; "
                f"{self._where('the last good checkpoint is', 'no checkpoint had been saved yet')}. "
                f"Try a lower --lr (now {self.train_cfg.lr:g}) or a smaller --clip") from None
        except KeyboardInterrupt:
            self._fail()
            raise CharlstmError(f"aborted at step {self.steps_done} without saving; "
                                f"{self._where('the last checkpoint is', 'nothing was saved')}") from None
        except BaseException:
            self._fail()
            raise
        self._notify("on_loop_end")
        result = self._finish(stopped_by, stop.signum)
        self._notify("on_end", result)
        return result

    def _loop(self, stop: StopFlag) -> str:
        """Steps, with evaluations and checkpoints at their cadence; returns what stopped them."""
        cfg = self.train_cfg
        while True:
            # Under torchrun every process takes the same decision: the slowest clock, any signal.
            stop_requested, self.train_time = dist_mod.agree(self.ctx, stop=stop.requested, elapsed=self.train_time)
            used = self.budget_used()
            if used >= 1.0:
                return which_budget(cfg, self.steps_done, self.epochs_done, self.train_time)
            if stop_requested:
                return "interrupted"
            self.step(used)
            is_best = False
            if self.has_val and self.steps_done % cfg.eval_every == 0:
                is_best = self.evaluate().improved
            if (self.steps_done % cfg.checkpoint_every == 0 or is_best) and not self._final_evaluation_follows(stop):
                self.save(is_best)

    def _final_evaluation_follows(self, stop: StopFlag) -> bool:
        """Whether this step used up the budget and :meth:`_finish` will evaluate it: its checkpoint is
        then written there, once, after that evaluation (a checkpoint is never written twice). Decided
        with the values the next loop test will see (under torchrun: agreed by every process)."""
        if not self.has_val or self.eval_step == self.steps_done:
            return False
        _, elapsed = dist_mod.agree(self.ctx, stop=stop.requested, elapsed=self.train_time)
        return budget_fraction(self.train_cfg, self.steps_done, self.epochs_done, elapsed) >= 1.0

    def _finish(self, stopped_by: str, signum: int | None) -> TrainResult:
        """The final evaluation (unless interrupted or just done) and checkpoint (unless just saved)."""
        interrupted = stopped_by == "interrupted"
        is_best = False
        if self.has_val and self.eval_step != self.steps_done and not interrupted:
            is_best = self.evaluate().improved
        if self.saved_step != self.steps_done:
            self.save(is_best)
        elif is_best and self.ctx.is_main:    # saved already (never twice): the best pointer follows
            ckpt_mod.write_text_atomic(self.run_dir / "best", self.last_checkpoint.name + "\n")
        return self._result(stopped_by, train_loss=self.last_loss, signum=signum)

    def _already_done(self) -> TrainResult:
        if self.ctx.is_main:
            note(f"{self.run_dir} already reached its budget at step {self.steps_done} "
                 f"({which_budget(self.train_cfg, self.steps_done, self.epochs_done, self.train_time)}); "
                 "give a larger --max-steps, --max-epochs or --max-time to continue it")
        return self._result("already_done", train_loss=None, signum=None)

    def _fail(self) -> None:
        self._notify("on_loop_end")
        self._notify("on_end", None)

    def _result(self, stopped_by: str, *, train_loss: float | None, signum: int | None) -> TrainResult:
        return TrainResult(
            run_dir=self.run_dir, last_checkpoint=self.last_checkpoint,
            best_checkpoint=ckpt_mod.read_pointer(self.run_dir, "best"), steps=self.steps_done,
            epochs=self.epochs_done, train_loss=train_loss, val_loss=self.val_loss, best_val_loss=self.best_val_loss,
            params=self.params, train_time=self.train_time, wall_time=time.perf_counter() - self.wall_start,
            chars_per_sec=self.chars_per_sec or 0.0, stopped_by=stopped_by,
            interrupted=stopped_by == "interrupted", signal=signum, layers_run_by=describe_backend(self.model))

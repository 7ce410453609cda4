"""The Trainer: one training run (truncated BPTT over contiguous streams, AdamW, schedules, budgets,
evaluation, checkpoints that resume bit for bit), and the Observer hooks on which what is shown
and logged hangs (observers.py). See docs/training.md."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_mod
from . import configfile, rundir
from . import distributed as dist_mod
from .batches import StreamBatcher
from .config import ModelConfig, TrainConfig
from .console import debug, note
from .corpus import load_corpus
from .errors import CharlstmError, UsageError
from .evaluation import eval_slice, evaluate_loss, sample_text, slow_eval_note
from .memory import check_training
from .model import State, build_model, describe_backend, detach_state
from .optim import Diverged, budget_fraction, learning_rate, make_optimizer, optimisation_step, which_budget
from .runtime import resolve_device, usable_threads
from .trainer_state import TrainerState, rng_state, set_rng_state


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

class Trainer:
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

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: Path | None = None,
                 init_from: Path | None = None, overwrite: bool = False, preset: str | None = None,
                 progress: bool = True, observers=(), fork_to: Path | None = None):
        self.wall_start = time.perf_counter()
        if resume is not None and init_from is not None:
            raise UsageError("--resume and --init-from cannot be combined: "
                             "resume continues a run, init-from starts a new one")
        if train_cfg.threads:
            torch.set_num_threads(usable_threads(train_cfg.threads))
        self.model_cfg, self.train_cfg, self.init_from = model_cfg, train_cfg, init_from
        self.progress = progress             # bars for loading the corpus and long evaluations (rank 0's)
        self.observers = list(observers)
        self.steps_done, self.carried, self.train_time, self.chars_seen = 0, None, 0.0, 0
        self.best_val_loss, self.best_step, self.val_loss, self.eval_step = None, None, None, -1
        self.last_loss, self.loss_ema = None, None
        self.last_checkpoint, self.saved_step = None, -1
        self._lock = None                     # rank 0's lock on the run directory
        try:
            self._setup(resume, overwrite, fork_to, preset, progress)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: Path | None, overwrite: bool, fork_to: Path | None, preset: str | None,
               progress: bool) -> None:
        """The processes, the locked run directory, the corpus, the model, the optimizer, any state resumed."""
        self._start_processes()
        self._open_run(resume, overwrite, fork_to)
        source = self._load_data(progress)
        self._build(source)
        if self.resume_path is not None:
            self._resume()
        self.net = dist_mod.wrap_model(self.model, self.ctx, self.device)  # DDP under torchrun, else the model
        self._prepare_run_dir(overwrite)
        self._default_budget()
        cfg = self.train_cfg
        # What --max-time measures: wall time of the training steps, or this process's CPU time
        # (for benchmarks on a shared machine: other processes do not eat into the budget).
        self.clock = time.process_time if cfg.clock == "cpu" else time.perf_counter
        self.params = self.model.num_parameters()
        self.chars_per_step = cfg.batch_size * cfg.seq_len
        use_bf16 = self.device.type == "cuda" and cfg.bf16 and torch.cuda.is_bf16_supported()
        self.autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext)
        self.extra_config = self._extra_config(preset)
        if self.ctx.is_main:
            configfile.write_run_config(self.run_dir, self.model_cfg, self.train_cfg,
                                        preset=self.extra_config["preset"])
        if self.forked_from is not None:      # the fork starts with its own copy of the checkpoint it continues
            self._write(is_best=self.best_step == self.steps_done)

    # ------------------------------------------------------------ setup

    def _start_processes(self) -> None:
        """Under torchrun: join the process group and take GPU LOCAL_RANK; else the device asked for."""
        env = dist_mod.env_context()
        # This process's share of the B streams (checked before joining: a bad B fails at once).
        self.streams = dist_mod.stream_range(self.train_cfg.batch_size, env or dist_mod.SINGLE)
        if env is None:
            self.ctx, self.device = dist_mod.SINGLE, resolve_device(self.train_cfg.device)
        else:
            self.ctx, self.device = dist_mod.setup(self.train_cfg.device)

    def _open_run(self, resume: Path | None, overwrite: bool, fork_to: Path | None) -> None:
        """The run directory, locked: the resumed checkpoint's, a fork's, or a fresh one chosen before
        the (possibly slow) corpus load so that a taken name fails at once."""
        self.resume_path = self.resume_config = self.forked_from = None
        if resume is not None:
            self._open_resumed(Path(resume), overwrite, fork_to)
            return
        wanted, named = rundir.requested_run_dir(self.model_cfg, self.train_cfg)
        self.run_dir = self._lock_run_dir(functools.partial(rundir.open_run_dir, wanted, named=named,
                                                            overwrite=overwrite))
        self.train_cfg = dataclasses.replace(self.train_cfg, name=self.run_dir.name, out=str(self.run_dir))

    def _open_resumed(self, resume: Path, overwrite: bool, fork_to: Path | None) -> None:
        """--resume continues its run in its directory from the newest checkpoint (an older one would
        replace the history after it: refused), or forks it into ``fork_to``, a new run directory."""
        source = ckpt_mod.resolve_checkpoint(resume, prefer="latest")
        if fork_to is not None and Path(fork_to).resolve() != source.parent.resolve():
            self.run_dir = self._lock_run_dir(functools.partial(rundir.open_run_dir, Path(fork_to), named=True,
                                                                overwrite=overwrite))
            self.train_cfg = dataclasses.replace(self.train_cfg, name=self.run_dir.name, out=str(self.run_dir))
            self.resume_path = self.forked_from = ckpt_mod.resume_checkpoint(resume)
        else:
            hint = ("--resume writes there: copy the run somewhere writable, or fork it into a new run with "
                    f"--resume {resume} --out NEW")
            self.run_dir = self._lock_run_dir(functools.partial(rundir.lock_run_dir, source.parent, hint))
            self.resume_path = ckpt_mod.resume_checkpoint(resume)    # now that no other process writes there
            self._refuse_rewriting_history(resume)
        self.resume_config = ckpt_mod.verify_checkpoint(self.resume_path)

    def _refuse_rewriting_history(self, resume: Path) -> None:
        newer = [p.name for p in ckpt_mod.newer_checkpoints(self.resume_path)]
        if newer:
            name = self.resume_path.name
            shown = ", ".join(newer[:3]) + (f" and {len(newer) - 3} more" if len(newer) > 3 else "")
            raise UsageError(f"--resume {resume}: {self.run_dir} holds newer checkpoints ({shown}) that continuing "
                             f"from {name} would replace; continue the run with --resume {self.run_dir}, or fork "
                             f"{name} into a new run with --resume {resume} --out NEW")

    def _lock_run_dir(self, take) -> Path:
        """Rank 0 takes the run directory's lock with ``take()`` (a RunLock, kept until the run ends);
        every process gets the directory."""
        def on_main() -> Path:
            self._lock = take()
            return self._lock.run_dir
        return dist_mod.on_main(on_main, self.ctx)

    def close(self) -> None:
        """Release the run directory's lock (:meth:`run` does at its end)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _load_data(self, progress: bool):
        """The corpus, its splits and vocabulary; the --init-from source checkpoint (or None)."""
        cfg = self.train_cfg
        with dist_mod.local_main_first(self.ctx):   # one process per host fills the token cache
            self.corpus = load_corpus(cfg.data, invalid_utf8=cfg.invalid_utf8,
                                      progress=progress and self.ctx.is_local_main)
        if len(set(dist_mod.gather_objects(self.corpus.sha256, self.ctx))) > 1:
            raise CharlstmError(f"--data {cfg.data} is not the same text on every host (sha256 differs); "
                                "give every process the same corpus")
        splits = self.corpus.split(cfg.val_frac, cfg.test_frac)
        self.train_tokens, self.val_tokens = splits["train"], eval_slice(splits["val"], cfg.eval_chars)
        self.has_val = self.val_tokens.numel() > 1
        self.vocab = self.corpus.vocab
        self.token_map = None                # corpus ids -> the model's ids (--init-from another vocabulary)
        if self.resume_config is not None:
            self._check_same_corpus()
        return self._init_source() if self.init_from is not None else None

    def _check_same_corpus(self) -> None:
        stored = self.resume_config.get("corpus", {})
        if stored.get("sha256") != self.corpus.sha256:
            raise CharlstmError(
                f"--resume: the corpus {self.train_cfg.data} has changed since {self.resume_path} was written "
                f"(sha256 {self.corpus.sha256[:12]}..., the run was trained on {str(stored.get('sha256'))[:12]}...); "
                "use --init-from to fine-tune on new text"
            )

    def _init_source(self) -> ckpt_mod.Checkpoint:
        """The --init-from checkpoint; the corpus is read through its vocabulary (a superset of the corpus's)."""
        source = ckpt_mod.load_checkpoint(self.init_from)
        missing = [c for c in self.vocab.chars if c not in source.vocab.stoi]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10])
            shown += f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise CharlstmError(
                f"--init-from {self.init_from}: {len(missing)} character(s) of {self.train_cfg.data} are not in that "
                f"model's vocabulary of {len(source.vocab)}: {shown}; fine-tune on text made of its characters, "
                "or train from scratch"
            )
        if self.vocab != source.vocab:
            # Translated window by window (never a full copy of the corpus).
            self.token_map = torch.tensor([source.vocab.stoi[c] for c in self.vocab.chars], dtype=torch.long)
            self.vocab = source.vocab
        return source

    def _build(self, source) -> None:
        """The model (seeded; the source's weights for --init-from), the batcher and the optimizer."""
        cfg, model_cfg = self.train_cfg, self.model_cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if self.init_from is None and self.resume_config is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=len(self.vocab))
            if model_cfg.init == "chrono" and model_cfg.chrono_tmax == 0:
                model_cfg.chrono_tmax = cfg.seq_len
        check_training(model_cfg, cfg, len(self.vocab), self.device)     # refused with the figures, not OOM-killed
        self.model = build_model(model_cfg, self.device)   # compiles the native loops it takes, before any timing
        self.model_cfg = self.model.cfg
        debug(f"recurrent layers: {describe_backend(self.model)}")
        if source is not None:
            self.model.load_state_dict(source.model.state_dict())
        if self.ctx.rank:   # after the (identical) initialisation: every process draws its own dropout masks
            torch.manual_seed(dist_mod.rank_seed(cfg.seed, self.ctx.rank))
        self.batcher = StreamBatcher(self.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                     streams=self.streams, token_map=self.token_map)
        if self.resume_path is not None:
            weights, _ = ckpt_mod.load_tensors(self.resume_path / "model.safetensors")
            try:
                self.model.load_state_dict(weights)
            except RuntimeError as e:
                raise CharlstmError(f"--resume {self.resume_path}: its weights do not fit its own config ({e})") from e
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)

    def _resume(self) -> None:
        """The optimizer's moments and the trainer state of the checkpoint resumed."""
        ckpt_mod.load_optimizer_state(self.resume_path, self.optimizer)
        stored = ckpt_mod.load_trainer_state(self.resume_path)
        try:
            self.restore(TrainerState.from_dict(stored))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise CharlstmError(f"checkpoint {self.resume_path} is damaged: its trainer_state.json does not hold a "
                                f"trainer state charlstm can restore ({type(e).__name__}: {e})") from None
        if self.forked_from is None:
            self.last_checkpoint, self.saved_step = self.resume_path, self.steps_done

    def _prepare_run_dir(self, overwrite: bool) -> None:
        """Create (or clear, with --overwrite) a fresh run's directory; drop metrics.jsonl lines after a
        resumed checkpoint. Rank 0 only."""
        if not self.ctx.is_main:
            return
        if self.resume_path is not None and self.forked_from is None:
            rundir.trim_metrics(self.run_dir / rundir.METRICS, self.steps_done)
            return
        if overwrite:
            rundir.clear_run_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.forked_from is not None:      # the history up to the fork
            rundir.copy_metrics(self.forked_from.parent / rundir.METRICS, self.run_dir / rundir.METRICS,
                                self.steps_done)

    def _default_budget(self) -> None:
        if not (self.train_cfg.max_steps or self.train_cfg.max_epochs or self.train_cfg.max_time):
            self.train_cfg = dataclasses.replace(self.train_cfg, max_epochs=1.0)
            if self.ctx.is_main:
                note(f"no budget given: training for 1 epoch ({self.batcher.steps_per_epoch} steps); "
                     "set --max-time, --max-steps or --max-epochs")

    def _extra_config(self, preset: str | None) -> dict:
        """What config.json records beside the configs (a resumed run keeps its preset and source)."""
        extra = {"preset": preset, "init_from": str(self.init_from) if self.init_from else None,
                 "argv": sys.argv[1:], "world_size": self.ctx.world_size}
        if self.resume_config is not None:
            extra["preset"] = self.resume_config.get("preset")
            extra["init_from"] = self.resume_config.get("init_from")
            forked_from = self.forked_from or self.resume_config.get("forked_from")
            if forked_from is not None:
                extra["forked_from"] = str(forked_from)
        return extra

    # ------------------------------------------------------------ the state that resumes

    def snapshot(self) -> TrainerState:
        """The state that resumes this run. Under torchrun a collective: the carried state of every
        process's streams is joined into the full (L, B, H) one, and every process's RNG state is kept."""
        rngs = dist_mod.gather_objects(rng_state(self.device), self.ctx)
        carried = None if self.carried is None else State(self._full(self.carried.h), self._full(self.carried.c))
        return TrainerState(
            step=self.steps_done, epoch=self.batcher.epoch, epochs_done=self.epochs_done,
            batcher=self.batcher.state_dict(), carried=carried, rng=rngs[0],
            rng_ranks=rngs if self.ctx.enabled else None, world_size=self.ctx.world_size if self.ctx.enabled else None,
            best_val_loss=self.best_val_loss, best_step=self.best_step, val_loss=self.val_loss,
            train_time=self.train_time, chars_seen=self.chars_seen, train_loss=self.last_loss, params=self.params)

    def restore(self, state: TrainerState) -> None:
        """Continue from ``state``: step, data position, this process's share of the carried state, RNG."""
        self.steps_done = state.step
        self.batcher.load_state_dict(state.batcher)
        self.carried = (None if state.carried is None
                        else State(self._share(state.carried.h), self._share(state.carried.c)))
        self.best_val_loss, self.best_step, self.val_loss = state.best_val_loss, state.best_step, state.val_loss
        self.train_time, self.chars_seen = state.train_time, state.chars_seen
        rng_ranks = state.rng_ranks or [state.rng]
        if len(rng_ranks) == self.ctx.world_size:
            set_rng_state(rng_ranks[self.ctx.rank], self.device)
        elif self.ctx.rank == 0:
            set_rng_state(state.rng, self.device)
        else:   # saved by another number of processes: new dropout draws for the added ones
            torch.manual_seed(dist_mod.rank_seed(self.train_cfg.seed + self.steps_done, self.ctx.rank))

    def _full(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else dist_mod.gather_streams(t.detach(), self.ctx).float().cpu().contiguous()

    def _share(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else dist_mod.my_streams(t, self.train_cfg.batch_size, self.ctx).to(self.device)

    # ------------------------------------------------------------ what observers read

    @property
    def epochs_done(self) -> float:
        return self.batcher.epochs_done

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

    def _write(self, is_best: bool) -> None:
        state = self.snapshot().to_dict()
        self.last_checkpoint = dist_mod.on_main(functools.partial(self._write_here, state, is_best), self.ctx)
        self.saved_step = self.steps_done

    def _write_here(self, state: dict, is_best: bool) -> Path:
        try:
            return ckpt_mod.save_checkpoint(
                self.run_dir, step=self.steps_done, model=self.model, optimizer=self.optimizer,
                model_cfg=self.model_cfg, train_cfg=self.train_cfg, vocab=self.vocab, corpus_meta=self.corpus.meta(),
                trainer_state=state, is_best=is_best, keep=self.train_cfg.keep, extra_config=self.extra_config)
        except ckpt_mod.NoSpaceError as e:
            then = (f"continue with --resume {self.run_dir}" if self.last_checkpoint is not None
                    else "train again")
            raise CharlstmError(f"{e}; {self._where('the last checkpoint is', 'no checkpoint had been saved yet')}. "
                                f"Free some space, then {then}") from None

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

    def _where(self, saved: str, unsaved: str) -> str:
        if self.last_checkpoint is None:
            return unsaved
        return f"{saved} {self.last_checkpoint} (step {self.saved_step})"

    def _result(self, stopped_by: str, *, train_loss: float | None, signum: int | None) -> TrainResult:
        return TrainResult(
            run_dir=self.run_dir, last_checkpoint=self.last_checkpoint,
            best_checkpoint=ckpt_mod.read_pointer(self.run_dir, "best"), steps=self.steps_done,
            epochs=self.epochs_done, train_loss=train_loss, val_loss=self.val_loss, best_val_loss=self.best_val_loss,
            params=self.params, train_time=self.train_time, wall_time=time.perf_counter() - self.wall_start,
            chars_per_sec=self.chars_per_sec or 0.0, stopped_by=stopped_by,
            interrupted=stopped_by == "interrupted", signal=signum, layers_run_by=describe_backend(self.model))

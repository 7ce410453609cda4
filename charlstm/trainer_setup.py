"""The Trainer's setup: the processes, the run directory and its lock, the data, the model and the
optimizer, a checkpoint resumed or a run forked; the state that resumes (snapshot, restore) and
the writer of checkpoints. trainer.py's Trainer builds on it with step, evaluate, save and run."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import sys
import time
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
from .evaluation import eval_slice
from .memory import check_training
from .model import State, build_model, describe_backend
from .optim import make_optimizer
from .registry import spec_for
from .runtime import resolve_device, threads_for, usable_threads
from .trainer_state import TrainerState, rng_state, set_rng_state


class TrainerSetup:
    """A run set up for training (the arguments are :class:`charlstm.trainer.Trainer`'s): every
    process joined, rank 0 holding the run directory's lock, the corpus loaded, the model and the
    optimizer built, a resumed checkpoint's state restored. It also writes the run's checkpoints."""

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
        if not cfg.threads and self.device.type == "cpu":
            self._threads_for_size()

    def _threads_for_size(self) -> None:
        """Without --threads, a model too small to share its time steps runs on one thread (see
        runtime.GRAIN): on a shared machine its threads would mostly wait for each other."""
        flops = 2 * len(self.streams) * spec_for(self.model_cfg).weights(self.model_cfg)
        threads = threads_for(flops)
        if threads < torch.get_num_threads():
            debug(f"threads: {threads} of {torch.get_num_threads()} ({flops:,} FLOPs a time step; --threads sets it)")
            torch.set_num_threads(threads)

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
        reason = inexact_resume_reason(self.model, self.device)
        if reason and self.ctx.is_main:
            note(f"note: this run resumes exactly except for {reason}")

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

    @property
    def epochs_done(self) -> float:
        return self.batcher.epochs_done

    # ------------------------------------------------------------ writing checkpoints

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

    def _where(self, saved: str, unsaved: str) -> str:
        """Where the last checkpoint is (``saved`` and the path) or ``unsaved`` when none was written."""
        if self.last_checkpoint is None:
            return unsaved
        return f"{saved} {self.last_checkpoint} (step {self.saved_step})"


def inexact_resume_reason(model: torch.nn.Module, device: torch.device) -> str | None:
    """What a resumed run cannot restore, or None where it continues bit for bit. cuDNN's recurrent
    kernels draw the dropout between their layers from a random state of their own, which PyTorch
    neither exposes nor restores: on an H200 a resumed cuDNN gru with dropout took other masks from
    the first step after resuming, while the custom lstm's resume stayed exact."""
    dropping = any(isinstance(m, torch.nn.RNNBase) and m.num_layers > 1 and m.dropout > 0 for m in model.modules())
    if device.type != "cuda" or not dropping:
        return None
    return ("the dropout masks between the cuDNN layers (cuDNN keeps their random state; PyTorch cannot restore "
            "it): --backend custom, or --dropout 0, resumes exactly on a GPU")

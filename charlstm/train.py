"""The training loop: truncated BPTT, AdamW, schedules, budgets, evaluation, progress, logging.

The loop knows nothing of which cell runs: it builds a model from a
``ModelConfig``, feeds it windows of ``B`` contiguous streams (the final state
of each window is the next window's initial state, detached; zeros at each
epoch start), and writes checkpoints through :mod:`charlstm.checkpoint`.

Everything that decides what the next step computes (weights, optimizer
moments, step count, data position, carried state, RNG states) is saved in
each checkpoint, so a resumed run continues bit for bit. Evaluation and the
samples printed at each evaluation never touch the training RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt_mod
from .config import PRESETS, ModelConfig, TrainConfig, parse_duration
from .errors import CharlstmError, UsageError
from .evaluation import evaluate_loss, sample_text
from .runtime import resolve_device

LN2 = math.log(2.0)

# Options that may differ from the stored run when resuming (they do not change what a step computes).
RESUMABLE_OPTIONS = frozenset({
    "max_steps", "max_epochs", "max_time", "eval_every", "checkpoint_every", "keep",
    "device", "threads", "sample_chars", "log_every",
})

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


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

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal for an interrupted run (130 for Ctrl-C), as shells report it."""
        return 128 + (self.signal or signal.SIGINT) if self.interrupted else 0


# --------------------------------------------------------------------------- optimisation

def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, embeddings or norms)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm,
                               torch.nn.modules.batchnorm._BatchNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)


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


# --------------------------------------------------------------------------- helpers

def _rng_state(device: torch.device) -> dict:
    state = {"torch_cpu": torch.get_rng_state(), "python": _python_rng_to_json(random.getstate())}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"].to(torch.uint8), device)


def _python_rng_to_json(st) -> list:
    return [st[0], list(st[1]), st[2]]


class _StopFlag:
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
        print(f"\n{what}: stopping after this step and saving a checkpoint (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def default_run_name(model_cfg: ModelConfig, data: str) -> str:
    stem = Path(str(data)).stem or "data"
    return f"{model_cfg.variant}-{stem}"


_RUN_ENTRIES = ("best", "latest", "metrics.jsonl")


def _holds_run(path: Path) -> bool:
    return path.exists() and (any((path / e).exists() for e in _RUN_ENTRIES) or bool(ckpt_mod.list_checkpoints(path)))


def choose_run_dir(run_dir: Path, *, named: bool, overwrite: bool) -> Path:
    """The directory a fresh run writes to; never silently reuses one that holds a run.

    An unnamed run picks a free name (``lstm-pystdlib-2``); a named one that
    exists is an error unless ``overwrite`` (see :func:`clear_run_dir`).
    Nothing is deleted here.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} exists and is not a directory; choose another --out or --name")
    if not _holds_run(run_dir):
        return run_dir
    if overwrite:
        _run_files(run_dir)  # refuses a directory with files charlstm did not write
        return run_dir
    if named:
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                         "replace it with --overwrite, or choose another --name/--out")
    k = 2
    while _holds_run(run_dir.with_name(f"{run_dir.name}-{k}")):
        k += 1
    return run_dir.with_name(f"{run_dir.name}-{k}")


def _run_files(run_dir: Path) -> list[Path]:
    """charlstm's own entries in a run directory; UsageError if anything else is there."""
    ours = [p for p in run_dir.iterdir()
            if p.name in _RUN_ENTRIES or ckpt_mod.CKPT_PATTERN.match(p.name)
            or p.name.startswith((".tmp-ckpt-", ".old-ckpt-", ".best.tmp", ".latest.tmp", ".metrics.jsonl.tmp"))]
    foreign = sorted(p.name for p in run_dir.iterdir() if p not in ours)
    if foreign:
        raise UsageError(f"--overwrite: {run_dir} also holds files charlstm did not write ({', '.join(foreign[:5])}); "
                         "remove them or choose another --out")
    return ours


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's checkpoints, pointers and metrics (for --overwrite)."""
    import shutil

    if run_dir.is_dir():
        for p in _run_files(run_dir):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object per line (step, train loss, val loss, lr, chars/s, elapsed)."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is not None and path.exists():
            # Resuming: drop lines written after the checkpoint we continue from.
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            ckpt_mod.write_text_atomic(path, "".join(l + "\n" for l in kept))
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _NullLog:
    """Stands in for MetricsLog on the processes other than rank 0 (only rank 0 writes)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _err(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------- the run

def train(model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: Path | None = None,
          init_from: Path | None = None, progress: bool = True, overwrite: bool = False,
          preset: str | None = None, next_steps: bool = True) -> TrainResult:
    """Train a model and write its run directory; returns what happened.

    ``next_steps`` ends the summary with the command to run next (resume or
    sample); callers that manage the run themselves (compare-variants) turn it off.

    ``resume`` continues the run holding that checkpoint exactly (its configs
    must be passed in, see :func:`resume_configs`); ``init_from`` starts from a
    checkpoint's weights with a fresh optimizer. Raises CharlstmError when the
    loss becomes NaN or infinite (the last good checkpoint is kept).
    """
    from . import distributed as dist_mod
    from .batches import StreamBatcher
    from .corpus import load_corpus
    from .model import build_model, detach_state, State

    wall_start = time.perf_counter()
    if resume is not None and init_from is not None:
        raise UsageError("--resume and --init-from cannot be combined: resume continues a run, init-from starts a new one")
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    # Under torchrun: join the process group, take GPU LOCAL_RANK; rank 0 alone talks and writes.
    env = dist_mod.env_context()
    streams = dist_mod.stream_range(train_cfg.batch_size, env or dist_mod.SINGLE)  # this process's share of B
    if env is None:
        ctx, device = dist_mod.SINGLE, resolve_device(train_cfg.device)
    else:
        ctx, device = dist_mod.setup(train_cfg.device)
    corpus_progress = progress and ctx.is_local_main   # the process that fills this host's token cache
    progress = progress and ctx.is_main

    resume_path = ckpt_mod.resolve_checkpoint(resume, prefer="latest") if resume is not None else None
    resume_config = ckpt_mod.verify_checkpoint(resume_path) if resume_path is not None else None
    if resume_path is not None:
        run_dir = resume_path.parent
    else:
        # Chosen before the (possibly slow) corpus load so that a taken name fails at once.
        name = train_cfg.name or default_run_name(model_cfg, train_cfg.data)
        run_dir = Path(train_cfg.out) if train_cfg.out else Path("checkpoints") / name
        run_dir = dist_mod.on_main(
            lambda: choose_run_dir(run_dir, named=bool(train_cfg.out or train_cfg.name), overwrite=overwrite), ctx)
        train_cfg = dataclasses.replace(train_cfg, name=run_dir.name, out=str(run_dir))

    with dist_mod.local_main_first(ctx):   # one process per host fills the token cache
        corpus = load_corpus(train_cfg.data, invalid_utf8=train_cfg.invalid_utf8, progress=corpus_progress)
    if len(set(dist_mod.gather_objects(corpus.sha256, ctx))) > 1:
        raise CharlstmError(f"--data {train_cfg.data} is not the same text on every host (sha256 differs); "
                            "give every process the same corpus")
    vocab = corpus.vocab
    token_map = None                       # corpus ids -> the model's ids (--init-from another vocabulary)
    splits = corpus.split(train_cfg.val_frac, train_cfg.test_frac)
    train_tokens, val_tokens = splits["train"], splits["val"]

    source = None
    if resume_config is not None:
        stored = resume_config.get("corpus", {})
        if stored.get("sha256") != corpus.sha256:
            raise CharlstmError(
                f"--resume: the corpus {train_cfg.data} has changed since {resume_path} was written "
                f"(sha256 {corpus.sha256[:12]}..., the run was trained on {str(stored.get('sha256'))[:12]}...); "
                "use --init-from to fine-tune on new text"
            )
    if init_from is not None:
        source = ckpt_mod.load_checkpoint(init_from)
        missing = [c for c in vocab.chars if c not in source.vocab.stoi]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise CharlstmError(
                f"--init-from {init_from}: {len(missing)} character(s) of {train_cfg.data} are not in that model's "
                f"vocabulary of {len(source.vocab)}: {shown}; fine-tune on text made of its characters, or train from scratch"
            )
        if vocab != source.vocab:
            # Re-encode the corpus with the source model's vocabulary (a superset of this one's).
            # Translated window by window (never a full copy of the corpus).
            token_map = torch.tensor([source.vocab.stoi[c] for c in vocab.chars], dtype=torch.long)
            vocab = source.vocab

    # ------------------------------------------------------------ model, optimizer, data
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    if init_from is None and resume_config is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(vocab))
        if model_cfg.init == "chrono" and model_cfg.chrono_tmax == 0:
            model_cfg.chrono_tmax = train_cfg.seq_len
    model = build_model(model_cfg)
    model_cfg = model.cfg
    if source is not None:
        model.load_state_dict(source.model.state_dict())
    if ctx.rank:   # after the (identical) initialisation: every process draws its own dropout masks
        torch.manual_seed(dist_mod.rank_seed(train_cfg.seed, ctx.rank))
    batcher = StreamBatcher(train_tokens, train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.seed,
                            streams=streams, token_map=token_map)
    has_val = val_tokens.numel() > 1

    step, best_val, best_step, train_time, chars_seen = 0, None, None, 0.0, 0
    last_val = None
    hidden = None
    if resume_path is not None:
        weights, _ = ckpt_mod.load_tensors(resume_path / "model.safetensors")
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise CharlstmError(f"--resume {resume_path}: its weights do not fit its own config ({e})") from e
    model.to(device)
    optimizer = make_optimizer(model, train_cfg)
    if resume_path is not None:
        ckpt_mod.load_optimizer_state(resume_path, optimizer)
        ts = ckpt_mod.load_trainer_state(resume_path)
        step = int(ts["step"])
        batcher.load_state_dict(ts["batcher"])
        if ts.get("hidden") is not None:
            # The full (L, B, H) state of the global streams; this process takes its share.
            h = {k: None if v is None else dist_mod.my_streams(v, train_cfg.batch_size, ctx).to(device)
                 for k, v in ts["hidden"].items()}
            hidden = State(h["h"], h.get("c"))
        best_val, best_step = ts.get("best_val_loss"), ts.get("best_step")
        last_val = ts.get("val_loss")
        train_time = float(ts.get("train_time", 0.0))
        chars_seen = int(ts.get("chars_seen", 0))
        rng_ranks = ts.get("rng_ranks") or [ts["rng"]]
        if len(rng_ranks) == ctx.world_size:
            _set_rng_state(rng_ranks[ctx.rank], device)
        elif ctx.rank == 0:
            _set_rng_state(ts["rng"], device)
        else:   # saved by another number of processes: new dropout draws for the added ones
            torch.manual_seed(dist_mod.rank_seed(train_cfg.seed + step, ctx.rank))
    net = dist_mod.wrap_model(model, ctx, device)   # DDP under torchrun (averages gradients), else the model

    # ------------------------------------------------------------ run directory
    if resume_path is None and ctx.is_main:
        if overwrite:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)

    if not (train_cfg.max_steps or train_cfg.max_epochs or train_cfg.max_time):
        train_cfg = dataclasses.replace(train_cfg, max_epochs=1.0)
        if ctx.is_main:
            _err(f"no budget given: training for 1 epoch ({batcher.steps_per_epoch} steps); "
                 "set --max-time, --max-steps or --max-epochs")

    # What --max-time measures: wall time of the training steps, or this process's CPU time
    # (for benchmarks on a shared machine: other processes do not eat into the budget).
    clock = time.process_time if train_cfg.clock == "cpu" else time.perf_counter
    params = model.num_parameters()
    V = len(vocab)
    chars_per_step = train_cfg.batch_size * train_cfg.seq_len
    use_bf16 = device.type == "cuda" and train_cfg.bf16 and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    extra_config = {"preset": preset, "init_from": str(init_from) if init_from else None,
                    "argv": sys.argv[1:], "world_size": ctx.world_size}
    if resume_config is not None:
        extra_config["preset"] = resume_config.get("preset")
        extra_config["init_from"] = resume_config.get("init_from")

    def epochs_done() -> float:
        return batcher.epochs_done

    def trainer_state(train_loss) -> dict:
        """What resumes the run. Under torchrun a collective: the carried state of every process's
        streams is joined into the full (L, B, H) one, and every process's RNG state is kept."""
        def full(t):
            return None if t is None else dist_mod.gather_streams(t.detach(), ctx).float().cpu().contiguous()

        rngs = dist_mod.gather_objects(_rng_state(device), ctx)
        return {
            "step": step,
            "epoch": batcher.epoch,
            "epochs_done": epochs_done(),
            "batcher": batcher.state_dict(),              # global position: the same on every process
            "hidden": None if hidden is None else {"h": full(hidden.h), "c": full(hidden.c)},
            "rng": rngs[0],
            **({"rng_ranks": rngs, "world_size": ctx.world_size} if ctx.enabled else {}),
            "best_val_loss": best_val,
            "best_step": best_step,
            "val_loss": last_val,
            "train_time": train_time,
            "chars_seen": chars_seen,
            "metrics": {
                "step": step, "epochs": epochs_done(), "train_loss": train_loss, "val_loss": last_val,
                "val_bpc": None if last_val is None else last_val / LN2,
                "best_val_loss": best_val, "best_val_bpc": None if best_val is None else best_val / LN2,
                "best_step": best_step, "train_time": train_time, "params": params,
                "chars_per_sec": chars_seen / train_time if train_time > 0 else None,
            },
        }

    last_ckpt: Path | None = None
    saved_step = -1

    def save(train_loss, is_best: bool) -> Path:
        """Write a checkpoint (rank 0 writes; under torchrun the others wait for it)."""
        nonlocal last_ckpt, saved_step
        state = trainer_state(train_loss)
        last_ckpt = dist_mod.on_main(lambda: ckpt_mod.save_checkpoint(
            run_dir, step=step, model=model, optimizer=optimizer, model_cfg=model_cfg, train_cfg=train_cfg,
            vocab=vocab, corpus_meta=corpus.meta(), trainer_state=state,
            is_best=is_best, keep=train_cfg.keep, extra_config=extra_config), ctx)
        saved_step = step
        return last_ckpt

    if resume_path is not None:
        last_ckpt, saved_step = resume_path, step
    metrics = (MetricsLog(run_dir / "metrics.jsonl", keep_until_step=step if resume_path is not None else None)
               if ctx.is_main else _NullLog())

    if resume_path is not None and budget_fraction(train_cfg, step, epochs_done(), train_time) >= 1.0:
        metrics.close()
        if ctx.is_main:
            _err(f"{run_dir} already reached its budget at step {step} "
                 f"({_which_budget(train_cfg, step, epochs_done(), train_time)}); "
                 "give a larger --max-steps, --max-epochs or --max-time to continue it")
        return _result(run_dir, last_ckpt, ckpt_mod.read_pointer(run_dir, "best"), step, epochs_done(), None,
                       last_val, best_val, params, train_time, time.perf_counter() - wall_start, chars_seen,
                       "already_done", False)

    # ------------------------------------------------------------ the loop
    from tqdm import tqdm

    # The bar measures the budget (steps, epochs or time, whichever runs out first), so that its
    # percentage and ETA mean the same thing for every kind of budget.
    session_start_time = train_time
    session_start_frac = budget_fraction(train_cfg, step, epochs_done(), train_time)
    bar = tqdm(total=1.0, initial=session_start_frac, file=sys.stderr, disable=not progress, dynamic_ncols=True,
               desc=run_dir.name, leave=True, bar_format="{percentage:3.0f}%|{bar}| {desc}")
    window_losses: list[float] = []
    last_loss = None
    ema = None
    stopped_by = None
    interrupted = False
    eval_step = -1

    def run_eval() -> tuple[float, bool]:
        """Evaluate on the whole validation split; print a line and a sample; return (loss, improved).

        Under torchrun rank 0 evaluates the whole split and the others wait for its figure.
        """
        nonlocal best_val, best_step, last_val, eval_step

        def evaluate() -> tuple[float, int, str]:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                val, n = evaluate_loss(model, val_tokens, batch_size=train_cfg.batch_size,
                                       seq_len=train_cfg.seq_len, device=device, token_map=token_map)
                text = sample_text(model, vocab, train_cfg.sample_chars, device=device, seed=train_cfg.seed + step)
            return val, n, text

        val, n, text = dist_mod.on_main(evaluate, ctx)
        last_val, eval_step = val, step
        improved = best_val is None or val < best_val
        if improved:
            best_val, best_step = val, step
        if ctx.is_main:
            _err(f"step {step}: val loss {val:.4f} nats/char ({val / LN2:.4f} bpc) over {n} chars"
                 + ("  (best)" if improved else f"  (best {best_val:.4f} at step {best_step})"))
            if text:
                _err("-" * 20 + " sample " + "-" * 20 + "\n" + text + "\n" + "-" * 48)
        return val, improved

    def log(record: dict) -> None:
        metrics.write({"step": step, "epoch": round(epochs_done(), 4), "lr": optimizer.param_groups[0]["lr"],
                       "chars_per_sec": chars_seen / train_time if train_time > 0 else None,
                       "elapsed": round(train_time, 3), **record})

    try:
        with _StopFlag(distributed=ctx.enabled) as stop:
            while True:
                # Under torchrun every process takes the same decision: the slowest clock, any signal.
                stop_requested, train_time = dist_mod.agree(ctx, stop=stop.requested, elapsed=train_time)
                frac = budget_fraction(train_cfg, step, epochs_done(), train_time)
                if frac >= 1.0:
                    stopped_by = _which_budget(train_cfg, step, epochs_done(), train_time)
                    break
                if stop_requested:
                    stopped_by, interrupted = "interrupted", True
                    break
                t0 = clock()
                lr = learning_rate(train_cfg, step, frac)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x, y, starts_epoch = batcher.next_batch()
                if starts_epoch:
                    hidden = None
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (T, B/W)
                net.train()
                with autocast():
                    logits, new_hidden = net(x, hidden)                              # (T, B/W, V)
                # The mean over this process's targets; DDP averages the gradients over the W
                # processes, which gives the gradient of the mean over all T x B targets.
                loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
                loss_value = dist_mod.mean(loss, ctx)                                # the global mean
                if not math.isfinite(loss_value):
                    raise _Diverged(step + 1, f"the training loss became {loss_value}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       train_cfg.clip if train_cfg.clip > 0 else float("inf"))
                if not math.isfinite(float(gnorm)):
                    raise _Diverged(step + 1, f"the gradient norm became {float(gnorm)}")
                optimizer.step()
                hidden = detach_state(new_hidden)
                step += 1
                chars_seen += chars_per_step
                train_time += clock() - t0
                last_loss = loss_value
                window_losses.append(loss_value)
                ema = loss_value if ema is None else 0.95 * ema + 0.05 * loss_value

                if progress:
                    done = min(budget_fraction(train_cfg, step, epochs_done(), train_time), 1.0)
                    rate = (done - session_start_frac) / max(train_time - session_start_time, 1e-9)
                    eta = (1.0 - done) / rate if rate > 0 else float("nan")
                    bar.update(done - bar.n)
                    bar.set_description_str(f"{run_dir.name}: step {step}, loss {ema:.3f}, "
                                            f"{chars_seen / max(train_time, 1e-9):,.0f} chars/s, "
                                            f"ETA {_fmt_time(eta) if math.isfinite(eta) else '?'}", refresh=False)

                is_best = False
                if step % train_cfg.log_every == 0:
                    log({"train_loss": sum(window_losses) / len(window_losses)})
                    window_losses = []
                if has_val and step % train_cfg.eval_every == 0:
                    val, is_best = run_eval()
                    log({"train_loss": ema, "val_loss": val, "val_bpc": val / LN2})
                if step % train_cfg.checkpoint_every == 0 or is_best:
                    save(last_loss, is_best)
    except _Diverged as d:
        bar.close()
        metrics.close()
        where = (f"the last good checkpoint is {last_ckpt} (step {saved_step})" if last_ckpt is not None
                 else "no checkpoint had been saved yet")
        raise CharlstmError(
            f"training diverged at step {d.step}: {d.what}; {where}. Try a lower --lr (now {train_cfg.lr:g}) "
            f"or a smaller --clip"
        ) from None
    except KeyboardInterrupt:
        bar.close()
        metrics.close()
        where = f"the last checkpoint is {last_ckpt} (step {saved_step})" if last_ckpt is not None else "nothing was saved"
        raise CharlstmError(f"aborted at step {step} without saving; {where}") from None
    bar.close()

    # ------------------------------------------------------------ the end: evaluate, save, summarise
    is_best = False
    if has_val and eval_step != step and not interrupted:
        val, is_best = run_eval()
        log({"train_loss": ema, "val_loss": val, "val_bpc": val / LN2})
    if window_losses:
        log({"train_loss": sum(window_losses) / len(window_losses)})
    if saved_step != step or is_best:
        save(last_loss, is_best)
    metrics.close()
    best = ckpt_mod.read_pointer(run_dir, "best")
    result = _result(run_dir, last_ckpt, best, step, epochs_done(), last_loss, last_val, best_val, params,
                     train_time, time.perf_counter() - wall_start, chars_seen, stopped_by, interrupted)
    result.signal = stop.signum
    if ctx.is_main:
        print_summary(result, model_cfg, next_steps=next_steps)
    return result


class _Diverged(Exception):
    def __init__(self, step: int, what: str):
        super().__init__(what)
        self.step, self.what = step, what


def _which_budget(cfg: TrainConfig, step: int, epochs: float, elapsed: float) -> str:
    for name, used in (("max_steps", step / cfg.max_steps if cfg.max_steps else 0),
                       ("max_epochs", epochs / cfg.max_epochs if cfg.max_epochs else 0),
                       ("max_time", elapsed / cfg.max_time if cfg.max_time else 0)):
        if used >= 1.0:
            return name
    return "budget"


def _result(run_dir, last, best, step, epochs, train_loss, val, best_val, params, train_time, wall, chars,
            stopped_by, interrupted) -> TrainResult:
    return TrainResult(run_dir=run_dir, last_checkpoint=last, best_checkpoint=best, steps=step, epochs=epochs,
                       train_loss=train_loss, val_loss=val, best_val_loss=best_val, params=params,
                       train_time=train_time, wall_time=wall,
                       chars_per_sec=chars / train_time if train_time > 0 else 0.0,
                       stopped_by=stopped_by, interrupted=interrupted)


def print_summary(result: TrainResult, model_cfg: ModelConfig, next_steps: bool = True) -> None:
    """A rich table on stderr: losses, parameters, time, speed, where the checkpoints are."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    title = "training interrupted" if result.interrupted else f"training finished ({result.stopped_by})"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()

    def fmt_loss(v):
        return "-" if v is None else f"{v:.4f} nats/char  ({v / LN2:.4f} bpc)"

    table.add_row("model", f"{model_cfg.variant} ({model_cfg.backend}), {model_cfg.layers} x {model_cfg.hidden}, "
                           f"embedding {model_cfg.embed}, {result.params:,} parameters")
    table.add_row("steps", f"{result.steps:,} ({result.epochs:.2f} epochs)")
    table.add_row("final train loss", "-" if result.train_loss is None else f"{result.train_loss:.4f} nats/char")
    table.add_row("val loss", fmt_loss(result.val_loss))
    table.add_row("best val loss", fmt_loss(result.best_val_loss))
    table.add_row("training time", f"{_fmt_time(result.train_time)} ({result.wall_time:.0f} s with evaluation and saving)")
    table.add_row("speed", f"{result.chars_per_sec:,.0f} chars/s")
    table.add_row("run directory", str(result.run_dir))
    if result.best_checkpoint is not None:
        table.add_row("best checkpoint", str(result.best_checkpoint))
    if result.last_checkpoint is not None:
        table.add_row("latest checkpoint", str(result.last_checkpoint))
    console.print(table)
    if not next_steps:
        return
    if result.interrupted:
        console.print(f"continue with: charlstm train --resume {result.run_dir}", highlight=False)
    else:
        console.print(f"sample with:   charlstm sample {result.run_dir}", highlight=False)


# --------------------------------------------------------------------------- the CLI's entry

def resume_configs(resume: Path, options: dict) -> tuple[ModelConfig, TrainConfig]:
    """The stored configs of the run to resume, with the options that may change applied.

    UsageError names any other option given with a different value.
    """
    path = ckpt_mod.resolve_checkpoint(resume, prefer="latest")
    config = ckpt_mod.verify_checkpoint(path)
    model_d, train_d = dict(config["model"]), dict(config["train"])
    changed = []
    for key, value in options.items():
        stored = model_d.get(key, train_d.get(key))
        if key in RESUMABLE_OPTIONS:
            train_d[key] = value
        elif key in ("out", "name"):
            continue
        elif stored != value:
            changed.append(f"--{key.replace('_', '-')}")
    if changed:
        raise UsageError(
            f"--resume continues a run with its own settings; {', '.join(changed)} cannot change "
            f"(only {', '.join('--' + o.replace('_', '-') for o in sorted(RESUMABLE_OPTIONS))} can). "
            "Use --init-from to start a new run from its weights"
        )
    return ModelConfig.from_dict(model_d), TrainConfig.from_dict(train_d)


def build_configs(options: dict, preset: str | None) -> tuple[ModelConfig, TrainConfig]:
    """ModelConfig and TrainConfig from CLI options over a preset over the defaults."""
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)} (got {preset!r})")
    merged = {**(PRESETS[preset] if preset else {}), **options}
    unknown = set(merged) - MODEL_FIELDS - TRAIN_FIELDS
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}")
    model_cfg = ModelConfig(**{k: v for k, v in merged.items() if k in MODEL_FIELDS})
    train_cfg = TrainConfig(**{k: v for k, v in merged.items() if k in TRAIN_FIELDS})
    return model_cfg, train_cfg


def _normalise_options(options: dict) -> dict:
    options = dict(options)
    if "max_time" in options:
        options["max_time"] = parse_duration(options["max_time"])
    if "out" in options and options["out"] is not None:
        options["out"] = str(options["out"])
    return options


def run_from_cli(options: dict, *, preset=None, resume=None, init_from=None, overwrite: bool = False,
                 progress: bool = True) -> TrainResult:
    """`charlstm train`: build the configs from the options and train. Returns the result."""
    options = _normalise_options(options)
    if resume is not None:
        if preset is not None:
            raise UsageError("--preset cannot be combined with --resume (the run keeps its own settings)")
        if init_from is not None:
            raise UsageError("--resume and --init-from cannot be combined: resume continues a run, init-from starts a new one")
        model_cfg, train_cfg = resume_configs(Path(resume), options)
    else:
        if init_from is not None:
            model_cfg, train_cfg = _init_from_configs(Path(init_from), options, preset)
        else:
            model_cfg, train_cfg = build_configs(options, preset)
    from . import distributed as dist_mod

    try:
        return train(model_cfg, train_cfg, resume=resume, init_from=init_from, progress=progress,
                     overwrite=overwrite, preset=preset)
    finally:
        dist_mod.shutdown()   # under torchrun: leave the process group (nothing otherwise)


def _init_from_configs(init_from: Path, options: dict, preset: str | None) -> tuple[ModelConfig, TrainConfig]:
    """For --init-from: the source's model architecture (options may not change it) and new training options."""
    path = ckpt_mod.resolve_checkpoint(init_from)
    config = ckpt_mod.verify_checkpoint(path)
    stored_model = dict(config["model"])
    arch = {k: v for k, v in options.items() if k in MODEL_FIELDS and k != "dropout"}
    clash = [f"--{k.replace('_', '-')}" for k, v in arch.items() if stored_model.get(k) != v]
    if clash:
        raise UsageError(f"--init-from keeps the architecture of {path}; {', '.join(clash)} cannot change")
    model_cfg, train_cfg = build_configs({k: v for k, v in options.items() if k not in MODEL_FIELDS or k == "dropout"},
                                         preset)
    model_d = {**stored_model, **({"dropout": options["dropout"]} if "dropout" in options else {})}
    return ModelConfig.from_dict(model_d), train_cfg

"""A training run as charlstm's commands start it: its configs (options over a preset over the defaults,
or the run to resume, or the checkpoint to start from) and a Trainer with the standard observers
(progress, notes, metrics.jsonl, curves, TensorBoard, the summary). `charlstm train` (train.py) and
compare-variants both train through :func:`train`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import checkpoint as ckpt_mod
from . import rundir
from .config import PRESETS, ModelConfig, TrainConfig
from .corpus import locate_data, same_source
from .errors import CharlstmError, UsageError
from .observers import Curves, EvalNotes, MetricsFile, TensorBoard, format_time, progress_observer
from .trainer import Observer, Trainer, TrainResult
from .trainer_state import LN2

# Options that may differ from the stored run when resuming (they do not change what a step computes).
RESUMABLE_OPTIONS = frozenset({
    "max_steps", "max_epochs", "max_time", "eval_every", "checkpoint_every", "keep",
    "device", "threads", "sample_chars", "log_every", "eval_chars", "tensorboard",
})

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: Path | None = None,
          init_from: Path | None = None, progress: bool = True, overwrite: bool = False,
          preset: str | None = None, next_steps: bool = True, fork_to: Path | None = None) -> TrainResult:
    """Train a model and write its run directory, showing what `charlstm train` shows; returns what happened.

    ``resume`` continues the run holding that checkpoint exactly (its configs
    must be passed in, see :func:`resume_configs`), or forks it into ``fork_to``;
    ``init_from`` starts from a checkpoint's weights with a fresh optimizer. ``next_steps`` ends the
    summary with the command to run next (resume or sample); callers that
    manage the run themselves (compare-variants) turn it off. Raises
    CharlstmError when the loss becomes NaN or infinite (the last good
    checkpoint is kept).
    """
    tensorboard = TensorBoard() if train_cfg.tensorboard else None   # without the package: an error now
    trainer = Trainer(model_cfg, train_cfg, resume=resume, init_from=init_from, overwrite=overwrite,
                      preset=preset, progress=progress, fork_to=fork_to)
    if trainer.ctx.is_main:   # rank 0 alone shows and logs
        if progress:
            trainer.add_observer(progress_observer())
        for observer in (EvalNotes(), MetricsFile(), Curves(), tensorboard, Summary(next_steps=next_steps)):
            if observer is not None:
                trainer.add_observer(observer)
    return trainer.run()


class Summary(Observer):
    """The summary table at the end of a run (not of a failed one)."""

    def __init__(self, next_steps: bool = True):
        self.next_steps = next_steps

    def on_end(self, trainer: Trainer, result: TrainResult | None) -> None:
        if result is not None:
            print_summary(result, trainer.model_cfg, next_steps=self.next_steps)


def print_summary(result: TrainResult, model_cfg: ModelConfig, next_steps: bool = True) -> None:
    """A rich table on stderr: losses, parameters, time, speed, where the checkpoints are."""
    console = Console(stderr=True)
    title = "training interrupted" if result.interrupted else f"training finished ({result.stopped_by})"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()

    def fmt_loss(v):
        return "-" if v is None else f"{v:.4f} nats/char  ({v / LN2:.4f} bpc)"

    table.add_row("model", f"{model_cfg.variant} ({model_cfg.backend}), {model_cfg.layers} x {model_cfg.hidden}, "
                           f"embedding {model_cfg.embed}, {result.params:,} parameters")
    if result.layers_run_by:
        table.add_row("layers run by", result.layers_run_by)
    table.add_row("steps", f"{result.steps:,} ({result.epochs:.2f} epochs)")
    table.add_row("final train loss", "-" if result.train_loss is None else f"{result.train_loss:.4f} nats/char")
    table.add_row("val loss", fmt_loss(result.val_loss))
    table.add_row("best val loss", fmt_loss(result.best_val_loss))
    table.add_row("training time",
                  f"{format_time(result.train_time)} ({result.wall_time:.0f} s with evaluation and saving)")
    table.add_row("speed", f"{result.chars_per_sec:,.0f} chars/s")
    table.add_row("run directory", str(result.run_dir))
    if result.best_checkpoint is not None:
        table.add_row("best checkpoint", str(result.best_checkpoint))
    if result.last_checkpoint is not None:
        table.add_row("latest checkpoint", str(result.last_checkpoint))
    curves = result.run_dir / f"{rundir.CURVES}.png"
    if curves.is_file():
        table.add_row("curves", f"{curves} (and .svg)")
    if (result.run_dir / rundir.TENSORBOARD).is_dir():
        table.add_row("tensorboard", f"tensorboard --logdir {result.run_dir / rundir.TENSORBOARD}")
    console.print(table)
    if not next_steps:
        return
    if result.interrupted:
        console.print(f"continue with: charlstm train --resume {result.run_dir}", highlight=False)
    else:
        console.print(f"sample with:   charlstm sample {result.run_dir}", highlight=False)


# --------------------------------------------------------------------------- configs and the command

def resume_configs(resume: Path, options: dict) -> tuple[ModelConfig, TrainConfig]:
    """The stored configs of the run to resume, with the options that may change applied.

    UsageError names any other option given with a different value.
    """
    path = ckpt_mod.resume_checkpoint(resume)
    config = ckpt_mod.verify_checkpoint(path)
    try:
        model_d, train_d = dict(config["model"]), dict(config["train"])
    except (KeyError, TypeError, ValueError) as e:
        raise CharlstmError(f"checkpoint {path} is damaged: its config.json has no model and train settings "
                            f"({type(e).__name__}: {e})") from None
    changed = []
    for key, value in options.items():
        stored = model_d.get(key, train_d.get(key))
        if key in RESUMABLE_OPTIONS:
            train_d[key] = value
        elif key in ("out", "name"):
            continue
        elif key == "data" and same_source(config.get("corpus"), value):
            train_d["data"] = value        # the run's data by another path: the sha256 decides
        elif stored != value:
            changed.append(f"--{key.replace('_', '-')}")
    if "data" not in options:
        train_d["data"] = locate_data(train_d["data"], config.get("corpus"))
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


def configs_from_options(options: dict, *, preset: str | None = None, resume: Path | None = None,
                         init_from: Path | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The (ModelConfig, TrainConfig) `charlstm train` runs with: the options over the preset over the
    defaults, the stored configs of a run to resume with the options that may change, or for
    --init-from the source's architecture with new training options."""
    if resume is not None:
        if preset is not None:
            raise UsageError("--preset cannot be combined with --resume (the run keeps its own settings)")
        if init_from is not None:
            raise UsageError("--resume and --init-from cannot be combined: "
                             "resume continues a run, init-from starts a new one")
        return resume_configs(Path(resume), options)
    if init_from is not None:
        return init_from_configs(Path(init_from), options, preset)
    return build_configs(options, preset)


def init_from_configs(init_from: Path, options: dict, preset: str | None) -> tuple[ModelConfig, TrainConfig]:
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

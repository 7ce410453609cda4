"""`charlstm train`: the options (with --max-time as a duration) to configs, then a training run with
what the command shows and writes (training.py); under torchrun each process leaves its group at the end."""

from __future__ import annotations

from pathlib import Path

from . import distributed as dist_mod
from .config import parse_duration
from .trainer import TrainResult
from .training import configs_from_options, train


def run_from_cli(options: dict, *, preset=None, resume=None, init_from=None, overwrite: bool = False,
                 progress: bool = True) -> TrainResult:
    """`charlstm train`: build the configs from the options and train. Returns the result."""
    options = dict(options)
    if "max_time" in options:
        options["max_time"] = parse_duration(options["max_time"])
    if options.get("out") is not None:
        options["out"] = str(options["out"])
    model_cfg, train_cfg = configs_from_options(options, preset=preset, resume=resume, init_from=init_from)
    fork_to = None
    if resume is not None and (options.get("out") or options.get("name")):   # another directory: a fork
        fork_to = Path(options["out"]) if options.get("out") else Path("checkpoints") / options["name"]
    try:
        return train(model_cfg, train_cfg, resume=resume, init_from=init_from, progress=progress,
                     overwrite=overwrite, preset=preset, fork_to=fork_to)
    finally:
        dist_mod.shutdown()   # under torchrun: leave the process group (nothing otherwise)

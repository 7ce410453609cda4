"""A comparison's settings from the command line's options, and the model sizes they imply.

``CompareConfig`` (config.py) holds the defaults and help; this module fills in the
task's defaults, splits the options among CompareConfig, ModelConfig and
TrainConfig, and finds the hidden sizes of ``--match-params``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import TASKS, CompareConfig, ModelConfig, TrainConfig, parse_duration, parse_list
from ..errors import UsageError
from ..model import build_model
from ..native.loops import WIDTH as NATIVE_WIDTH
from ..registry import spec_for

REFERENCE_VARIANT = "lstm"   # --match-params sizes every variant to an lstm of --hidden units
MATCH_TOLERANCE = 0.02       # parameter counts within 2% of the reference


def settings_from_options(options: dict) -> CompareConfig:
    """The CompareConfig of the options given ({field: value}; None or absent: the task's default).

    List options and --max-time may be given as text ('rnn,lstm', '1,2', '90s').
    """
    opts = {k: v for k, v in options.items() if v is not None}
    task = opts.get("task", "corpus")
    if task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)} (got {task!r})")
    if task == "long-gap":
        given = [f"--{k.replace('_', '-')}" for k in CompareConfig.CORPUS_ONLY if k in opts]
        if given:
            raise UsageError(f"the long-gap task does not use {', '.join(given)} (its sequences are G + 2 long "
                             "and it trains at a constant --lr); leave them out")
    for key, kind in (("variants", "names"), ("seeds", "ints"), ("gaps", "ints")):
        if isinstance(opts.get(key), str):
            opts[key] = parse_list(opts[key], f"--{key}", kind)
    if "variants" in opts:
        opts["variants"] = [v.lower() for v in opts["variants"]]
    if isinstance(opts.get("max_time"), str):
        opts["max_time"] = parse_duration(opts["max_time"])
    defaults = dict(CompareConfig.TASK_DEFAULTS[task])
    if "max_time" in opts:
        defaults.pop("max_steps", None)  # --max-time alone is the whole budget: no default step budget
    merged = {**defaults, **opts}
    model = {k: merged.pop(k) for k in list(merged) if k in CompareConfig.MODEL_OPTIONS}
    train = {k: merged.pop(k) for k in list(merged) if k in CompareConfig.TRAIN_OPTIONS}
    unknown = set(merged) - {f.name for f in dataclasses.fields(CompareConfig)}
    if unknown:
        raise UsageError(f"unknown comparison options: {', '.join(sorted(unknown))}")
    return CompareConfig(**merged, model=ModelConfig(**model), train=TrainConfig(**train))


def threads_per_job(settings: CompareConfig) -> int | None:
    """CPU threads for each of the --jobs processes (the total split evenly, at least 1)."""
    if settings.jobs == 1:
        return settings.train.threads
    total = settings.train.threads or torch.get_num_threads()
    return max(1, total // settings.jobs)


# --------------------------------------------------------------------------- matched parameter counts

def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model ``cfg`` builds (built without allocating memory where possible)."""
    try:
        with torch.device("meta"):
            return build_model(cfg).num_parameters()
    except (RuntimeError, NotImplementedError, TypeError):  # a module that cannot live on meta
        return build_model(cfg).num_parameters()


def matched_hidden(cfg: ModelConfig, target: int, *, width: int = 1, limit: int = 1 << 16) -> tuple[int, int]:
    """The hidden size whose model's parameter count is closest to ``target``: (hidden, params).

    Parameter counts grow with H, so a doubling search brackets the target and a
    bisection finds the two sizes around it; the closer of the two wins. With ``width`` > 1, the
    closest multiple of ``width`` instead where it is within MATCH_TOLERANCE of the target (the
    native loops take H in multiples of 8; another size would run on the slower torch loops).
    """
    def params(h: int) -> int:
        return count_parameters(dataclasses.replace(cfg, hidden=h))

    lo, hi = 1, 1
    while params(hi) < target:
        lo, hi = hi, hi * 2
        if hi > limit:
            raise UsageError(f"cannot reach {target} parameters with a {cfg.variant} of at most {limit} units")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if params(mid) < target:
            lo = mid
        else:
            hi = mid
    _, best = min((abs(params(h) - target), h) for h in (lo, hi))
    if width > 1 and best % width:
        below = best - best % width
        off, aligned = min((abs(params(h) - target), h) for h in (below, below + width) if h > 0)
        if off <= MATCH_TOLERANCE * target:
            best = aligned
    return best, params(best)


def reference_parameters(settings: CompareConfig, vocab_size: int) -> int:
    """Parameters of the reference model (an lstm of --hidden units)."""
    return count_parameters(settings.model_config(REFERENCE_VARIANT, vocab_size=vocab_size))


def match_parameters(settings: CompareConfig, vocab_size: int) -> dict[str, tuple[int, int]]:
    """--match-params: {variant: (hidden, params)} with every count within 2% of an lstm of --hidden.

    UsageError when a variant cannot get that close (tiny models, where one unit is over 2%).
    """
    target = reference_parameters(settings, vocab_size)
    sizes = {}
    for variant in settings.variants:
        if variant == REFERENCE_VARIANT:
            sizes[variant] = (settings.model.hidden, target)
            continue
        cfg = settings.model_config(variant, vocab_size=vocab_size)
        width = NATIVE_WIDTH if spec_for(cfg).kernel is not None else 1   # a size the native loops run
        hidden, params = matched_hidden(cfg, target, width=width)
        if abs(params - target) > MATCH_TOLERANCE * target:
            raise UsageError(
                f"--match-params: the closest {variant} ({hidden} units, {params} parameters) is more than "
                f"{MATCH_TOLERANCE:.0%} away from the lstm's {target}; use a larger --hidden"
            )
        sizes[variant] = (hidden, params)
    return sizes

"""`charlstm compare-variants`: several cells under one budget, side by side.

Two tasks:

- ``corpus`` (default): every variant is trained on the same corpus, split,
  seeds and budget through ``train.train``, each run in its own run directory
  under the comparison's directory; the result is a table of validation loss
  (nats/char and bits/char), speed and size, a CSV, a JSON and learning curves.
- ``long-gap``: the synthetic recall task of :mod:`charlstm.longgap`, one run
  per variant, gap and seed; the result is recall accuracy against chance.

A comparison directory holds one directory per run and, when the run has
finished, its ``result.json`` (written atomically, last). Running the same
command again reads the finished runs instead of training them, continues an
interrupted corpus run from its latest checkpoint, and trains the rest; a run
whose stored settings differ from the command's is an error, never
overwritten. ``--jobs N`` trains N runs at a time in spawned processes, each
with its share of the CPU threads.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import VARIANTS, ModelConfig, TrainConfig, parse_duration
from .errors import CharlstmError, UsageError

TASKS = ("corpus", "long-gap")
DEFAULT_VARIANTS = VARIANTS  # rnn, lstm, peephole, coupled, gru
REFERENCE_VARIANT = "lstm"   # --match-params sizes every variant to an lstm of --hidden units
MATCH_TOLERANCE = 0.02       # parameter counts within 2% of the reference
RESULT_FILE = "result.json"
LN2 = math.log(2.0)

# Defaults that differ between the tasks (None on the command line means "the task's default").
TASK_DEFAULTS = {
    "corpus": {"hidden": 256, "layers": 2, "embed": 64, "seq_len": 128, "batch_size": 32, "max_steps": 500},
    "long-gap": {"hidden": 64, "layers": 1, "embed": 16, "seq_len": None, "batch_size": 32, "max_steps": 1000},
}


# --------------------------------------------------------------------------- settings

@dataclass
class CompareSettings:
    """Everything a comparison is defined by (the command line, with task defaults filled in)."""

    task: str = "corpus"
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [1])
    gaps: list[int] = field(default_factory=lambda: [5, 20, 50, 100])
    num_keys: int = 8
    num_distractors: int = 8
    eval_size: int = 1000
    match_params: bool = False
    data: str = "pystdlib"
    val_frac: float = 0.1
    # model
    hidden: int = 256
    layers: int = 2
    embed: int = 64
    dropout: float = 0.0
    backend: str = "auto"
    peephole_form: str = "diag"
    peepholes: str = "fio"
    gru_form: str = "cudnn"
    init: str = "uniform"
    forget_bias: float = 1.0
    # training
    seq_len: int | None = None    # corpus only (the task default fills it in)
    batch_size: int = 32
    lr: float = 3e-3
    schedule: str | None = None
    warmup: int | None = None
    clip: float = 1.0
    max_steps: int | None = 500
    max_time: float | None = None
    eval_every: int | None = None
    # execution (not part of what a run's result depends on)
    jobs: int = 1
    threads: int | None = None
    device: str = "auto"
    out: Path | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"--task must be one of {', '.join(TASKS)} (got {self.task!r})")
        if not self.variants:
            raise UsageError("--variants needs at least one variant")
        for v in self.variants:
            if v not in VARIANTS:
                raise UsageError(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise UsageError("--variants lists a variant twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("--seeds needs one or more distinct integers, e.g. 1,2,3")
        if self.task == "long-gap" and (not self.gaps or len(set(self.gaps)) != len(self.gaps)):
            raise UsageError("--gaps needs one or more distinct integers, e.g. 5,20,50,100")
        if self.max_steps is None and self.max_time is None:
            raise UsageError("a comparison needs a budget: --max-steps and/or --max-time")
        if self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1 (got {self.jobs})")
        if self.eval_size < 1:
            raise UsageError(f"--eval-size must be >= 1 (got {self.eval_size})")
        if self.eval_every is not None and self.eval_every < 1:
            raise UsageError(f"--eval-every must be >= 1 (got {self.eval_every})")
        if self.batch_size < 1 or self.lr <= 0 or self.clip < 0:
            raise UsageError("--batch-size must be >= 1, --lr > 0 and --clip >= 0")
        if self.task == "long-gap":
            given = [f"--{k.replace('_', '-')}" for k in ("seq_len", "schedule", "warmup") if getattr(self, k) is not None]
            if given:
                raise UsageError(f"the long-gap task does not use {', '.join(given)} (its sequences are G + 2 long "
                                 "and it trains at a constant --lr); leave them out")
        if self.out is None:
            self.out = Path("checkpoints") / default_name(self)
        self.out = Path(self.out)

    def model_config(self, variant: str, hidden: int | None = None, vocab_size: int = 0) -> ModelConfig:
        """The ModelConfig of one variant (``hidden`` overrides --hidden, e.g. under --match-params)."""
        return ModelConfig(
            vocab_size=vocab_size, variant=variant, backend=self.backend, embed=self.embed,
            hidden=hidden or self.hidden, layers=self.layers, dropout=self.dropout,
            peephole_form=self.peephole_form, peepholes=self.peepholes, gru_form=self.gru_form,
            forget_bias=self.forget_bias, init=self.init,
        )

    def threads_per_job(self) -> int | None:
        """CPU threads for each of the --jobs processes (the total split evenly, at least 1)."""
        if self.jobs == 1:
            return self.threads
        total = self.threads or torch.get_num_threads()
        return max(1, total // self.jobs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


def settings_from_options(options: dict) -> CompareSettings:
    """Build the settings from the CLI's options (None means the task's default)."""
    renamed = {"keys": "num_keys", "distractors": "num_distractors"}
    opts = {renamed.get(k, k): v for k, v in options.items() if v is not None}
    task = opts.get("task", "corpus")
    if task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)} (got {task!r})")
    if "max_time" in opts:
        opts["max_time"] = parse_duration(opts["max_time"])
    for key, value in TASK_DEFAULTS[task].items():
        if key == "max_steps" and "max_time" in opts:
            opts.setdefault("max_steps", None)  # --max-time alone is the whole budget: no default step budget
            continue
        opts.setdefault(key, value)
    for key in ("variants", "seeds", "gaps"):
        if isinstance(opts.get(key), str):
            opts[key] = parse_list(opts[key], key, int if key != "variants" else str)
    if "out" in opts:
        opts["out"] = Path(opts["out"])
    known = {f.name for f in dataclasses.fields(CompareSettings)}
    unknown = set(opts) - known
    if unknown:
        raise UsageError(f"unknown comparison options: {', '.join(sorted(unknown))}")
    return CompareSettings(**opts)


def parse_list(text: str, name: str, kind=str) -> list:
    """'a,b, c' -> ['a', 'b', 'c'] (ints for kind=int); UsageError naming the option otherwise."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{name} needs a comma-separated list")
    if kind is int:
        try:
            return [int(t) for t in items]
        except ValueError:
            raise UsageError(f"--{name} takes comma-separated integers, e.g. 1,2,3 (got {text!r})") from None
    return [t.lower() for t in items]


def default_name(s: CompareSettings) -> str:
    """The comparison's directory name under checkpoints/ when --out is not given."""
    if s.task == "long-gap":
        return "compare-long-gap"
    data = Path(s.data).stem if ("/" in s.data or os.sep in s.data or "." in s.data) else s.data
    return f"compare-{data}"


# --------------------------------------------------------------------------- matched parameter counts

def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model ``cfg`` builds (built without allocating memory where possible)."""
    from .model import build_model

    try:
        with torch.device("meta"):
            return build_model(cfg).num_parameters()
    except (RuntimeError, NotImplementedError, TypeError):  # a module that cannot live on meta
        return build_model(cfg).num_parameters()


def matched_hidden(cfg: ModelConfig, target: int, *, limit: int = 1 << 16) -> tuple[int, int]:
    """The hidden size whose model's parameter count is closest to ``target``: (hidden, params).

    Parameter counts grow with H, so a doubling search brackets the target and a
    bisection finds the two sizes around it; the closer of the two wins.
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
    candidates = [(abs(params(h) - target), h) for h in (lo, hi)]
    _, best = min(candidates)
    return best, params(best)


def match_parameters(settings: CompareSettings, vocab_size: int) -> dict[str, tuple[int, int]]:
    """--match-params: {variant: (hidden, params)} with every count within 2% of an lstm of --hidden.

    UsageError when a variant cannot get that close (tiny models, where one unit is over 2%).
    """
    reference_cfg = settings.model_config(REFERENCE_VARIANT, vocab_size=vocab_size)
    target = count_parameters(reference_cfg)
    sizes = {}
    for variant in settings.variants:
        cfg = settings.model_config(variant, vocab_size=vocab_size)
        if variant == REFERENCE_VARIANT:
            sizes[variant] = (settings.hidden, target)
            continue
        hidden, params = matched_hidden(cfg, target)
        if abs(params - target) > MATCH_TOLERANCE * target:
            raise UsageError(
                f"--match-params: the closest {variant} ({hidden} units, {params} parameters) is more than "
                f"{MATCH_TOLERANCE:.0%} away from the lstm's {target}; use a larger --hidden"
            )
        sizes[variant] = (hidden, params)
    return sizes


def reference_parameters(settings: CompareSettings, vocab_size: int) -> int:
    """Parameters of the reference model (an lstm of --hidden units)."""
    return count_parameters(settings.model_config(REFERENCE_VARIANT, vocab_size=vocab_size))


# --------------------------------------------------------------------------- describing a variant

def describe_form(cfg: ModelConfig) -> str:
    """Backend and form of a (backend-resolved) config, e.g. 'custom, diag fio' or 'cudnn, chrono'."""
    parts = [cfg.backend]
    if cfg.variant == "peephole":
        parts.append(f"{cfg.peephole_form} {cfg.peepholes or '-'}")
    elif cfg.variant == "gru":
        parts.append(f"{cfg.gru_form} form")
    if cfg.init == "chrono":
        parts.append("chrono")
    elif cfg.variant in ("lstm", "peephole", "coupled") and cfg.forget_bias != 1.0:
        parts.append(f"forget bias {cfg.forget_bias:g}")
    return ", ".join(parts)


def resolved_config(cfg: ModelConfig) -> ModelConfig:
    """The config with its backend resolved to 'cudnn' or 'custom' (as the built model has it)."""
    from .model import resolve_backend

    return dataclasses.replace(cfg, backend=resolve_backend(cfg))


# --------------------------------------------------------------------------- runs and their results

def _jsonable(obj):
    """The object as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(obj, default=str))


def read_finished(run_dir: Path, fingerprint: dict) -> dict | None:
    """A finished run's stored result, None when the run has not finished.

    CharlstmError when the directory holds a finished run with other settings:
    reusing it would mix two experiments, deleting it would destroy a user's run.
    """
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CharlstmError(f"{path} is damaged ({e}); move it away to train that run again") from None
    if stored.get("fingerprint") != _jsonable(fingerprint):
        diff = _differences(stored.get("fingerprint") or {}, _jsonable(fingerprint))
        raise CharlstmError(
            f"{run_dir} holds a finished run with different settings ({'; '.join(diff) or 'unreadable'}); "
            "pass another --out, or move that directory away"
        )
    return stored


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def write_result(run_dir: Path, result: dict) -> None:
    """Store a finished run's result atomically (readers see no file or the whole file)."""
    from .checkpoint import write_text_atomic

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(run_dir) / RESULT_FILE, json.dumps(result, indent=1, allow_nan=True) + "\n")


def _fingerprint(kind: str, **parts) -> dict:
    return _jsonable({"kind": kind, **parts})


def plan_runs(settings: CompareSettings, vocab_size: int, hidden_sizes: dict[str, tuple[int, int]] | None) -> list[dict]:
    """One picklable spec per run: where it lives, what it trains, what its result depends on."""
    specs = []
    out = settings.out
    if settings.task == "corpus":
        for variant in settings.variants:
            hidden = hidden_sizes[variant][0] if hidden_sizes else settings.hidden
            model_cfg = settings.model_config(variant, hidden, vocab_size)
            for seed in settings.seeds:
                train_cfg = corpus_train_config(settings, seed)
                run_dir = out / f"{variant}-seed{seed}"
                train_cfg.out = str(run_dir)
                train_cfg.name = run_dir.name
                fp = _fingerprint(
                    "corpus", model=model_cfg.to_dict(),
                    train={k: v for k, v in train_cfg.to_dict().items() if k not in ("device", "threads", "out", "name")},
                )
                specs.append({
                    "kind": "corpus", "variant": variant, "seed": seed, "gap": None,
                    "run_dir": str(run_dir), "label": f"{variant} seed {seed}",
                    "model_cfg": model_cfg.to_dict(), "train_cfg": train_cfg.to_dict(), "fingerprint": fp,
                })
    else:
        from .longgap import LongGapTask

        for gap in settings.gaps:
            task = LongGapTask(gap=gap, num_keys=settings.num_keys, num_distractors=settings.num_distractors)
            for variant in settings.variants:
                hidden = hidden_sizes[variant][0] if hidden_sizes else settings.hidden
                model_cfg = settings.model_config(variant, hidden, task.vocab_size)
                if model_cfg.init == "chrono":
                    model_cfg.chrono_tmax = task.seq_len  # the longest dependency is the whole sequence
                for seed in settings.seeds:
                    run_dir = out / f"gap{gap}" / f"{variant}-seed{seed}"
                    params = {
                        "gap": gap, "num_keys": settings.num_keys, "num_distractors": settings.num_distractors,
                        "seed": seed, "max_steps": settings.max_steps, "max_time": settings.max_time,
                        "batch_size": settings.batch_size, "lr": settings.lr, "clip": settings.clip,
                        "eval_size": settings.eval_size, "eval_every": long_gap_eval_every(settings),
                    }
                    fp = _fingerprint("long-gap", model=model_cfg.to_dict(), task=params)
                    specs.append({
                        "kind": "long-gap", "variant": variant, "seed": seed, "gap": gap,
                        "run_dir": str(run_dir), "label": f"{variant} gap {gap} seed {seed}",
                        "model_cfg": model_cfg.to_dict(), "task": params, "fingerprint": fp,
                    })
    for variant in settings.variants:
        resolved_config(settings.model_config(variant, vocab_size=vocab_size))  # an impossible backend fails now, not mid-way
    for spec in specs:
        spec["device"] = settings.device
        spec["threads"] = settings.threads_per_job()
    return specs


def corpus_train_config(settings: CompareSettings, seed: int) -> TrainConfig:
    """The TrainConfig of one corpus run (the same for every variant)."""
    kwargs = {
        "data": settings.data, "val_frac": settings.val_frac, "seq_len": settings.seq_len or TrainConfig.seq_len,
        "batch_size": settings.batch_size, "lr": settings.lr, "clip": settings.clip,
        "max_steps": settings.max_steps, "max_time": settings.max_time, "seed": seed,
        "device": settings.device, "threads": settings.threads_per_job(),
    }
    kwargs["eval_every"] = settings.eval_every or corpus_eval_every(settings)
    kwargs["checkpoint_every"] = kwargs["eval_every"]
    kwargs["keep"] = 1
    kwargs["sample_chars"] = 0  # no text samples at each evaluation: the comparison prints a table
    if settings.schedule is not None:
        kwargs["schedule"] = settings.schedule
    if settings.warmup is not None:
        kwargs["warmup"] = settings.warmup
    return TrainConfig(**kwargs)


def corpus_eval_every(settings: CompareSettings) -> int:
    """Evaluation cadence for learning curves: about 10 points under a step budget, else every 100 steps."""
    if settings.max_steps:
        return max(1, settings.max_steps // 10)
    return 100


def long_gap_eval_every(settings: CompareSettings) -> int:
    if settings.eval_every:
        return settings.eval_every
    if settings.max_steps:
        return max(1, settings.max_steps // 10)
    return 100


def execute_run(spec: dict, progress: bool = True) -> dict:
    """Train one run of a comparison and store its result.json; return the result.

    Runs in the calling process or in a spawned worker (``spec`` is plain data).
    """
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    # Anything a trainer prints goes to stderr: stdout carries only the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        if spec["kind"] == "corpus":
            result = _execute_corpus_run(spec, progress)
        else:
            result = _execute_long_gap_run(spec, progress)
    result.update({
        "variant": spec["variant"], "seed": spec["seed"], "gap": spec["gap"],
        "run_dir": spec["run_dir"], "fingerprint": spec["fingerprint"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    write_result(Path(spec["run_dir"]), result)
    return result


def _execute_long_gap_run(spec: dict, progress: bool) -> dict:
    from .checkpoint import save_checkpoint
    from .corpus import Vocab
    from .longgap import LongGapTask, train_long_gap

    p = spec["task"]
    task = LongGapTask(gap=p["gap"], num_keys=p["num_keys"], num_distractors=p["num_distractors"])
    model_cfg = ModelConfig.from_dict(spec["model_cfg"])
    result, model = train_long_gap(
        task, model_cfg, seed=p["seed"], max_steps=p["max_steps"], max_time=p["max_time"],
        batch_size=p["batch_size"], lr=p["lr"], clip=p["clip"], eval_size=p["eval_size"],
        eval_every=p["eval_every"], device=spec["device"], progress=progress, desc=spec["label"],
    )
    # Keep the trained model as an ordinary checkpoint (charlstm info / sample read it).
    train_cfg = TrainConfig(
        data="long-gap", seq_len=task.seq_len, batch_size=p["batch_size"], lr=p["lr"], clip=p["clip"],
        schedule="constant", warmup=0, max_steps=p["max_steps"], max_time=p["max_time"], seed=p["seed"],
        device=spec["device"], keep=1,
    )
    corpus_meta = {
        "name": "long-gap", "source": f"synthetic recall task: {task.num_keys} keys, gap {task.gap}",
        "sha256": "", "n_chars": 0, "vocab_size": task.vocab_size,
    }
    save_checkpoint(
        Path(spec["run_dir"]), step=result.steps, model=model, optimizer=None,
        model_cfg=model.cfg, train_cfg=train_cfg, vocab=Vocab(task.chars), corpus_meta=corpus_meta,
        trainer_state={"step": result.steps, "metrics": result.to_dict()}, is_best=True, keep=1,
        extra_config={"long_gap": p},
    )
    out = result.to_dict()
    out["form"] = describe_form(model.cfg)
    out["hidden"] = model.cfg.hidden
    return out


def _execute_corpus_run(spec: dict, progress: bool) -> dict:
    """Train (or continue) one corpus run through ``train.train``; its result with the val-loss curve."""
    from . import checkpoint as ckpt_mod
    from . import train as train_mod

    run_dir = Path(spec["run_dir"])
    model_cfg = ModelConfig.from_dict(spec["model_cfg"])
    train_cfg = TrainConfig.from_dict(spec["train_cfg"])
    resume, overwrite = None, False
    if run_dir.is_dir() and ckpt_mod.list_checkpoints(run_dir):
        # An interrupted run: continue it exactly, after checking it is this comparison's run.
        stored_model, stored_train = train_mod.resume_configs(run_dir, {})
        check_stored_run(run_dir, spec, stored_model, stored_train)
        resume = run_dir
        model_cfg, train_cfg = stored_model, dataclasses.replace(
            stored_train, device=train_cfg.device, threads=train_cfg.threads)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        overwrite = True  # stopped before its first checkpoint: start it again (only charlstm's files go)
    result = train_mod.train(model_cfg, train_cfg, resume=resume, progress=progress, overwrite=overwrite,
                             next_steps=False)  # compare-variants says itself how to continue
    if result.interrupted:
        raise KeyboardInterrupt
    curve = read_val_curve(run_dir / "metrics.jsonl")
    best = result.best_val_loss
    final = result.val_loss
    if final is None and curve:
        final = curve[-1]["val_loss"]
    if best is None and curve:
        best = min(c["val_loss"] for c in curve)
    return {
        "form": describe_form(model_cfg_of_run(run_dir, model_cfg)),
        "hidden": model_cfg.hidden,
        "params": result.params,
        "best_val_loss": best,
        "final_val_loss": final,
        "best_val_bpc": None if best is None else best / LN2,
        "final_val_bpc": None if final is None else final / LN2,
        "train_loss": result.train_loss,
        "steps": result.steps,
        "epochs": result.epochs,
        "train_time": result.train_time,
        "wall_time": result.wall_time,
        "chars_per_sec": result.chars_per_sec,
        "stopped_by": result.stopped_by,
        "resumed": resume is not None,
        "curve": curve,
    }


def model_cfg_of_run(run_dir: Path, fallback: ModelConfig) -> ModelConfig:
    """The (backend-resolved) ModelConfig stored in a run's latest checkpoint."""
    from . import checkpoint as ckpt_mod

    try:
        path = ckpt_mod.resolve_checkpoint(run_dir, prefer="latest")
        return ModelConfig.from_dict(ckpt_mod.verify_checkpoint(path)["model"])
    except CharlstmError:
        return resolved_config(fallback)


def check_stored_run(run_dir: Path, spec: dict, stored_model: ModelConfig, stored_train: TrainConfig) -> None:
    """CharlstmError unless an interrupted run in ``run_dir`` was started with this comparison's settings."""
    planned = ModelConfig.from_dict(spec["model_cfg"])
    planned = resolved_config(planned)
    if planned.init == "chrono" and planned.chrono_tmax == 0:
        planned.chrono_tmax = spec["train_cfg"]["seq_len"]
    stored = stored_model.to_dict()
    diffs = [k for k, v in planned.to_dict().items() if k != "vocab_size" and stored.get(k) != v]
    ignore = {"device", "threads", "out", "name"}
    stored_t = stored_train.to_dict()
    diffs += [k for k, v in spec["train_cfg"].items() if k not in ignore and stored_t.get(k) != v]
    if diffs:
        raise CharlstmError(
            f"{run_dir} holds an unfinished run with different settings ({', '.join(sorted(diffs))}); "
            "pass another --out, or move that directory away"
        )


def read_val_curve(path: Path) -> list[dict]:
    """The validation points of a metrics.jsonl: [{step, time (training seconds), val_loss}]."""
    curve = []
    if not Path(path).is_file():
        return curve
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("val_loss") is not None:
            curve.append({"step": rec["step"], "time": rec.get("elapsed"), "val_loss": rec["val_loss"]})
    return curve


# --------------------------------------------------------------------------- running many runs

def run_all(specs: list[dict], settings: CompareSettings, *, progress: bool = True) -> dict[str, dict]:
    """Train every unfinished run (one after another, or --jobs at a time); {run_dir: result}.

    Finished runs are read back, not retrained. On Ctrl-C the finished runs stay
    on disk and a message says how to continue.
    """
    results: dict[str, dict] = {}
    todo = []
    for spec in specs:
        stored = read_finished(Path(spec["run_dir"]), spec["fingerprint"])
        if stored is not None:
            results[spec["run_dir"]] = stored
        else:
            todo.append(spec)
    if results:
        _say(progress=True, message=f"{len(results)} of {len(specs)} runs already finished in {settings.out}; "
             f"{'training the other ' + str(len(todo)) if todo else 'nothing to train'}")
    try:
        if settings.jobs == 1 or len(todo) <= 1:
            for i, spec in enumerate(todo, 1):
                _say(f"[{i}/{len(todo)}] {spec['label']} -> {spec['run_dir']}", progress)
                results[spec["run_dir"]] = execute_run(spec, progress=progress)
        else:
            _run_parallel(todo, settings.jobs, results, progress)
    except KeyboardInterrupt:
        done = sum(1 for s in specs if (Path(s["run_dir"]) / RESULT_FILE).is_file())
        print(f"interrupted: {done} of {len(specs)} runs finished and kept in {settings.out}; "
              "run the same command again to continue", file=sys.stderr)
        raise
    return results


def _run_parallel(todo: list[dict], jobs: int, results: dict, progress: bool) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    ctx = multiprocessing.get_context("spawn")
    bar = tqdm(total=len(todo), desc=f"runs ({jobs} at a time)", unit="run", disable=not progress, file=sys.stderr)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    try:
        pending = {pool.submit(execute_run, spec, False): spec for spec in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                spec = pending.pop(fut)
                try:
                    results[spec["run_dir"]] = fut.result()
                except CharlstmError:
                    raise
                except Exception as e:  # a worker that died is reported with its run
                    raise CharlstmError(f"run {spec['label']} failed: {type(e).__name__}: {e}") from e
                bar.update(1)
                bar.set_postfix_str(spec["label"])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr)


# --------------------------------------------------------------------------- summaries

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    if len(vals) == 1:
        return vals[0], 0.0
    return statistics.fmean(vals), statistics.stdev(vals)


def format_pm(mean: float, std: float, n: int, digits: int = 3) -> str:
    """'1.234' for one seed, '1.234 ± 0.012' for several."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if n <= 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------- the entry point

def run_from_cli(*, json_out: bool = False, no_plot: bool = False, no_progress: bool = False, **options) -> dict:
    """`charlstm compare-variants`: build the settings, train what is missing, report; returns the summary."""
    settings = settings_from_options(options)
    progress = not no_progress
    if settings.task == "long-gap":
        summary = compare_long_gap(settings, progress=progress, plot=not no_plot)
    else:
        summary = compare_corpus(settings, progress=progress, plot=not no_plot)
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        print_table(summary)
    report_files(summary)
    return summary


def print_table(summary: dict) -> None:
    """The rich table on stdout."""
    from rich.console import Console

    table = long_gap_table(summary) if summary["task"] == "long-gap" else corpus_table(summary)
    console = Console(file=sys.stdout)
    if not console.is_terminal:
        # Into a file or a pipe: as wide as the table needs, never wrapped cells.
        needed = Console(file=io.StringIO(), width=1000).measure(table).maximum
        console = Console(file=sys.stdout, width=max(needed, 80))
    console.print(table)


def report_files(summary: dict) -> None:
    """Where the files went, and how to get plots when matplotlib is missing (stderr)."""
    for name, path in summary["files"].items():
        print(f"{name}: {path}", file=sys.stderr)
    if summary.get("plot_message"):
        print(summary["plot_message"], file=sys.stderr)


# --------------------------------------------------------------------------- long-gap task

def compare_long_gap(settings: CompareSettings, *, progress: bool = True, plot: bool = True) -> dict:
    """Train (or read back) every variant at every gap and seed; write and return the summary."""
    from .longgap import LongGapTask

    task0 = LongGapTask(gap=settings.gaps[0], num_keys=settings.num_keys, num_distractors=settings.num_distractors)
    hidden_sizes = match_parameters(settings, task0.vocab_size) if settings.match_params else None
    settings.out.mkdir(parents=True, exist_ok=True)
    specs = plan_runs(settings, task0.vocab_size, hidden_sizes)
    results = run_all(specs, settings, progress=progress)
    runs = [results[s["run_dir"]] for s in specs]

    rows = []
    for variant in settings.variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "form": mine[0]["form"], "hidden": mine[0]["hidden"],
               "params": mine[0]["params"], "gaps": {}}
        for gap in settings.gaps:
            at_gap = [r for r in mine if r["gap"] == gap]
            acc_mean, acc_std = mean_std([r["accuracy"] for r in at_gap])
            best_mean, _ = mean_std([r["best_accuracy"] for r in at_gap])
            row["gaps"][str(gap)] = {
                "accuracy_mean": acc_mean, "accuracy_std": acc_std, "best_accuracy_mean": best_mean,
                "steps_mean": mean_std([r["steps"] for r in at_gap])[0],
                "wall_time_mean": mean_std([r["wall_time"] for r in at_gap])[0], "n": len(at_gap),
            }
        rows.append(row)

    summary = {
        "task": "long-gap", "chance": 1.0 / settings.num_keys, "settings": settings.to_dict(),
        "rows": rows, "runs": [{k: v for k, v in r.items() if k != "fingerprint"} for r in runs],
        "files": {},
    }
    summary = finite_json(summary)
    _write_long_gap_files(summary, settings, plot)
    return summary


def _write_long_gap_files(summary: dict, settings: CompareSettings, plot: bool) -> None:
    from .plots import Series, try_plot_lines

    out = settings.out
    files = summary["files"]
    gaps = settings.gaps
    files["csv"] = str(out / "summary.csv")
    with _atomic_text(out / "summary.csv") as f:
        w = csv.writer(f)
        w.writerow(["variant", "form", "hidden", "params", "gap", "accuracy_mean", "accuracy_std",
                    "best_accuracy_mean", "chance", "seeds", "steps_mean", "wall_time_s_mean"])
        for row in summary["rows"]:
            for gap in gaps:
                g = row["gaps"][str(gap)]
                w.writerow([row["variant"], row["form"], row["hidden"], row["params"], gap,
                            _num(g["accuracy_mean"]), _num(g["accuracy_std"]), _num(g["best_accuracy_mean"]),
                            _num(summary["chance"]), g["n"], _num(g["steps_mean"]), _num(g["wall_time_mean"])])
    _write_runs_csv(summary, out)
    summary["plot_message"] = None
    if plot:
        series = [
            Series(row["variant"], [float(g) for g in gaps],
                   [row["gaps"][str(g)]["accuracy_mean"] for g in gaps],
                   spread=[row["gaps"][str(g)]["accuracy_std"] for g in gaps] if len(settings.seeds) > 1 else None)
            for row in summary["rows"]
        ]
        budget = _budget_text(settings)
        written, message = try_plot_lines(
            series, out / "accuracy-vs-gap", title=f"Recall after a gap ({settings.num_keys} keys, {budget} per run)",
            xlabel="gap G (distractors between key and recall)", ylabel="recall accuracy (held-out)",
            xscale="log" if min(gaps) > 0 and max(gaps) / max(min(gaps), 1) >= 10 else "linear",
            xticks=[float(g) for g in gaps],
            ylim=(0.0, 1.02), hlines=[(summary["chance"], f"chance (1/{settings.num_keys})")],
        )
        for path in written:
            files[f"plot {path.suffix[1:]}"] = str(path)
        summary["plot_message"] = message
    files["json"] = str(out / "summary.json")
    with _atomic_text(out / "summary.json") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def long_gap_table(summary: dict):
    """A rich table: one row per variant, recall accuracy (%) per gap, chance in the caption."""
    from rich.table import Table

    gaps = summary["settings"]["gaps"]
    n_seeds = len(summary["settings"]["seeds"])
    s = summary["settings"]
    table = Table(
        title=f"Long-gap recall accuracy, held-out ({s['num_keys']} keys, chance {summary['chance']:.1%}; "
              f"{_budget_text_dict(s)} per run, {n_seeds} seed{'s' if n_seeds > 1 else ''})",
    )
    table.add_column("variant")
    table.add_column("form/backend")
    table.add_column("hidden", justify="right")
    table.add_column("params", justify="right")
    for gap in gaps:
        table.add_column(f"gap {gap}", justify="right")
    for row in summary["rows"]:
        cells = []
        for gap in gaps:
            g = row["gaps"][str(gap)]
            text = format_pm(100 * g["accuracy_mean"], 100 * g["accuracy_std"], g["n"], digits=1) + "%"
            cells.append(text)
        table.add_row(row["variant"], row["form"], str(row["hidden"]), f"{row['params']:,}", *cells)
    return table


# --------------------------------------------------------------------------- corpus task

def compare_corpus(settings: CompareSettings, *, progress: bool = True, plot: bool = True) -> dict:
    """Train (or read back) every variant and seed on the corpus; write and return the summary."""
    from .corpus import load_corpus

    corpus = load_corpus(settings.data, progress=progress)  # also fills the token cache before any worker starts
    vocab_size = len(corpus.vocab)
    hidden_sizes = match_parameters(settings, vocab_size) if settings.match_params else None
    settings.out.mkdir(parents=True, exist_ok=True)
    specs = plan_runs(settings, vocab_size, hidden_sizes)
    results = run_all(specs, settings, progress=progress)
    runs = [results[s["run_dir"]] for s in specs]

    rows = []
    for variant in settings.variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "form": mine[0]["form"], "hidden": mine[0]["hidden"],
               "params": mine[0]["params"], "seeds": len(mine)}
        for key in ("best_val_loss", "final_val_loss", "best_val_bpc", "final_val_bpc",
                    "chars_per_sec", "train_time", "wall_time", "steps"):
            row[key + "_mean"], row[key + "_std"] = mean_std([r[key] for r in mine])
        row["curve"] = mean_curve([r["curve"] for r in mine])
        rows.append(row)
    rows.sort(key=lambda r: (not math.isfinite(r["best_val_loss_mean"]), r["best_val_loss_mean"]))

    summary = {
        "task": "corpus", "data": settings.data, "corpus": corpus.meta(),
        "reference_params": reference_parameters(settings, vocab_size) if settings.match_params else None,
        "settings": settings.to_dict(), "rows": rows,
        "runs": [{k: v for k, v in r.items() if k != "fingerprint"} for r in runs],
        "files": {},
    }
    summary = finite_json(summary)
    _write_corpus_files(summary, settings, plot)
    return summary


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Mean val loss (and training time) over seeds at the steps every seed evaluated."""
    if not curves:
        return []
    common = set(c["step"] for c in curves[0])
    for curve in curves[1:]:
        common &= set(c["step"] for c in curve)
    out = []
    for step in sorted(common):
        points = [next(c for c in curve if c["step"] == step) for curve in curves]
        loss_mean, loss_std = mean_std([p["val_loss"] for p in points])
        times = [p["time"] for p in points if p.get("time") is not None]
        out.append({"step": step, "time": statistics.fmean(times) if times else None,
                    "val_loss": loss_mean, "val_loss_std": loss_std})
    return out


CORPUS_CSV_COLUMNS = [
    "variant", "form", "hidden", "params", "seeds",
    "best_val_loss_mean", "best_val_loss_std", "best_val_bpc_mean", "best_val_bpc_std",
    "final_val_loss_mean", "final_val_loss_std", "final_val_bpc_mean", "final_val_bpc_std",
    "chars_per_sec_mean", "train_time_mean", "wall_time_mean", "steps_mean",
]
RUN_CSV_COLUMNS = [
    "variant", "seed", "gap", "form", "hidden", "params", "best_val_loss", "final_val_loss", "best_val_bpc",
    "final_val_bpc", "accuracy", "best_accuracy", "chars_per_sec", "steps", "train_time", "wall_time", "run_dir",
]


def _write_runs_csv(summary: dict, out: Path) -> None:
    with _atomic_text(out / "runs.csv") as f:
        w = csv.writer(f)
        w.writerow(RUN_CSV_COLUMNS)
        for r in summary["runs"]:
            w.writerow([_num(r.get(k)) for k in RUN_CSV_COLUMNS])
    summary["files"]["runs csv"] = str(out / "runs.csv")


def _write_corpus_files(summary: dict, settings: CompareSettings, plot: bool) -> None:
    from .plots import Series, try_plot_lines

    out = settings.out
    files = summary["files"]
    with _atomic_text(out / "summary.csv") as f:
        w = csv.writer(f)
        w.writerow(CORPUS_CSV_COLUMNS)
        for row in summary["rows"]:
            w.writerow([_num(row[k]) for k in CORPUS_CSV_COLUMNS])
    files["csv"] = str(out / "summary.csv")
    _write_runs_csv(summary, out)
    summary["plot_message"] = None
    if plot:
        several = len(settings.seeds) > 1
        name = Path(settings.data).name
        budget = _budget_text(settings)
        for x_key, stem, xlabel in (("step", "curves-step", "optimizer step"),
                                    ("time", "curves-time", "training time (s, evaluation excluded)")):
            series = []
            for row in summary["rows"]:
                pts = [p for p in row["curve"] if p.get(x_key) is not None]
                series.append(Series(
                    f"{row['variant']} ({row['params']:,} params)", [p[x_key] for p in pts],
                    [p["val_loss"] for p in pts], spread=[p["val_loss_std"] for p in pts] if several else None,
                ))
            written, message = try_plot_lines(
                series, out / stem, title=f"Validation loss on {name} ({budget} per run)",
                xlabel=xlabel, ylabel="validation loss (nats/char)",
            )
            for path in written:
                files[f"{stem} {path.suffix[1:]}"] = str(path)
            summary["plot_message"] = message
    files["json"] = str(out / "summary.json")
    with _atomic_text(out / "summary.json") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def corpus_table(summary: dict):
    """A rich table: one row per variant, sorted by best validation loss."""
    from rich.table import Table

    s = summary["settings"]
    n_seeds = len(s["seeds"])
    size = (f"sized to match an lstm of {s['hidden']} ({summary['reference_params']:,} params)"
            if s["match_params"] else f"{s['hidden']} units")
    table = Table(
        title=f"{Path(s['data']).name}: {s['layers']} layer{'s' if s['layers'] > 1 else ''}, {size}, "
              f"{_budget_text_dict(s)} per run, {n_seeds} seed{'s' if n_seeds > 1 else ''}",
        caption="sorted by best validation loss; nats/char, and bits/char (bpc) = nats / ln 2"
                + ("; mean ± std over seeds" if n_seeds > 1 else ""),
    )
    for name, justify in (("variant", "left"), ("form/backend", "left"), ("hidden", "right"), ("params", "right"),
                          ("best val nats", "right"), ("best val bpc", "right"), ("final val nats", "right"),
                          ("final val bpc", "right"), ("train chars/s", "right"), ("train s", "right"),
                          ("wall s", "right")):
        table.add_column(name, justify=justify)
    for r in summary["rows"]:
        n = r["seeds"]
        table.add_row(
            r["variant"], r["form"], str(r["hidden"]), f"{r['params']:,}",
            format_pm(r["best_val_loss_mean"], r["best_val_loss_std"], n),
            format_pm(r["best_val_bpc_mean"], r["best_val_bpc_std"], n),
            format_pm(r["final_val_loss_mean"], r["final_val_loss_std"], n),
            format_pm(r["final_val_bpc_mean"], r["final_val_bpc_std"], n),
            _fmt(r["chars_per_sec_mean"], ",.0f"), _fmt(r["train_time_mean"], ".0f"), _fmt(r["wall_time_mean"], ".0f"),
        )
    return table


# --------------------------------------------------------------------------- small helpers

def _budget_text(settings: CompareSettings) -> str:
    return _budget_text_dict(settings.to_dict())


def _budget_text_dict(s: dict) -> str:
    parts = []
    if s.get("max_steps"):
        parts.append(f"{s['max_steps']} steps")
    if s.get("max_time"):
        parts.append(f"{s['max_time']:g} s")
    return " or ".join(parts)


def _fmt(v, spec: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def finite_json(obj):
    """The object with every NaN or infinity replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _num(v):
    """A CSV cell: numbers as they are, NaN as an empty cell."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return v


@contextlib.contextmanager
def _atomic_text(path: Path):
    """Write a text file through a buffer and replace ``path`` at once when done."""
    from .checkpoint import write_text_atomic

    buf = io.StringIO(newline="")
    yield buf
    write_text_atomic(Path(path), buf.getvalue())

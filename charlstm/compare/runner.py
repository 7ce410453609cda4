"""Running a comparison: plan the runs, train them (or read finished ones back), summarise. Each run
has its own directory and, once finished, its result.json; the same command again trains only what is
missing (docs/compare.md). Corpus runs go through training.train, long-gap runs through longgap."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from .. import checkpoint as ckpt_mod
from .. import console, rundir, training
from ..config import CompareConfig, ModelConfig, TrainConfig
from ..console import note
from ..corpus import Vocab, load_corpus
from ..errors import CharlstmError
from ..longgap import LongGapTask, train_long_gap
from ..memory import check_fits, estimate_training_bytes
from ..model import resolve_backend
from ..runtime import resolve_device, usable_threads
from .report import LN2, corpus_summary, long_gap_summary, write_corpus_files, write_long_gap_files
from .settings import match_parameters, reference_parameters, threads_per_job

RESULT_FILE = "result.json"
# TrainConfig fields that do not change a run's result (tensorboard: added later, absent from older results).
FINGERPRINT_IGNORES = ("device", "threads", "out", "name", "tensorboard")


def run_comparison(settings: CompareConfig, *, progress: bool = True, plot: bool = True) -> dict:
    """Train (or read back) every run of the comparison; write the files and return the summary."""
    resolve_device(settings.train.device)       # a device that is not there: one line before any run starts
    settings.train.threads = usable_threads(settings.train.threads)
    if settings.task == "long-gap":
        return compare_long_gap(settings, progress=progress, plot=plot)
    return compare_corpus(settings, progress=progress, plot=plot)


def compare_corpus(settings: CompareConfig, *, progress: bool = True, plot: bool = True) -> dict:
    """Every variant and seed on the corpus."""
    corpus = load_corpus(settings.train.data, progress=progress)  # also fills the token cache before any worker starts
    vocab_size = len(corpus.vocab)
    hidden_sizes = match_parameters(settings, vocab_size) if settings.match_params else None
    settings.out.mkdir(parents=True, exist_ok=True)
    specs = plan_runs(settings, vocab_size, hidden_sizes)
    check_memory(settings, specs, vocab_size)
    results = run_all(specs, settings, progress=progress)
    reference = reference_parameters(settings, vocab_size) if settings.match_params else None
    summary = corpus_summary(settings, [results[s["run_dir"]] for s in specs], corpus.meta(), reference)
    write_corpus_files(summary, settings, plot)
    return summary


def check_memory(settings: CompareConfig, specs: list[dict], vocab_size: int) -> None:
    """Refuse, with the figures, a comparison whose --jobs runs at a time cannot fit in memory."""
    at_once = min(settings.jobs, len(specs))
    needed = at_once * max(estimate_training_bytes(ModelConfig.from_dict(s["model_cfg"]),
                                                   TrainConfig.from_dict(s["train_cfg"]), vocab_size) for s in specs)
    check_fits(needed, f"training {at_once} run(s) at a time", "use a smaller --hidden, --layers, --batch-size "
               "or --seq-len, or fewer --jobs", resolve_device(settings.train.device))


def compare_long_gap(settings: CompareConfig, *, progress: bool = True, plot: bool = True) -> dict:
    """Every variant at every gap and seed."""
    task0 = LongGapTask(gap=settings.gaps[0], num_keys=settings.num_keys, num_distractors=settings.num_distractors)
    hidden_sizes = match_parameters(settings, task0.vocab_size) if settings.match_params else None
    settings.out.mkdir(parents=True, exist_ok=True)
    specs = plan_runs(settings, task0.vocab_size, hidden_sizes)
    results = run_all(specs, settings, progress=progress)
    summary = long_gap_summary(settings, [results[s["run_dir"]] for s in specs])
    write_long_gap_files(summary, settings, plot)
    return summary


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
    now = _jsonable(fingerprint)
    if _upgraded(stored.get("fingerprint") or {}, now) != now:
        diff = _differences(stored.get("fingerprint") or {}, now)
        raise CharlstmError(
            f"{run_dir} holds a finished run with different settings ({'; '.join(diff) or 'unreadable'}); "
            "pass another --out, or move that directory away"
        )
    return stored


def _upgraded(stored: dict, now: dict) -> dict:
    """A stored fingerprint with the settings charlstm gained since it was written (absent there,
    present now) at their defaults: a newer charlstm still reuses the runs an older one finished."""
    defaults = {"model": ModelConfig().to_dict(), "train": TrainConfig().to_dict()}
    out = dict(stored)
    for part, default in defaults.items():
        old, new = stored.get(part), now.get(part)
        if isinstance(old, dict) and isinstance(new, dict):
            added = {k: default[k] for k in new.keys() - old.keys() if k in default}
            out[part] = _jsonable({**added, **old})
    return out


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
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    ckpt_mod.write_text_atomic(Path(run_dir) / RESULT_FILE, json.dumps(result, indent=1, allow_nan=True) + "\n")


def _fingerprint(kind: str, **parts) -> dict:
    return _jsonable({"kind": kind, **parts})


def plan_runs(settings: CompareConfig, vocab_size: int, hidden_sizes: dict[str, tuple[int, int]] | None) -> list[dict]:
    """One picklable spec per run: where it lives, what it trains, what its result depends on."""
    plan = _plan_corpus if settings.task == "corpus" else _plan_long_gap
    specs = plan(settings, vocab_size, hidden_sizes or {})
    for variant in settings.variants:
        # an impossible backend fails now, not mid-way
        resolved_config(settings.model_config(variant, vocab_size=vocab_size))
    for spec in specs:
        spec["device"] = settings.train.device
        spec["threads"] = threads_per_job(settings)
    return specs


def _plan_corpus(settings: CompareConfig, vocab_size: int, hidden_sizes: dict) -> list[dict]:
    specs = []
    for variant in settings.variants:
        model_cfg = settings.model_config(variant, hidden_sizes.get(variant, (None,))[0], vocab_size)
        for seed in settings.seeds:
            train_cfg = corpus_train_config(settings, seed)
            run_dir = settings.out / f"{variant}-seed{seed}"
            train_cfg.out = str(run_dir)
            train_cfg.name = run_dir.name
            fp = _fingerprint(
                "corpus", model=model_cfg.to_dict(),
                train={k: v for k, v in train_cfg.to_dict().items() if k not in FINGERPRINT_IGNORES},
            )
            specs.append({
                "kind": "corpus", "variant": variant, "seed": seed, "gap": None,
                "run_dir": str(run_dir), "label": f"{variant} seed {seed}",
                "model_cfg": model_cfg.to_dict(), "train_cfg": train_cfg.to_dict(), "fingerprint": fp,
            })
    return specs


def _plan_long_gap(settings: CompareConfig, vocab_size: int, hidden_sizes: dict) -> list[dict]:
    specs = []
    for gap in settings.gaps:
        task = LongGapTask(gap=gap, num_keys=settings.num_keys, num_distractors=settings.num_distractors)
        for variant in settings.variants:
            model_cfg = settings.model_config(variant, hidden_sizes.get(variant, (None,))[0], task.vocab_size)
            if model_cfg.init == "chrono":
                model_cfg.chrono_tmax = task.seq_len  # the longest dependency is the whole sequence
            for seed in settings.seeds:
                run_dir = settings.out / f"gap{gap}" / f"{variant}-seed{seed}"
                params = {
                    "gap": gap, "num_keys": settings.num_keys, "num_distractors": settings.num_distractors,
                    "seed": seed, "max_steps": settings.train.max_steps, "max_time": settings.train.max_time,
                    "batch_size": settings.train.batch_size, "lr": settings.train.lr, "clip": settings.train.clip,
                    "eval_size": settings.eval_size, "eval_every": eval_every(settings),
                }
                specs.append({
                    "kind": "long-gap", "variant": variant, "seed": seed, "gap": gap,
                    "run_dir": str(run_dir), "label": f"{variant} gap {gap} seed {seed}",
                    "model_cfg": model_cfg.to_dict(), "task": params,
                    "fingerprint": _fingerprint("long-gap", model=model_cfg.to_dict(), task=params),
                })
    return specs


def corpus_train_config(settings: CompareConfig, seed: int) -> TrainConfig:
    """The TrainConfig of one corpus run (the same for every variant): the comparison's, with
    its seed, evaluation cadence, one checkpoint kept and no text samples (the comparison
    prints a table)."""
    every = eval_every(settings)
    return dataclasses.replace(settings.train, seed=seed, threads=threads_per_job(settings), eval_every=every,
                               checkpoint_every=every, keep=1, sample_chars=0)


def eval_every(settings: CompareConfig) -> int:
    """Evaluation cadence for learning curves: --eval-every, else about 10 points under a step
    budget, else every 100 steps."""
    if settings.eval_every:
        return settings.eval_every
    if settings.train.max_steps:
        return max(1, settings.train.max_steps // 10)
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
    """Train one long-gap run under its directory's lock, after clearing what an attempt stopped before its
    result.json left there (a checkpoint is never overwritten)."""
    run_dir = Path(spec["run_dir"])
    with rundir.lock_run_dir(run_dir):
        rundir.clear_run_dir(run_dir)
        return _train_long_gap_run(spec, progress)


def _train_long_gap_run(spec: dict, progress: bool) -> dict:
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
    ckpt_mod.save_checkpoint(
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
    run_dir = Path(spec["run_dir"])
    model_cfg = ModelConfig.from_dict(spec["model_cfg"])
    train_cfg = TrainConfig.from_dict(spec["train_cfg"])
    resume, overwrite = None, False
    if run_dir.is_dir() and ckpt_mod.list_checkpoints(run_dir):
        # An interrupted run: continue it exactly, after checking it is this comparison's run.
        stored_model, stored_train = training.resume_configs(run_dir, {})
        check_stored_run(run_dir, spec, stored_model, stored_train)
        resume = run_dir
        model_cfg, train_cfg = stored_model, dataclasses.replace(
            stored_train, device=train_cfg.device, threads=train_cfg.threads)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        overwrite = True  # stopped before its first checkpoint: start it again (only charlstm's files go)
    result = training.train(model_cfg, train_cfg, resume=resume, progress=progress, overwrite=overwrite,
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
    ignore = set(FINGERPRINT_IGNORES)
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

def run_all(specs: list[dict], settings: CompareConfig, *, progress: bool = True) -> dict[str, dict]:
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
        note(f"{len(results)} of {len(specs)} runs already finished in {settings.out}; "
             f"{'training the other ' + str(len(todo)) if todo else 'nothing to train'}")
    try:
        if settings.jobs == 1 or len(todo) <= 1:
            for i, spec in enumerate(todo, 1):
                if progress:
                    note(f"[{i}/{len(todo)}] {spec['label']} -> {spec['run_dir']}")
                results[spec["run_dir"]] = execute_run(spec, progress=progress)
        else:
            _run_parallel(todo, settings.jobs, results, progress)
    except KeyboardInterrupt:
        done = sum(1 for s in specs if (Path(s["run_dir"]) / RESULT_FILE).is_file())
        note(f"interrupted: {done} of {len(specs)} runs finished and kept in {settings.out}; "
             "run the same command again to continue")
        raise
    return results


def _run_parallel(todo: list[dict], jobs: int, results: dict, progress: bool) -> None:
    ctx = multiprocessing.get_context("spawn")
    # A log gets a line per finished run (interval 0); a terminal, a bar that stays.
    bar = console.progress(len(todo), desc=f"runs ({jobs} at a time)", unit="runs", enabled=progress, leave=True,
                           interval=0)
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

"""`charlstm bench`: training and sampling throughput of variants x backends x sizes side by side, as
chars/s, as ratios to nn.LSTM measured in the same run and as GFLOP/s against this machine's torch.mm
peak. The method is in docs/performance.md; bench_report.py turns the report into a table."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import console
from .config import BenchConfig, ModelConfig, TrainConfig
from .errors import UsageError
from .layers import Recurrent
from .memory import FLOAT_BYTES, check_fits, estimate_training_bytes, parameter_count
from .model import build_model, describe_backend, has_cudnn
from .native.build import library
from .optim import adamw, optimisation_step
from .registry import CELLS, spec_for
from .runtime import resolve_device, usable_threads
from .sampling import SamplingOptions, gumbel_noise
from .steppers import ModelStep, make_stepper, stepping_threads

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
MIN_JOB_SECONDS = 0.02                     # small products are repeated inside one timing to last this long
SIZE_FIELDS = ("hidden", "layers", "batch_size", "seq_len")


# --------------------------------------------------------------------------- what one row is

@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    batch_size: int
    seq_len: int


def model_config(variant: str, backend: str, sizes: Sizes, s: BenchConfig) -> ModelConfig:
    """The ModelConfig of one row (variant may carry a form: 'gru:cho', 'peephole:full')."""
    base, _, form = variant.partition(":")
    extra = {}
    field = next((c.form_field for c in CELLS if c.variant == base and c.form_field), None)
    if field is not None:                          # the form named after the colon, else --gru-form/--peephole-form
        extra[field] = form or getattr(s, field)
    return ModelConfig(vocab_size=s.vocab, variant=base, backend="custom" if backend == "basic" else backend,
                       embed=s.embed, hidden=sizes.hidden, layers=sizes.layers, **extra)


def weight_count(cfg: ModelConfig) -> int:
    """Recurrent and input weights of the stack (the matrices the FLOP count is based on): the
    registry's count (every 2-D parameter of the cells); no biases, embedding or head."""
    return spec_for(cfg).weights(cfg)


def label(variant: str, cfg: ModelConfig) -> str:
    """The row's name: the variant, with its form where it has several ('gru (cho)')."""
    spec = spec_for(cfg)
    return f"{spec.variant} ({spec.form})" if spec.form else variant


def use_fused_path(model, on: bool) -> None:
    """Choose, for a custom model, between the fused layers (``on``) and the plain unbind loop."""
    for layer in getattr(model.rnn, "layers", []):
        if isinstance(layer, Recurrent):
            layer.use_fused = on


# --------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_job(model, cfg: ModelConfig, sizes: Sizes, device: torch.device, seed: int,
              clock: Callable[[], float] = time.perf_counter, *, bf16: bool = False) -> Callable[[], float]:
    """A closure timing one training step in seconds: :func:`charlstm.optim.optimisation_step`, the
    trainer's step (forward, cross-entropy, backward, AdamW), on random tokens; under bf16 autocast
    with ``bf16`` (CUDA), as the trainer runs there.

    Unlike the trainer's it does not clip and does not check for NaN (which
    reads the loss back every step): the figure is the step's own work, as the
    reference ``nn.LSTM`` loop and the earlier figures of docs/performance.md
    measured it; no carried state, every step starts from zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (sizes.seq_len, sizes.batch_size), generator=gen).to(device)  # (T, B)
    y = torch.randint(0, cfg.vocab_size, (sizes.seq_len, sizes.batch_size), generator=gen).to(device)  # (T, B)
    opt = adamw(model.parameters(), lr=1e-3)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def job() -> float:
        model.train()
        _sync(device)
        t0 = clock()
        optimisation_step(model, opt, x, y, autocast=autocast)
        _sync(device)
        return clock() - t0

    return job


@contextlib.contextmanager
def _onednn(enabled: bool):
    """torch's use of oneDNN (mkldnn) switched on or off inside the block."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def sample_job(model, streams: int, length: int, device: torch.device, seed: int, *,
               reference: str | None = None, threads: int | None = None,
               clock: Callable[[], float] = time.perf_counter) -> tuple[Callable[[], float], str]:
    """A closure timing ``length`` characters of sampling in ``streams`` streams, and the
    stepper's name. The sampler's own stepper (``sample.make_stepper``, what ``charlstm
    sample`` runs), or a reference: ``reference='onednn'`` is model.forward one character
    at a time (nn.LSTM as torch runs it), ``'no-onednn'`` the same with oneDNN switched off.
    ``threads``: torch threads while sampling (restored afterwards; None: charlstm sample's
    default for the stepper, ``sample.stepping_threads``)."""
    model.eval()
    with torch.inference_mode():
        stepper = ModelStep(model) if reference else make_stepper(model)
    threads = stepping_threads(stepper, threads)
    name = stepper.name + (" (TorchScript)" if getattr(stepper, "scripted", False) else "")
    if reference:
        name = f"nn.LSTM stepped through model.forward ({'oneDNN' if reference == 'onednn' else 'oneDNN off'})"
    opts = SamplingOptions()
    gen = torch.Generator(device=device).manual_seed(seed)
    state0 = model.init_state(streams, device=device)
    logits0 = torch.zeros(streams, model.cfg.vocab_size, device=device)   # (B, V)
    mkldnn_on = reference != "no-onednn"

    def job() -> float:
        was_training, before = model.training, torch.get_num_threads()
        model.eval()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode(), _onednn(mkldnn_on):
                stepper.load_state(state0)
                _sync(device)
                t0 = clock()
                noise = gumbel_noise(length, streams, model.cfg.vocab_size, gen, device)
                stepper.generate(logits0, length, opts, noise)
                _sync(device)
                return clock() - t0
        finally:
            torch.set_num_threads(before)
            model.train(was_training)

    return job, name


def mm_job(m: int, k: int, n: int, device: torch.device, *, transposed: bool,
           clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """A closure timing one (m x k) @ (k x n) float32 product in seconds (repeated inside
    the timing when small). ``transposed``: the right factor is a transposed view, as the
    recurrent product h @ W_hh^T is."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device)
    b = torch.randn(n, k, generator=gen).to(device).t() if transposed else torch.randn(k, n, generator=gen).to(device)
    out = torch.empty(m, n, device=device)
    torch.mm(a, b, out=out)
    _sync(device)
    t0 = clock()
    torch.mm(a, b, out=out)
    _sync(device)
    inner = max(1, int(MIN_JOB_SECONDS / max(clock() - t0, 1e-7)))

    def job() -> float:
        _sync(device)
        t0 = clock()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        _sync(device)
        return (clock() - t0) / inner

    return job


def run_rounds(jobs: dict, warmup: int, repeats: int, progress: bool) -> dict:
    """Run every job once per round (warm-up rounds untimed); {key: [seconds per timed round]}."""
    times = {key: [] for key in jobs}
    total = (warmup + repeats) * len(jobs)
    with console.progress(total, desc="measuring", unit="runs", enabled=progress, mininterval=0.5) as bar:
        for r in range(warmup + repeats):
            bar.set_postfix_str("warm-up" if r < warmup else f"round {r - warmup + 1}/{repeats}")
            for key, job in jobs.items():
                seconds = job()
                if r >= warmup:
                    times[key].append(seconds)
                bar.update()
    return times


def _ratio(base: list[float], other: list[float]) -> float:
    """Speed of ``other`` relative to ``base``: the median over rounds of base time / other time."""
    return statistics.median(b / o for b, o in zip(base, other))


# --------------------------------------------------------------------------- the run

def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(s: BenchConfig, *, progress: bool = True) -> dict:
    """Measure everything ``s`` asks for and return the report (JSON-safe)."""
    device = resolve_device(s.device)
    if s.clock == "cpu" and device.type != "cpu":
        raise UsageError("--clock cpu measures CPU time and only makes sense with --device cpu")
    if s.bf16 and device.type != "cuda":
        raise UsageError("--bf16 times training under bf16 autocast, which train uses on CUDA only: "
                         "add --device cuda on a machine with a GPU")
    s = dataclasses.replace(s, threads=usable_threads(s.threads),
                            sample_threads=usable_threads(s.sample_threads, "--sample-threads"))
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    clock = CLOCKS[s.clock]
    all_sizes = [Sizes(*p) for p in itertools.product(s.hidden, s.layers, s.batch_size, s.seq_len)]
    check_fits(estimate_bench_bytes(s, all_sizes), "this benchmark",
               "measure smaller or fewer --hidden, --layers, --batch-size or --seq-len values", device)
    rows, jobs, steppers, skipped = _model_jobs(s, all_sizes, device, clock)
    peak_shapes = sorted({(z.batch_size, z.hidden) for z in all_sizes})
    for B, H in peak_shapes:
        jobs[("peak", "recurrent", B, H)] = mm_job(B, H, 4 * H, device, transposed=True, clock=clock)
    if s.peak_size:
        n = s.peak_size
        jobs[("peak", "square", n)] = mm_job(n, n, n, device, transposed=False, clock=clock)

    times = run_rounds(jobs, s.warmup, s.repeats, progress)

    peak = _peaks(s, peak_shapes, times)
    results = _figures(rows, times, steppers, peak, s.sample_length)
    _per_flop_ratios(results)
    return {
        "command": "charlstm bench",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "native": native_status()},
        "settings": {**dataclasses.asdict(s), "device": device.type},
        "flops": {"train_per_weight_per_char": 6, "sample_per_weight_per_char": 2,
                  "counted": "W_ih and W_hh of every layer (and full peephole matrices); no head, no pointwise"},
        "peak": peak,
        "baselines": _baselines(rows, times, s.sample_length),
        "results": results,
        "skipped": skipped,
    }


def estimate_bench_bytes(s: BenchConfig, all_sizes: list[Sizes]) -> int:
    """Memory the benchmark needs: every row's model is kept, and one training step runs at a time."""
    cfgs = [(model_config(v, b, z, s), z) for z in all_sizes for v in ["lstm", *s.variants] for b in s.backends]
    cfgs = [(cfg, z) for cfg, z in cfgs if cfg.backend != "cudnn" or has_cudnn(cfg)]   # the rows that run
    kept = sum(FLOAT_BYTES * parameter_count(cfg, s.vocab) for cfg, _ in cfgs)
    step = max(estimate_training_bytes(cfg, TrainConfig(batch_size=z.batch_size, seq_len=z.seq_len), s.vocab)
               for cfg, z in cfgs)
    return kept + step


def _model_jobs(s: BenchConfig, all_sizes: list[Sizes], device: torch.device, clock) -> tuple:
    """A row per variant x backend x sizes (the nn.LSTM baseline first), and the jobs that time them:
    (rows, {key: job}, {key: stepper name}, [skipped notes])."""
    jobs, rows, skipped, steppers = {}, [], [], {}
    for sizes in all_sizes:
        combos = [("lstm", "cudnn", True)]                     # the baseline, always measured
        combos += [(v, b, False) for v in s.variants for b in s.backends]
        seen = set()
        for variant, backend, baseline in combos:
            cfg = model_config(variant, backend, sizes, s)
            key = (label(variant, cfg), backend, sizes)
            if key in seen:
                continue
            seen.add(key)
            if backend == "cudnn" and not has_cudnn(cfg):
                note = f"{label(variant, cfg)} has no torch.nn module (cudnn backend): skipped"
                if note not in skipped:
                    skipped.append(note)
                continue
            torch.manual_seed(s.seed)
            model = build_model(cfg, device).to(device)
            if backend in ("custom", "basic"):
                use_fused_path(model, backend == "custom")
            runs = describe_backend(model)
            if backend == "custom" and device.type == "cpu" and runs != "custom (native loops)":
                why = f"{label(variant, cfg)} (custom, H={sizes.hidden}) runs on {runs.removeprefix('custom (')[:-1]}"
                if why not in skipped:
                    skipped.append(why)
            row = {"variant": label(variant, cfg), "backend": backend, "baseline": baseline,
                   **dataclasses.asdict(sizes), "embed": s.embed, "vocab": s.vocab,
                   "weights": weight_count(cfg), "runs": runs, "model": model}
            rows.append(row)
            _row_jobs(row, model, cfg, sizes, s, device, clock, jobs, steppers)
    return rows, jobs, steppers, skipped


def _row_jobs(row, model, cfg, sizes, s: BenchConfig, device, clock, jobs: dict, steppers: dict) -> None:
    """The measures of one row (and, for the baseline, nn.LSTM stepped with and without oneDNN)."""
    if "train" in s.measures:
        jobs[(id(row), "train")] = train_job(model, cfg, sizes, device, s.seed, clock, bf16=s.bf16)
    for measure, streams in (("sample", 1), ("sample-batch", sizes.batch_size)):
        if measure not in s.measures:
            continue
        jobs[(id(row), measure)], steppers[(id(row), measure)] = sample_job(
            model, streams, s.sample_length, device, s.seed, threads=s.sample_threads, clock=clock)
        if row["baseline"]:
            # the faster of the two is the reference of the sampling ratios
            for ref in ("onednn", "no-onednn"):
                jobs[(id(row), measure, ref)], steppers[(id(row), measure, ref)] = sample_job(
                    model, streams, s.sample_length, device, s.seed, reference=ref,
                    threads=s.sample_threads, clock=clock)


def _peaks(s: BenchConfig, peak_shapes: list, times: dict) -> dict:
    """GFLOP/s of the square product and of the recurrent product's shape at each (B, H)."""
    peak = {"square": None, "recurrent": []}
    if s.peak_size:
        n = s.peak_size
        t = times[("peak", "square", n)]
        peak["square"] = {"shape": [n, n, n], "gflops": 2 * n ** 3 / statistics.median(t) / 1e9,
                          "best_gflops": 2 * n ** 3 / min(t) / 1e9}
    for B, H in peak_shapes:
        t = times[("peak", "recurrent", B, H)]
        flops = 2 * B * H * 4 * H
        peak["recurrent"].append({"batch_size": B, "hidden": H, "shape": [B, H, 4 * H],
                                  "gflops": flops / statistics.median(t) / 1e9, "best_gflops": flops / min(t) / 1e9})
    return peak


def _same_sizes(a: dict, b: dict) -> bool:
    return all(a[f] == b[f] for f in SIZE_FIELDS)


def _figures(rows: list[dict], times: dict, steppers: dict, peak: dict, sample_length: int) -> list[dict]:
    """Each row's chars/s, ratio to nn.LSTM, GFLOP/s and fractions of the peaks, per measure."""
    recurrent_peak = {(p["batch_size"], p["hidden"]): p["gflops"] for p in peak["recurrent"]}
    results = []
    for row in rows:
        base = next(r for r in rows if r["baseline"] and _same_sizes(r, row))
        out = {k: v for k, v in row.items() if k != "model"}
        for measure, streams, flops_per_weight in (("train", row["batch_size"] * row["seq_len"], 6),
                                                   ("sample", 1, 2),
                                                   ("sample-batch", row["batch_size"], 2)):
            key = (id(row), measure)
            if key not in times:
                continue
            chars = streams if measure == "train" else streams * sample_length
            t = times[key]
            if measure == "train":
                ref_times = times[(id(base), measure)]
            else:
                ref_times = min((times[(id(base), measure, ref)] for ref in ("onednn", "no-onednn")),
                                key=statistics.median)
            fig = {
                "chars_per_s": chars / statistics.median(t),
                "seconds_median": statistics.median(t),
                "seconds": t,
                "ratio_to_nn_lstm": _ratio(ref_times, t),
                "gflops": flops_per_weight * row["weights"] * chars / statistics.median(t) / 1e9,
            }
            if peak["square"]:
                fig["fraction_of_mm_peak"] = fig["gflops"] / peak["square"]["gflops"]
            fig["fraction_of_recurrent_mm_peak"] = fig["gflops"] / recurrent_peak[(row["batch_size"], row["hidden"])]
            if measure != "train":
                fig["stepper"] = steppers[key]
            out[measure.replace("-", "_")] = fig
        results.append(out)
    return results


def _baselines(rows: list[dict], times: dict, sample_length: int) -> list[dict]:
    """The nn.LSTM rows' own figures: training chars/s, stepped sampling with and without oneDNN."""
    baselines = []
    for row in rows:
        if not row["baseline"]:
            continue
        entry = {f: row[f] for f in SIZE_FIELDS}
        if (id(row), "train") in times:
            t = times[(id(row), "train")]
            entry["train_chars_per_s"] = row["batch_size"] * row["seq_len"] / statistics.median(t)
        for measure, streams in (("sample", 1), ("sample-batch", row["batch_size"])):
            for ref in ("onednn", "no-onednn"):
                key = (id(row), measure, ref)
                if key in times:
                    name = f"{measure.replace('-', '_')}_{ref.replace('-', '_')}_chars_per_s"
                    entry[name] = streams * sample_length / statistics.median(times[key])
        entry["sample_reference"] = ("nn.LSTM stepped one character at a time through model.forward, "
                                     "with oneDNN (torch's default) and without; ratios use the faster")
        baselines.append(entry)
    return baselines


def _per_flop_ratios(results: list[dict]) -> None:
    """Training GFLOP/s against the custom lstm's at the same sizes and backend (added to each row)."""
    for r in results:
        if "train" not in r:
            continue
        twin = next((q for q in results if q["variant"] == "lstm" and q["backend"] == r["backend"]
                     and _same_sizes(q, r)), None)
        if twin is not None and "train" in twin:
            r["train"]["gflops_ratio_to_lstm_same_backend"] = r["train"]["gflops"] / twin["train"]["gflops"]


def native_status() -> str:
    """What runs in C here (charlstm/native/): the cells whose registry entries name a kernel."""
    lib, why = library()
    if lib is None:
        return f"unavailable ({why}): torch loops and the TorchScript step"
    native = [c.name for c in CELLS if c.kernel is not None]
    others = [c.name for c in CELLS if c.kernel is None]
    return (f"C training loops and sampling step for {', '.join(native)} (float32 on the CPU, H a multiple of 8 "
            "for training; fp32, fp16 or int8 weights for sampling)" + why.removeprefix("ready")
            + (f"; {', '.join(others)}: torch loops and model.forward" if others else ""))


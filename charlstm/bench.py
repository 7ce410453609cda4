"""Throughput measurement: `charlstm bench`.

In one run and side by side, for every chosen variant x backend x size:

- training throughput: characters per second of one training step (forward,
  cross-entropy, backward, AdamW step) on random tokens, a window of T
  characters in B streams;
- sampling throughput of the sampler's stepper (``sample.make_stepper``, what
  ``charlstm sample`` uses), one stream and B streams at once.

Every figure is also given as a ratio to ``torch.nn.LSTM`` measured in the same
run at the same sizes (for sampling: ``nn.LSTM`` stepped one character at a
time through ``model.forward``), and as achieved GFLOP/s against this machine's
``torch.mm`` peak, also measured in the same run (large square products and
the recurrent product's shape B x H by H x 4H). FLOPs are counted as 6 per
recurrent or input weight per character for training (2 forward, 4 backward)
and 2 for sampling; the head and the pointwise work are not counted.

Timing: every measurement is a closure; after ``warmup`` untimed rounds the
closures run in ``repeats`` interleaved rounds (each round runs every closure
once), so that a change of machine load hits all of them alike. Figures are
medians; a ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import GRU_FORMS, PEEPHOLE_FORMS, VARIANTS, ModelConfig
from .errors import CharlstmError, UsageError
from .optim import optimisation_step

BACKENDS = ("cudnn", "custom", "basic")   # basic: the custom cells through the plain unbind loop
MEASURES = ("train", "sample", "sample-batch")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PEAK_SQUARE = 2048                         # n of the n x n by n x n products that give the mm peak
MIN_JOB_SECONDS = 0.02                     # small products are repeated inside one timing to last this long


# --------------------------------------------------------------------------- settings

@dataclass
class BenchSettings:
    """What to measure and how (built from the command line)."""

    variants: list[str] = field(default_factory=lambda: ["lstm", "peephole", "coupled", "gru"])
    backends: list[str] = field(default_factory=lambda: ["cudnn", "custom"])
    hidden: list[int] = field(default_factory=lambda: [256])        # H
    layers: list[int] = field(default_factory=lambda: [2])          # L
    batch_size: list[int] = field(default_factory=lambda: [32])     # B
    seq_len: list[int] = field(default_factory=lambda: [128])       # T
    embed: int = 64                       # E
    vocab: int = 65                       # V
    peephole_form: str = "diag"           # form of the peephole variant
    gru_form: str = "cudnn"               # form of the gru variant
    device: str = "cpu"                   # cpu | cuda (resolved from auto)
    threads: int | None = None            # torch intra-op threads (None: torch's default)
    repeats: int = 5                      # timed rounds (medians over these)
    warmup: int = 2                       # untimed rounds first
    sample_length: int = 256              # characters per sampling measurement
    sample_threads: int | None = None     # threads while sampling (None: charlstm sample's default for the step)
    measures: list[str] = field(default_factory=lambda: list(MEASURES))
    peak_size: int = PEAK_SQUARE          # n of the square mm peak (0: skip)
    seed: int = 0
    clock: str = "wall"                   # wall (perf_counter) | cpu (this process's CPU time)

    def validate(self) -> None:
        for v in self.variants:
            if v.split(":")[0] not in VARIANTS:
                raise UsageError(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)}; "
                                 "a form after a colon: gru:cho, peephole:full)")
            if ":" in v:
                base, form = v.split(":", 1)
                forms = {"gru": GRU_FORMS, "peephole": PEEPHOLE_FORMS}.get(base, ())
                if form not in forms:
                    raise UsageError(f"--variants: {v!r} has no form {form!r}"
                                     + (f" (forms: {', '.join(forms)})" if forms else ""))
        for b in self.backends:
            if b not in BACKENDS:
                raise UsageError(f"--backends: unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
        for m in self.measures:
            if m not in MEASURES:
                raise UsageError(f"--measures: unknown measure {m!r} (choose from {', '.join(MEASURES)})")
        if not self.variants or not self.backends or not self.measures:
            raise UsageError("--variants, --backends and --measures each need at least one value")
        for name in ("hidden", "layers", "batch_size", "seq_len"):
            for n in getattr(self, name):
                if n < 1:
                    raise UsageError(f"--{name.replace('_', '-')} values must be >= 1 (got {n})")
        for name in ("embed", "vocab", "repeats", "sample_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.vocab < 2:
            raise UsageError(f"--vocab must be >= 2 (got {self.vocab})")
        if self.warmup < 0 or self.peak_size < 0:
            raise UsageError("--warmup and --peak-size must be >= 0")
        if self.clock not in CLOCKS:
            raise UsageError(f"--clock must be one of {', '.join(CLOCKS)} (got {self.clock!r})")
        if self.clock == "cpu" and self.device != "cpu":
            raise UsageError("--clock cpu measures CPU time and only makes sense with --device cpu")
        for name in ("threads", "sample_threads"):
            n = getattr(self, name)
            if n is not None and n < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {n})")


def parse_int_list(text: str, option: str) -> list[int]:
    """'256' or '256,512' -> [256, 512]; UsageError naming the option otherwise."""
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} takes integers separated by commas, e.g. 256,512 (got {text!r})") from None
    if not values:
        raise UsageError(f"{option} needs at least one value")
    return values


def parse_name_list(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


# --------------------------------------------------------------------------- what one row is

@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    batch_size: int
    seq_len: int


def model_config(variant: str, backend: str, sizes: Sizes, s: BenchSettings) -> ModelConfig:
    """The ModelConfig of one row (variant may carry a form: 'gru:cho', 'peephole:full')."""
    base, _, form = variant.partition(":")
    extra = {}
    if base == "gru":
        extra["gru_form"] = form or s.gru_form
    if base == "peephole":
        extra["peephole_form"] = form or s.peephole_form
    return ModelConfig(vocab_size=s.vocab, variant=base, backend="custom" if backend == "basic" else backend,
                       embed=s.embed, hidden=sizes.hidden, layers=sizes.layers, **extra)


def has_torch_module(cfg: ModelConfig) -> bool:
    """Whether torch.nn has this cell (nn.RNN, nn.LSTM, nn.GRU in its own form)."""
    return cfg.variant in ("rnn", "lstm") or (cfg.variant == "gru" and cfg.gru_form == "cudnn")


def weight_count(cfg: ModelConfig) -> int:
    """Recurrent and input weights of the stack (the matrices the FLOP count is based on):
    W_ih and W_hh of every layer, and full-matrix peepholes; no biases, embedding or head."""
    G = {"rnn": 1, "lstm": 4, "peephole": 4, "coupled": 3, "gru": 3}[cfg.variant]
    H, total = cfg.hidden, 0
    for k in range(cfg.layers):
        n_in = cfg.embed if k == 0 else H
        total += G * H * (n_in + H)
        if cfg.variant == "peephole" and cfg.peephole_form == "full":
            total += len(cfg.peepholes) * H * H
    return total


def label(variant: str, cfg: ModelConfig) -> str:
    if cfg.variant == "gru":
        return f"gru ({cfg.gru_form})"
    if cfg.variant == "peephole":
        return f"peephole ({cfg.peephole_form})"
    return variant


def use_fused_path(model, on: bool) -> None:
    """Choose, for a custom model, between the fused layers (``on``) and the plain unbind loop."""
    from .layers import Recurrent

    for layer in getattr(model.rnn, "layers", []):
        if isinstance(layer, Recurrent):
            layer.use_fused = on


# --------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_job(model, cfg: ModelConfig, sizes: Sizes, device: torch.device, seed: int,
              clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """A closure timing one training step in seconds: :func:`charlstm.optim.optimisation_step`, the
    trainer's step (forward, cross-entropy, backward, AdamW), on random tokens.

    Unlike the trainer's it does not clip and does not check for NaN (which
    reads the loss back every step): the figure is the step's own work, as the
    reference ``nn.LSTM`` loop and the earlier figures of docs/performance.md
    measured it; no carried state, every step starts from zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (sizes.seq_len, sizes.batch_size), generator=gen).to(device)  # (T, B)
    y = torch.randint(0, cfg.vocab_size, (sizes.seq_len, sizes.batch_size), generator=gen).to(device)  # (T, B)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def job() -> float:
        model.train()
        _sync(device)
        t0 = clock()
        optimisation_step(model, opt, x, y)
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
    try:
        from . import sample as sample_mod
    except ImportError as e:  # pragma: no cover - only before the sampler exists
        raise CharlstmError(f"sampling cannot be measured: charlstm.sample is missing ({e})") from e
    model.eval()
    with torch.inference_mode():
        stepper = sample_mod.ModelStep(model) if reference else sample_mod.make_stepper(model)
    threads = sample_mod.stepping_threads(stepper, threads)
    name = stepper.name + (" (TorchScript)" if getattr(stepper, "scripted", False) else "")
    if reference:
        name = f"nn.LSTM stepped through model.forward ({'oneDNN' if reference == 'onednn' else 'oneDNN off'})"
    opts = sample_mod.SamplingOptions()
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
                stepper.generate(logits0, length, opts, gen)
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
    from tqdm import tqdm

    times = {key: [] for key in jobs}
    total = (warmup + repeats) * len(jobs)
    with tqdm(total=total, desc="measuring", unit="run", file=sys.stderr, disable=not progress, leave=False,
              mininterval=0.5) as bar:
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


def run_bench(s: BenchSettings, *, progress: bool = True) -> dict:
    """Measure everything ``s`` asks for and return the report (JSON-safe)."""
    from .model import build_model

    s.validate()
    clock = CLOCKS[s.clock]
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    all_sizes = [Sizes(*p) for p in itertools.product(s.hidden, s.layers, s.batch_size, s.seq_len)]
    measures = set(s.measures)

    jobs: dict = {}
    rows: list[dict] = []
    skipped: list[str] = []
    steppers: dict = {}
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
            if backend == "cudnn" and not has_torch_module(cfg):
                note = f"{label(variant, cfg)} has no torch.nn module (cudnn backend): skipped"
                if note not in skipped:
                    skipped.append(note)
                continue
            torch.manual_seed(s.seed)
            model = build_model(cfg).to(device)
            if backend in ("custom", "basic"):
                use_fused_path(model, backend == "custom")
            row = {"variant": label(variant, cfg), "backend": backend, "baseline": baseline,
                   **dataclasses.asdict(sizes), "embed": s.embed, "vocab": s.vocab,
                   "weights": weight_count(cfg), "model": model}
            rows.append(row)
            if "train" in measures:
                jobs[(id(row), "train")] = train_job(model, cfg, sizes, device, s.seed, clock)
            for measure, streams in (("sample", 1), ("sample-batch", sizes.batch_size)):
                if measure not in measures:
                    continue
                jobs[(id(row), measure)], steppers[(id(row), measure)] = sample_job(
                    model, streams, s.sample_length, device, s.seed, threads=s.sample_threads, clock=clock)
                if baseline:
                    # nn.LSTM stepped one character at a time, with and without oneDNN: the
                    # faster of the two is the reference of the sampling ratios
                    for ref in ("onednn", "no-onednn"):
                        jobs[(id(row), measure, ref)], steppers[(id(row), measure, ref)] = sample_job(
                            model, streams, s.sample_length, device, s.seed, reference=ref,
                            threads=s.sample_threads, clock=clock)
    peak_shapes = sorted({(z.batch_size, z.hidden) for z in all_sizes})
    for B, H in peak_shapes:
        jobs[("peak", "recurrent", B, H)] = mm_job(B, H, 4 * H, device, transposed=True, clock=clock)
    if s.peak_size:
        n = s.peak_size
        jobs[("peak", "square", n)] = mm_job(n, n, n, device, transposed=False, clock=clock)

    times = run_rounds(jobs, s.warmup, s.repeats, progress)

    # peaks
    peak = {"square": None, "recurrent": []}
    if s.peak_size:
        n = s.peak_size
        t = times[("peak", "square", n)]
        peak["square"] = {"shape": [n, n, n], "gflops": 2 * n ** 3 / statistics.median(t) / 1e9,
                          "best_gflops": 2 * n ** 3 / min(t) / 1e9}
    recurrent_peak = {}
    for B, H in peak_shapes:
        t = times[("peak", "recurrent", B, H)]
        flops = 2 * B * H * 4 * H
        recurrent_peak[(B, H)] = flops / statistics.median(t) / 1e9
        peak["recurrent"].append({"batch_size": B, "hidden": H, "shape": [B, H, 4 * H],
                                  "gflops": recurrent_peak[(B, H)], "best_gflops": flops / min(t) / 1e9})

    # figures
    def base_row(row):
        return next(r for r in rows if r["baseline"] and all(r[f] == row[f] for f in
                                                             ("hidden", "layers", "batch_size", "seq_len")))

    results = []
    for row in rows:
        base = base_row(row)
        out = {k: v for k, v in row.items() if k != "model"}
        for measure, streams, flops_per_weight in (("train", row["batch_size"] * row["seq_len"], 6),
                                                   ("sample", 1, 2),
                                                   ("sample-batch", row["batch_size"], 2)):
            key = (id(row), measure)
            if key not in times:
                continue
            chars = streams if measure == "train" else streams * s.sample_length
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

    baselines = []
    for row in rows:
        if not row["baseline"]:
            continue
        entry = {f: row[f] for f in ("hidden", "layers", "batch_size", "seq_len")}
        if (id(row), "train") in times:
            t = times[(id(row), "train")]
            entry["train_chars_per_s"] = row["batch_size"] * row["seq_len"] / statistics.median(t)
        for measure, streams in (("sample", 1), ("sample-batch", row["batch_size"])):
            for ref in ("onednn", "no-onednn"):
                key = (id(row), measure, ref)
                if key in times:
                    name = f"{measure.replace('-', '_')}_{ref.replace('-', '_')}_chars_per_s"
                    entry[name] = streams * s.sample_length / statistics.median(times[key])
        entry["sample_reference"] = ("nn.LSTM stepped one character at a time through model.forward, "
                                     "with oneDNN (torch's default) and without; ratios use the faster")
        baselines.append(entry)

    # per FLOP against custom lstm at the same sizes
    for r in results:
        if "train" not in r:
            continue
        twin = next((q for q in results if q["variant"] == "lstm" and q["backend"] == r["backend"]
                     and all(q[f] == r[f] for f in ("hidden", "layers", "batch_size", "seq_len"))), None)
        if twin is not None and "train" in twin:
            r["train"]["gflops_ratio_to_lstm_same_backend"] = r["train"]["gflops"] / twin["train"]["gflops"]

    return {
        "command": "charlstm bench",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "native": native_status()},
        "settings": {k: v for k, v in dataclasses.asdict(s).items()},
        "flops": {"train_per_weight_per_char": 6, "sample_per_weight_per_char": 2,
                  "counted": "W_ih and W_hh of every layer (and full peephole matrices); no head, no pointwise"},
        "peak": peak,
        "baselines": baselines,
        "results": results,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- output

def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def make_table(report: dict):
    """A rich Table of the report's results."""
    from rich.table import Table

    peak = report["peak"]
    m = report["machine"]
    parts = [f"{m['cpu']}, {m['threads']} thread(s), torch {m['torch']}"]
    if peak["square"]:
        n = peak["square"]["shape"][0]
        parts.append(f"mm peak {peak['square']['gflops']:.1f} GFLOP/s ({n}x{n}x{n})")
    for p in peak["recurrent"]:
        B, H, H4 = p["shape"]
        parts.append(f"{p['gflops']:.1f} at {B}x{H} by {H}x{H4}")
    table = Table(title="charlstm bench: " + "; ".join(parts), title_justify="left")
    for name, justify in (("variant", "left"), ("backend", "left"), ("H", "right"), ("L", "right"),
                          ("B", "right"), ("T", "right"),
                          ("train chars/s", "right"), ("x nn.LSTM", "right"), ("GFLOP/s", "right"),
                          ("% mm peak", "right"),
                          ("sample 1 chars/s", "right"), ("x nn.LSTM", "right"),
                          ("sample B chars/s", "right"), ("x nn.LSTM", "right")):
        table.add_column(name, justify=justify)

    def cells(fig: dict | None, *, with_flops: bool) -> list[str]:
        if fig is None:
            return ["-", "-"] + (["-", "-"] if with_flops else [])
        out = [_fmt_rate(fig["chars_per_s"]), f"{fig['ratio_to_nn_lstm']:.2f}"]
        if with_flops:
            frac = fig.get("fraction_of_mm_peak")
            out += [f"{fig['gflops']:.1f}", "-" if frac is None else f"{100 * frac:.0f}%"]
        return out

    for r in report["results"]:
        table.add_row(r["variant"], r["backend"], str(r["hidden"]), str(r["layers"]), str(r["batch_size"]),
                      str(r["seq_len"]),
                      *cells(r.get("train"), with_flops=True),
                      *cells(r.get("sample"), with_flops=False),
                      *cells(r.get("sample_batch"), with_flops=False))
    return table


def native_status() -> str:
    """Whether the custom layers' time loops and the LSTM sampling step run in C here (charlstm/native.py)."""
    from . import native

    lib, why = native.library()
    if lib is None:
        return f"unavailable ({why}): torch loops and the TorchScript step"
    return ("C loops for custom lstm, peephole (diag), coupled, gru (both forms) and rnn with H a multiple of 32 "
            "on the CPU; C sampling step for every variant but peephole (full)")


def table_footer(report: dict) -> list[str]:
    """Lines printed under the table: the sampling reference and the method."""
    lines = [f"native kernels: {report['machine'].get('native', 'not recorded')}"]
    for b in report["baselines"]:
        ref = [f"{k.replace('_chars_per_s', '').replace('_', ' ').replace('onednn', 'oneDNN')} "
               f"{_fmt_rate(v)} chars/s"
               for k, v in b.items() if k.endswith("_chars_per_s") and k.startswith("sample")]
        if ref:
            lines.append(f"sampling ratios are to the faster nn.LSTM stepped through model.forward "
                         f"(H={b['hidden']} L={b['layers']} B={b['batch_size']}): " + ", ".join(ref))
    steppers = {r[m]["stepper"] for r in report["results"] for m in ("sample", "sample_batch") if m in r}
    if steppers:
        st = report["settings"]["sample_threads"]
        lines.append("sampler stepper: " + ", ".join(sorted(steppers))
                     + (f", {st} thread(s) while sampling" if st else
                        ", threads as charlstm sample: all cores for the native step, 1 for the torch steps"))
    s = report["settings"]
    clock = "wall-clock time" if s["clock"] == "wall" else "this process's CPU time"
    lines.append(f"{clock}; medians of {s['repeats']} interleaved rounds after {s['warmup']} warm-up round(s); "
                 "ratios are medians of per-round ratios; training FLOPs = 6 x weights x chars, sampling 2 x")
    lines.extend(report["skipped"])
    return lines


def run_from_cli(*, variants: str, backends: str, hidden: str, layers: str, batch_size: str, seq_len: str,
                 embed: int, vocab: int, peephole_form: str, gru_form: str, device: str, threads: int | None,
                 repeats: int, warmup: int, sample_length: int, measures: str, peak_size: int, seed: int,
                 clock: str, json_out: bool, sample_threads: int | None = None) -> dict:
    """`charlstm bench`: measure, then print a table (or one JSON object with --json)."""
    import json

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be one of auto, cpu, cuda (got {device!r})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if peephole_form not in PEEPHOLE_FORMS:
        raise UsageError(f"--peephole-form must be one of {', '.join(PEEPHOLE_FORMS)} (got {peephole_form!r})")
    if gru_form not in GRU_FORMS:
        raise UsageError(f"--gru-form must be one of {', '.join(GRU_FORMS)} (got {gru_form!r})")
    settings = BenchSettings(
        variants=parse_name_list(variants), backends=parse_name_list(backends),
        hidden=parse_int_list(hidden, "--hidden"), layers=parse_int_list(layers, "--layers"),
        batch_size=parse_int_list(batch_size, "--batch-size"), seq_len=parse_int_list(seq_len, "--seq-len"),
        embed=embed, vocab=vocab, peephole_form=peephole_form, gru_form=gru_form, device=device,
        threads=threads, sample_threads=sample_threads, repeats=repeats, warmup=warmup,
        sample_length=sample_length,
        measures=parse_name_list(measures), peak_size=peak_size, seed=seed, clock=clock,
    )
    report = run_bench(settings, progress=True)
    if json_out:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        from rich.console import Console

        console = Console(width=max(160, Console().width))
        console.print(make_table(report))
        for line in table_footer(report):
            console.print(line, highlight=False)
    return report

"""Sampling speed: characters per second of charlstm's steps against nn.LSTM called step by step.

    .venv/bin/python benchmarks/sampling.py                 # 2 x 384 and 2 x 256, 1 and 32 streams
    .venv/bin/python benchmarks/sampling.py --hidden 384 --json
    .venv/bin/python benchmarks/sampling.py --precision-error RUN   # fp16, int8 against fp32 weights on RUN's val split
    .venv/bin/python benchmarks/sampling.py --hidden 384 --streams 1 --only native   # the native steps alone

Every stepper generates from the same randomly initialised 2-layer LSTM
(vocabulary 65, embedding 64: tinyshakespeare's sizes) in the same process,
interleaved over several rounds so that a slow moment of a shared machine hits
all of them; the best round of each is reported, and the median beside it.
Before timing, the benchmark checks that the steppers agree (same greedy text);
it exits with status 1 if they do not, or, with --strict, if a target of
docs/sampling.md is missed.

Steppers:
  nn.LSTM stepped             model.forward on one character at a time (torch's nn.LSTM, T = 1)
  nn.LSTM stepped, no oneDNN  the same with torch.backends.mkldnn disabled (torch 2.13's CPU
                              nn.LSTM goes through oneDNN, which costs several ms per call)
  fast (eager)                charlstm.steppers.FastStep, its Python loop
  fast (TorchScript)          the same, the loop compiled (the torch step of `charlstm sample`)
  native fp32                 charlstm.native.step.NativeStep: the C step (what `charlstm sample` uses
                              for an LSTM where it can be compiled)
  native fp16                 the same with float16 weights (`charlstm sample --precision fp16`)
  native int8                 the same with int8 weights, a scale per row (`charlstm sample --precision int8`)

The ratio "best/stepped" divides charlstm sample's own step (native fp32 where
available, else fast (TorchScript)) by the faster of the two nn.LSTM baselines.
Threads default to charlstm sample's: one for the torch steps (a second thread
mostly waits for the first's small operations), all cores for the native step
(which shares each step out); --threads N sets all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import warnings

import torch

from charlstm.config import ModelConfig
from charlstm.model import build_model
from charlstm.native.build import library
from charlstm.native.step import NativeStep, unsupported
from charlstm.runtime import torch_threads
from charlstm.sampling import SamplingOptions, gumbel_noise
from charlstm.steppers import FastStep, ModelStep, read_prime

TARGETS = {  # (hidden, streams): chars/s, and the ratio to stepped nn.LSTM, for 2 layers (issue 6 / issue 8)
    (384, 1): (4000, 2.0),
    (384, 32): (25000, None),
    (256, 1): (20000, None),
}


def make_model(hidden: int, layers: int, vocab: int, embed: int, variant: str = "lstm"):
    torch.manual_seed(0)
    backend = "cudnn" if variant in ("lstm", "rnn", "gru") else "custom"      # the baselines are torch.nn's
    model = build_model(ModelConfig(vocab_size=vocab, variant=variant, hidden=hidden, layers=layers, embed=embed,
                                    backend=backend))
    return model.eval()


BASELINES = ("nn.LSTM stepped", "nn.LSTM stepped, no oneDNN")


def steppers(model):
    out = {
        "nn.LSTM stepped": lambda: ModelStep(model),
        "nn.LSTM stepped, no oneDNN": lambda: ModelStep(model),
        "fast (eager)": lambda: FastStep(model, script=False),
        "fast (TorchScript)": lambda: FastStep(model, script=True),
    }
    if library()[0] is not None and unsupported(model) is None:
        out["native fp32"] = lambda: NativeStep(model, "fp32")
        out["native fp16"] = lambda: NativeStep(model, "fp16")
        out["native int8"] = lambda: NativeStep(model, "int8")
    only = ONLY["names"]
    return {n: f for n, f in out.items() if not only or any(n.startswith(o) for o in only) or n in BASELINES}


def own_step(names) -> str:
    """The step `charlstm sample` takes for an LSTM: the native one where it runs."""
    return "native fp32" if "native fp32" in names else "fast (TorchScript)"


THREADS: dict = {"all": None}      # set by main: torch threads of every stepper, or None (charlstm sample's)
ONLY: dict = {"names": []}          # set by main: the steppers measured beside the baselines (prefixes; [] all)


def threads_for(name: str) -> int | None:
    if THREADS["all"] is not None:
        return THREADS["all"]
    return None if name.startswith("native") else 1


def run(model, make, streams: int, chars: int, seed: int = 0, greedy: bool = False,
        onednn: bool = True, threads: int | None = 1) -> tuple[float, torch.Tensor]:
    """Seconds to generate `chars` characters per stream after a one-character prime, and the ids."""
    opts = SamplingOptions(temperature=1.0, greedy=greedy)
    gen = torch.Generator().manual_seed(seed)
    flags = contextlib.nullcontext() if onednn else torch.backends.mkldnn.flags(enabled=False)

    def noise(n: int):                                  # drawn inside the timing, as charlstm sample does
        return None if greedy else gumbel_noise(n, streams, model.cfg.vocab_size, gen, torch.device("cpu"))

    with torch.inference_mode(), flags, torch_threads(threads):
        stepper = make()
        logits, state = read_prime(model, torch.tensor([0]), streams)
        stepper.load_state(state)
        stepper.generate(logits, 8, opts, noise(8))     # warm-up (first TorchScript call optimises)
        t0, c0 = time.perf_counter(), time.process_time()
        out, _ = stepper.generate(logits, chars, opts, noise(chars))
        return (time.perf_counter() - t0, time.process_time() - c0), out


def check_agreement(model) -> None:
    """The float32 steppers must produce the same greedy text (they compute model.forward's logits)."""
    ref = None
    for name, make in steppers(model).items():
        if name in ("native fp16", "native int8"):
            continue                    # their logits differ by the weights' rounding: see --precision-error
        _, out = run(model, make, 2, 64, greedy=True, onednn="no oneDNN" not in name, threads=threads_for(name))
        if ref is None:
            ref = out
        elif not torch.equal(out, ref):
            print(f"FAIL: {name} generates a different greedy text than nn.LSTM stepped", file=sys.stderr, flush=True)
            sys.exit(1)


def limits(model, rounds: int, seconds: float) -> dict:
    """What bounds one stream: the weight reads alone (the step's matrix products, in the same order
    on the same tensors, nothing else) and the step without its weights (the same 2-layer step at
    H = 8: per-operation overhead). Chars/s and the bandwidth of the weight reads, CPU time."""
    step = FastStep(model)
    mats = [w for layer in step.layers for w in (layer[0], layer[2]) if w.numel()] + [step.head_w]
    weight_bytes = sum(w.numel() * w.element_size() for w in mats) + step.table.shape[1] * 4
    xs = [torch.zeros(1, w.shape[0]) for w in mats]

    def reads(n: int) -> None:
        for _ in range(n):
            for x, w in zip(xs, mats):
                torch.mm(x, w)

    tiny = make_model(8, model.cfg.layers, 65, 8)
    tiny_step = lambda: FastStep(tiny, script=True)  # noqa: E731

    out = {"weight_bytes_per_char": weight_bytes}
    with torch.inference_mode(), torch_threads(threads_for("fast (TorchScript)")):
        reads(20)
        n = max(50, int(seconds / 2e-4))
        best = min(_cpu_time(reads, n) for _ in range(rounds)) / n
        out["weights_only_chars_per_cpu_sec"] = 1.0 / best
        out["weight_read_gb_per_sec"] = weight_bytes / best / 1e9
        rates = []
        for _ in range(rounds):
            (_, dc), _ = run(tiny, tiny_step, 1, 2000)
            rates.append(2000 / dc)
        out["overhead_only_chars_per_cpu_sec"] = max(rates)
    return out


def _cpu_time(fn, n: int) -> float:
    c0 = time.process_time()
    fn(n)
    return time.process_time() - c0


def precision_error(run: str, as_json: bool, streams: int = 16, chars: int = 2000) -> int:
    """Feed `streams` stretches of `chars` characters of RUN's validation split through the native step
    with fp32, fp16 and int8 weights (the same inputs: the text, not what each would sample) and print
    what rounding the weights changes: the logits, the loss, the most likely next character."""
    from pathlib import Path

    from charlstm.checkpoint import load_checkpoint, resolve_checkpoint
    from charlstm.evaluate import split_tokens

    if library()[0] is None:
        print(f"the native step is unavailable: {library()[1]}", file=sys.stderr)
        return 1
    ckpt = load_checkpoint(resolve_checkpoint(Path(run)))
    model = ckpt.model.float().eval()
    tokens, _ = split_tokens(ckpt, "val", progress=False)
    span = tokens.numel() // streams
    chars = min(chars, span - 1)
    idx = torch.stack([tokens[s * span:s * span + chars + 1] for s in range(streams)], 1).long()   # (T + 1, B)
    out = {"chars": chars * streams}
    with torch.inference_mode():
        ref, _ = model(idx[:-1])                                                        # (T, B, V)
        logits = {}
        for precision in ("fp32", "fp16", "int8"):
            step = NativeStep(model, precision)
            step.load_state(model.init_state(streams))
            logits[precision] = torch.stack([step.advance(x) for x in idx[:-1]])
        for name, lg in (("model.forward", ref), *logits.items()):
            out[f"loss_nats_{name}"] = torch.nn.functional.cross_entropy(lg.flatten(0, 1), idx[1:].flatten()).item()
        out["max_abs_logit_diff_fp32_forward"] = (logits["fp32"] - ref).abs().max().item()
        p32 = logits["fp32"].log_softmax(-1)
        for low in ("fp16", "int8"):
            d = (logits[low] - logits["fp32"]).abs()
            p = logits[low].log_softmax(-1)
            out.update({f"loss_change_{low}_nats": out[f"loss_nats_{low}"] - out["loss_nats_fp32"],
                        f"max_abs_logit_diff_{low}_fp32": d.max().item(),
                        f"mean_abs_logit_diff_{low}_fp32": d.mean().item(),
                        f"kl_fp32_to_{low}_nats": (p32.exp() * (p32 - p)).sum(-1).mean().item(),
                        f"same_argmax_fraction_{low}": (logits[low].argmax(-1) == logits["fp32"].argmax(-1))
                        .float().mean().item()})
    if as_json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:<36} {v:.6g}" if isinstance(v, float) else f"{k:<36} {v}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[384, 256])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.6, help="rough time per measurement")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of every stepper (default: charlstm sample's, 1 for torch steps, all for native)")
    ap.add_argument("--precision-error", metavar="RUN", default=None,
                    help="instead: fp16 and int8 against fp32 weights of the native step on RUN's validation split")
    ap.add_argument("--only", default="", help="comma-separated stepper name prefixes to measure beside the "
                                               "nn.LSTM baselines (e.g. native)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--limits", action="store_true", help="also measure what bounds one stream: weight reads alone, "
                                                          "per-operation overhead alone")
    args = ap.parse_args()
    THREADS["all"] = args.threads
    ONLY["names"] = [n.strip() for n in args.only.split(",") if n.strip()]
    warnings.simplefilter("ignore", UserWarning)   # torch's notes about NumPy and oneDNN's TF32 are not ours
    if args.precision_error:
        return precision_error(args.precision_error, args.json)

    results = []
    missed = []
    for H in args.hidden:
        model = make_model(H, args.layers, 65, 64)
        check_agreement(model)
        for B in args.streams:
            wall: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            sizes = {}
            for name, make in steppers(model).items():   # calibrate: about args.seconds per measurement
                (dt, _), _ = run(model, make, B, 64, onednn="no oneDNN" not in name, threads=threads_for(name))
                sizes[name] = max(32, int(64 * args.seconds / max(dt, 1e-6)))
            for _ in range(args.rounds):
                for name, make in steppers(model).items():
                    (dt, dc), _ = run(model, make, B, sizes[name], onednn="no oneDNN" not in name,
                                      threads=threads_for(name))
                    wall.setdefault(name, []).append(sizes[name] * B / dt)
                    cpu.setdefault(name, []).append(sizes[name] * B / max(dc, 1e-9))
            row = {"hidden": H, "layers": args.layers, "streams": B,
                   "chars_per_sec": {n: max(r) for n, r in wall.items()},
                   "median_chars_per_sec": {n: statistics.median(r) for n, r in wall.items()},
                   "chars_per_cpu_sec": {n: statistics.median(r) for n, r in cpu.items()}}
            row["threads"] = {n: threads_for(n) or torch.get_num_threads() for n in wall}
            row["own_step"] = own_step(wall)
            best = row["chars_per_sec"][row["own_step"]]
            base = max(row["chars_per_sec"][n] for n in BASELINES)
            row["speedup_vs_stepped"] = best / base
            for low in ("native fp16", "native int8"):           # median of per-round ratios (rounds interleave)
                if low in wall and "native fp32" in wall:
                    row[f"{low.split()[1]}_over_fp32"] = statistics.median(a / b for a, b in zip(wall[low],
                                                                                              wall["native fp32"]))
            target = TARGETS.get((H, B)) if args.layers == 2 else None
            if target:
                rate, ratio = target
                ok = best >= rate and (ratio is None or best / base >= ratio)
                row["target"] = {"chars_per_sec": rate, "speedup": ratio, "met": ok}
                if not ok:
                    missed.append(f"{args.layers}x{H}, {B} stream(s), {row['own_step']}: {best:,.0f} chars/s, "
                                  f"{best / base:.1f}x "
                                  f"(target {rate:,} chars/s" + (f", {ratio}x" if ratio else "") + ")")
            if args.limits and B == 1:
                row["limits"] = lim = limits(model, args.rounds, args.seconds)
                for n, half in (("native fp32", False), ("native fp16", True)):
                    if n in row["chars_per_sec"]:   # the bytes it reads: the matrices (halved for fp16), a table row
                        matrices = lim["weight_bytes_per_char"] - 4 * H * 4
                        read = (matrices / 2 if half else matrices) + 4 * H * 4
                        lim[f"{n.replace(' ', '_')}_gb_per_sec"] = read * row["chars_per_sec"][n] / 1e9
            results.append(row)
            if not args.json:
                print(f"{args.layers} x {H}, {B} stream(s)"
                      + ("" if "target" not in row else "  target " + ("met" if row["target"]["met"] else "MISSED"))
                      + f"; {row['own_step']}/stepped {row['speedup_vs_stepped']:.1f}x", flush=True)
                for low in ("fp16", "int8"):
                    if f"{low}_over_fp32" in row:
                        print(f"    native {low} / native fp32: {row[f'{low}_over_fp32']:.2f}x "
                              "(median of per-round ratios)", flush=True)
                for n in wall:
                    print(f"    {n:<28} {row['threads'][n]} thr {row['chars_per_sec'][n]:>9,.0f} chars/s best "
                          f"(median {row['median_chars_per_sec'][n]:>9,.0f})   "
                          f"{row['chars_per_cpu_sec'][n]:>9,.0f} chars per CPU second", flush=True)
                if "limits" in row:
                    lim = row["limits"]
                    print(f"    limits: weight reads alone ({lim['weight_bytes_per_char'] / 1e6:.1f} MB per char) "
                          f"{lim['weights_only_chars_per_cpu_sec']:,.0f} chars per CPU second "
                          f"({lim['weight_read_gb_per_sec']:.1f} GB/s); per-operation overhead alone (H = 8) "
                          f"{lim['overhead_only_chars_per_cpu_sec']:,.0f} chars per CPU second", flush=True)
                    for n in ("native_fp32", "native_fp16"):
                        if f"{n}_gb_per_sec" in lim:
                            print(f"    {n.replace('_', ' ')} reads its weights at {lim[f'{n}_gb_per_sec']:.1f} GB/s "
                                  f"(best round, {row['threads'][n.replace('_', ' ')]} thread(s))", flush=True)
    info = {"torch": torch.__version__, "cores": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine()}
    if args.json:
        print(json.dumps({"results": results, "missed": missed, **info}))
    else:
        print(f"torch {info['torch']}, {info['cores']} torch threads by default (thr: threads used per stepper)")
        for m in missed:
            print("target missed: " + m)
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make gpu-check`: one command that proves the GPU path (issue 21), in under 8 minutes on one GPU.

1. prints the device and versions;
2. runs every CUDA test (pytest -k "cuda or triton": the tests named for CUDA, and
   tests/test_triton.py, which runs the compiled Triton kernels on CUDA);
3. `charlstm bench --device cuda` for every variant on both backends (and, where the
   CHARLSTM_TRITON hook is wired into the layers, on the Triton path, and on it with CUDA
   graphs and --bf16 beside cuDNN in bf16) at the reference shape (V 65, E 64, H 256, L 2,
   B 32, T 128) and at H 1024 / B 128, training only;
4. times one layer's training window (forward and backward) for every cell on cuDNN,
   fused.py's torch loop, the Triton kernels, and both under CUDA graphs, fp32 and bf16,
   and checks the Triton outputs against the torch loop;
5. trains the shakespeare preset for 60 s with bf16 and reports its validation loss;
6. samples 10,000 characters from that run.

Everything goes to one JSON file (--out). Exit status 1 when any stage fails (a CUDA
error, a failed test, a wrong result); without a CUDA device it prints why and exits 0.
``--plumbing`` runs every stage on the CPU at toy sizes (the Triton kernels under
TRITON_INTERPRET=1, no tests, no figures worth keeping): a check of this script itself.

    python benchmarks/gpu_check.py [--out checkpoints/gpu-check.json] [--quick] [--plumbing] [--skip train,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charlstm import cells, gpu  # noqa: E402
from charlstm.gpu import graphs  # noqa: E402
from charlstm.registry import CELLS, spec_named  # noqa: E402

VARIANTS = "lstm,peephole,peephole:full,coupled,gru,gru:cho,rnn"


@dataclasses.dataclass
class Plan:
    """What to run: the GPU check proper, or its plumbing on the CPU at toy sizes."""

    device: str = "cuda"
    shapes: dict = dataclasses.field(default_factory=lambda: {
        "reference": dict(hidden=256, batch=32), "large": dict(hidden=1024, batch=128)})
    seq_len: int = 128
    train_seconds: int = 60
    sample_length: int = 10000
    repeats: int = 5
    tests: bool = True
    skip: tuple = ()        # stages left out: "bench", "train", "layers" (tests: --plumbing)


PLUMBING = Plan(device="cpu", shapes={"reference": dict(hidden=16, batch=3)}, seq_len=4, train_seconds=3,
                sample_length=200, repeats=1, tests=False)
CUDA_ERROR = re.compile(r"CUDA error|cudaError|CUBLAS_STATUS|CUDNN_STATUS|illegal memory access|"
                        r"device-side assert|CUDA out of memory|triton\.compiler\.errors")
PY = sys.executable


def say(msg: str) -> None:
    print(f"gpu-check: {msg}", flush=True)


def run(cmd: list[str], *, timeout: float, env: dict | None = None) -> dict:
    """A subprocess from the repository root: rc, seconds, output tails, and any CUDA error seen."""
    t0 = time.perf_counter()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
        err += f"\ntimed out after {timeout:.0f} s"
    m = CUDA_ERROR.search(out + err)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "cuda_error": m.group(0) if m else None, "stdout": out, "stderr_tail": err[-4000:]}


def ok(result: dict) -> bool:
    return result["rc"] == 0 and result["cuda_error"] is None


# --------------------------------------------------------------------------- 1. device and versions

def device_info(device: str) -> dict:
    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    info.update(torch=torch.__version__, cuda=torch.version.cuda, triton=_triton_version(),
                triton_unavailable=gpu.why_unavailable(), python=platform.python_version(),
                triton_hook_wired=triton_hook_wired())
    return info


def _triton_version() -> str | None:
    try:
        import triton  # optional: only for its version
        return triton.__version__
    except ImportError:
        return None


def triton_hook_wired() -> bool:
    """Whether the cell registry lists the Triton paths (CHARLSTM_TRITON=1 then routes custom cells there)."""
    return any(path.name == "triton" for spec in CELLS for path in spec.fast_paths)


# --------------------------------------------------------------------------- 2. tests

def cuda_tests() -> dict:
    r = run([PY, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-k", "cuda or triton", "tests"], timeout=240)
    tail = r["stdout"].strip().splitlines()[-1:] or [""]
    r["summary"] = tail[0]
    r["failed"] = [line for line in r["stdout"].splitlines() if line.startswith(("FAILED", "ERROR"))]
    # a test skipped for want of CUDA (or of the Triton kernels) on a CUDA machine is a failure
    r["wrongly_skipped"] = [line for line in r["stdout"].splitlines()
                            if "SKIPPED" in line and re.search(r"needs (a )?CUDA|Triton kernels unavailable", line)]
    if r["wrongly_skipped"]:
        r["rc"] = r["rc"] or 1
    r["stdout"] = r["stdout"][-6000:]
    return r


# --------------------------------------------------------------------------- 3. charlstm bench

def bench(plan: Plan, shape: dict, backends: str, triton: bool, *, fast: bool = False) -> dict:
    """charlstm bench at one shape; ``triton``: CHARLSTM_TRITON=1; ``fast``: also CUDA graphs and bf16
    (the combination that matched cuDNN for one layer on an H200)."""
    cmd = [PY, "-m", "charlstm", "bench", "--device", plan.device, "--variants", VARIANTS, "--backends", backends,
           "--hidden", str(shape["hidden"]), "--batch-size", str(shape["batch"]), "--layers", "2",
           "--seq-len", str(plan.seq_len), "--embed", "64", "--vocab", "65", "--measures", "train",
           "--repeats", str(plan.repeats), "--warmup", "2", "--json"]
    if plan.device == "cpu":
        cmd += ["--peak-size", "0"]
    if fast and plan.device == "cuda":
        cmd += ["--bf16"]
    r = run(cmd, timeout=300, env={gpu.ENV: "1" if triton else "0", graphs.ENV: "1" if fast else "0"})
    report = _json_or_none(r["stdout"])
    if report is None:
        r["rc"] = r["rc"] or 1
    r["stdout"] = None
    r["report"] = report
    r["rows"] = _bench_rows(report) if report else []
    return r


def _bench_rows(report: dict) -> list[dict]:
    """variant, backend, chars/s, GFLOP/s and GFLOP/s as a fraction of cuDNN lstm's (in that run)."""
    rows = [r for r in report.get("results", []) if r.get("train")]
    ref = next((r["train"]["gflops"] for r in rows if r["variant"] == "lstm" and r["backend"] == "cudnn"), None)
    return [{"variant": r["variant"], "backend": r["backend"], "chars_per_s": r["train"]["chars_per_s"],
             "gflops": r["train"]["gflops"],
             "per_flop_vs_cudnn_lstm": r["train"]["gflops"] / ref if ref else None} for r in rows]


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


# --------------------------------------------------------------------------- 4. one layer's window

SPEC_OF_KIND = {"lstm": "lstm", "peephole": "peephole:diag", "peephole_full": "peephole:full", "coupled": "coupled",
                "gru": "gru:cudnn", "gru_cho": "gru:cho", "rnn": "rnn"}     # gpu.KINDS -> registry names


def make_cell(kind: str, E: int, H: int) -> cells.Cell:
    spec = spec_named(SPEC_OF_KIND[kind])
    return spec.cell(E, H, **({"form": spec.form} if spec.variant == "peephole" else {}))


def torch_loop(kind: str):
    """The registry's torch loop (fused.py) of a kind's cell, as run(cell, x, state)."""
    return spec_named(SPEC_OF_KIND[kind]).fast_paths[-1].run


def window_flops(kind: str, E: int, H: int, T: int, B: int) -> float:
    """6 per weight per character (2 forward, 4 backward), as charlstm bench counts them."""
    G = {"lstm": 4, "peephole": 4, "peephole_full": 4, "coupled": 3, "gru": 3, "gru_cho": 3, "rnn": 1}[kind]
    weights = G * H * (E + H) + (3 * H * H if kind == "peephole_full" else 0)
    return 6.0 * weights * T * B


def time_window(step, device: str, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of step() (a forward and backward), the device synchronised around each."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _paths(kind: str, cell: cells.Cell, dtype: torch.dtype) -> dict:
    """name -> layer(x, state) -> (h, state) for each way this cell can run (graphs: CUDA only)."""
    torch_loop_layer = graphs.Window(cell, torch_loop(kind))
    triton = graphs.Window(cell, gpu.triton_loop(kind).run)
    paths = {"triton": triton, "triton+graphs": lambda x, s: graphs.run_graphed(triton, x, s)}
    if dtype == torch.float32:                  # fused.py's loops do not run under autocast
        paths["torch-loop"] = torch_loop_layer
        paths["torch-loop+graphs"] = lambda x, s: graphs.run_graphed(torch_loop_layer, x, s)
    mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}.get(kind)
    if mod is not None:
        net = mod(cell.input_size, cell.hidden_size).to(cell.weight_hh.device)
        paths["cudnn"] = lambda x, s: net(x)
    return paths


def layer_bench(plan: Plan, H: int, B: int) -> dict:
    """Seconds per training window of one layer (E = H: a second layer) for every path,
    float32 and bf16 (autocast), and the Triton outputs checked against the torch loop."""
    T, E, dev = plan.seq_len, H, plan.device
    out = {"H": H, "B": B, "T": T, "E": E, "rows": [], "checks": []}
    for dtype in (torch.float32, torch.bfloat16):
        for kind in gpu.KINDS:
            torch.manual_seed(0)
            cell = make_cell(kind, E, H).to(dev)
            x = torch.randn(T, B, E, device=dev, requires_grad=True)
            state = cell.zero_state(B, device=dev)
            for name, layer in _paths(kind, cell, dtype).items():
                def step(layer=layer, dtype=dtype, x=x, state=state):
                    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        h, _ = layer(x, state)
                    h.float().sum().backward()
                sec = time_window(step, dev, repeats=plan.repeats)
                out["rows"].append({"kind": kind, "dtype": str(dtype).removeprefix("torch."), "path": name,
                                    "ms": round(sec * 1e3, 3), "gflops": window_flops(kind, E, H, T, B) / sec / 1e9})
            if dtype == torch.float32:
                out["checks"].append(_check_triton(kind, cell, x, state))
        graphs.clear()
    _per_flop(out["rows"])
    return out


def _per_flop(rows: list[dict]) -> None:
    """GFLOP/s as a fraction of cuDNN lstm's at the same dtype."""
    for r in rows:
        ref = next((q["gflops"] for q in rows if q["kind"] == "lstm" and q["path"] == "cudnn"
                    and q["dtype"] == r["dtype"]), None)
        r["per_flop_vs_cudnn_lstm"] = r["gflops"] / ref if ref else None


def _check_triton(kind: str, cell, x, state) -> dict:
    """The Triton layer against fused.py's torch loop (float32, IEEE products on both)."""
    with torch.no_grad():
        h, _ = gpu.run_cell(kind, cell, x, state)
        h_ref, _ = torch_loop(kind)(cell, x, state)
    diff = (h - h_ref).abs().max().item()
    return {"kind": kind, "max_abs_diff": diff, "ok": diff < 1e-3}


# --------------------------------------------------------------------------- 5, 6. train and sample

def _shakespeare_data() -> str:
    """The preset's corpus: its cached copy, else the shared read-only copy copied into data/."""
    cached = ROOT / "data" / "tinyshakespeare.txt"
    shared = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not cached.exists() and shared.exists():
        shutil.copyfile(shared, cached)
    return "tinyshakespeare"


def train_and_sample(plan: Plan, run_dir: Path) -> dict:
    """The shakespeare preset for plan.train_seconds with bf16, its validation loss (charlstm eval),
    and plan.sample_length characters sampled from it."""
    train = run([PY, "-m", "charlstm", "train", "--preset", "shakespeare", "--data", _shakespeare_data(),
                 "--device", plan.device, "--bf16", "--max-time", f"{plan.train_seconds}s", "--out", str(run_dir),
                 "--overwrite", "--no-progress"], timeout=plan.train_seconds + 150)
    train["stdout"] = train["stdout"][-3000:]
    result = {"train": train}
    if not ok(train):
        return result
    ev = run([PY, "-m", "charlstm", "eval", str(run_dir), "--device", plan.device, "--json"], timeout=150)
    result["eval"] = {**ev, "result": _json_or_none(ev["stdout"]), "stdout": None}
    # beside the run, not in it: --overwrite refuses a run directory holding files it did not write
    text_file = run_dir.with_name(f"{run_dir.name}-sample-{plan.sample_length}.txt")
    sample = run([PY, "-m", "charlstm", "sample", str(run_dir), "--length", str(plan.sample_length),
                  "--device", plan.device, "--seed", "0", "--output", str(text_file)], timeout=180)
    sample["stdout"] = sample["stdout"][-500:]
    sample["chars"] = len(text_file.read_text(encoding="utf-8")) if text_file.exists() else 0
    sample["chars_per_s"] = sample["chars"] / sample["seconds"] if sample["seconds"] else None
    if sample["chars"] < plan.sample_length:
        sample["rc"] = sample["rc"] or 1
    result["sample"] = sample
    return result


# --------------------------------------------------------------------------- main

def stages(plan: Plan, run_dir: Path, save=lambda report: None) -> dict:
    """Every stage in turn; save(report) after each, so a run cut short still leaves what it measured."""
    report: dict = {"plan": dataclasses.asdict(plan), "device": device_info(plan.device)}
    say(", ".join(f"{k} {v}" for k, v in report["device"].items()))
    report["tests"] = cuda_tests() if plan.tests else {"skipped": "plumbing run", "rc": 0, "cuda_error": None}
    say(f"CUDA tests: {report['tests'].get('summary', report['tests'].get('skipped'))} "
        f"({report['tests'].get('seconds', 0)} s)")
    save(report)
    report["bench"] = {}
    for name, shape in ({} if "bench" in plan.skip else plan.shapes).items():
        report["bench"][name] = bench(plan, shape, "cudnn,custom", False)
        if report["device"]["triton_hook_wired"]:
            report["bench"][f"{name}-triton"] = bench(plan, shape, "custom", True)
            report["bench"][f"{name}-triton-graphs-bf16"] = bench(plan, shape, "cudnn,custom", True, fast=True)
        say(f"bench {name}: rc {report['bench'][name]['rc']}, {report['bench'][name]['seconds']} s")
        save(report)
    if not report["device"]["triton_hook_wired"]:
        say("charlstm bench on the Triton path skipped: the CHARLSTM_TRITON hook is not wired into the layers yet")
    report["train"] = {} if "train" in plan.skip else train_and_sample(plan, run_dir)
    codes = ", ".join(f"{name} rc {r['rc']}" for name, r in report["train"].items())
    say(f"train and sample: {codes}")
    save(report)
    report["layers"] = {"skipped": "--skip layers", "rc": 0} if "layers" in plan.skip else _layer_stage(plan)
    return report


def _layer_stage(plan: Plan) -> dict:
    """Last: a CUDA error here must not spoil the stages above (it poisons the process's context)."""
    if not gpu.available():
        return {"skipped": gpu.why_unavailable(), "rc": 1 if plan.device == "cuda" else 0}
    try:
        return {"results": [layer_bench(plan, s["hidden"], s["batch"]) for s in plan.shapes.values()], "rc": 0}
    except Exception as e:  # record the error (a CUDA error included) and fail the check
        return {"rc": 1, "error": f"{type(e).__name__}: {e}"}


def failures(report: dict) -> list[str]:
    bad = [] if ok(report["tests"]) else [f"CUDA tests: {report['tests'].get('summary')}"]
    bad += [f"  {line[:300]}" for line in report["tests"].get("failed", [])]
    bad += [f"bench {k}: rc {v['rc']} {v['cuda_error'] or ''}" for k, v in report["bench"].items() if not ok(v)]
    for k, v in report["train"].items():
        if not ok(v):
            bad.append(f"{k}: rc {v['rc']} {v['cuda_error'] or ''} {v['stderr_tail'][-300:]}")
    layers = report["layers"]
    if layers.get("rc"):
        bad.append(f"layer timings: {layers.get('error') or layers.get('skipped')}")
    bad += [f"triton {c['kind']} differs from the torch loop by {c['max_abs_diff']:.2e}"
            for r in layers.get("results", []) for c in r["checks"] if not c["ok"]]
    return bad


def _print_summary(report: dict) -> None:
    ev = (report["train"].get("eval") or {}).get("result") or {}
    say(f"shakespeare, {report['plan']['train_seconds']} s bf16: val loss {ev.get('loss_nats')} nats/char "
        f"(the trainer's: {ev.get('trainer_val_loss')})")
    sample = report["train"].get("sample") or {}
    say(f"sample: {sample.get('chars')} chars in {sample.get('seconds')} s")
    nan = float("nan")
    for name, b in report["bench"].items():
        for r in b["rows"]:
            say(f"bench {name:15s} {r['variant']:15s} {r['backend']:7s} {r['chars_per_s']:12.0f} chars/s "
                f"{r['gflops']:8.1f} GFLOP/s  x{r['per_flop_vs_cudnn_lstm'] or nan:.2f} cuDNN lstm per FLOP")
    for res in report["layers"].get("results", []):
        for r in res["rows"]:
            say(f"layer H {res['H']} B {res['B']} {r['dtype']:8s} {r['kind']:13s} {r['path']:17s} "
                f"{r['ms']:9.3f} ms  x{r['per_flop_vs_cudnn_lstm'] or nan:.2f} cuDNN lstm per FLOP")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="checkpoints/gpu-check.json", help="the JSON report")
    p.add_argument("--run-dir", default="checkpoints/gpu-check", help="run directory of the training run")
    p.add_argument("--quick", action="store_true", help="only the reference shape (not H 1024 / B 128)")
    p.add_argument("--plumbing", action="store_true", help="every stage on the CPU at toy sizes (checks this script)")
    p.add_argument("--skip", default="", help="stages to leave out, comma-separated: bench, train, layers")
    args = p.parse_args(argv)
    plan = PLUMBING if args.plumbing else Plan()
    plan.skip = tuple(filter(None, args.skip.split(",")))
    if set(plan.skip) - {"bench", "train", "layers"}:
        p.error(f"--skip takes bench, train, layers (got {args.skip!r})")
    if args.quick:
        plan.shapes = {"reference": plan.shapes["reference"]}
    if plan.device == "cuda" and not torch.cuda.is_available():
        say(f"skipped: no CUDA device here (torch {torch.__version__}, built with CUDA {torch.version.cuda})")
        return 0
    t0 = time.perf_counter()
    out = Path(args.out)

    def save(partial: dict) -> None:
        out.write_text(json.dumps({**partial, "partial": True}, indent=1, default=str) + "\n")

    report = stages(plan, Path(args.run_dir), save)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["failures"] = failures(report)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    _print_summary(report)
    say(f"report written to {args.out} ({report['seconds']} s)")
    for f in report["failures"]:
        say(f"FAILED: {f}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

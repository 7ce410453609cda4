"""Large corpora: does memory stay flat from 100 MB to 1 GB? And how fast is tokenising?

Builds corpora of 100 MB and 1 GB (by default) by repeating
../shared/data/tinyshakespeare.txt into a temporary directory (removed at the
end), and runs each phase in a fresh process whose peak RSS (``ru_maxrss`` from
``os.wait4``) is its own:

- encode: ``load_corpus`` on a cold cache: hash, two decoding passes, the
  token cache written; MB/s of source bytes.
- train:  ``charlstm train`` for a few steps of a tiny model on that corpus
  (warm cache), with an evaluation and a checkpoint: the whole command.
- scan:   every window of the whole corpus read through ``eval_windows``
  (the evaluation reader), once with the mapped pages released as it goes
  (what charlstm does) and once without, to show what the release is for.

Memory-mapped corpus pages that a process has read count in its RSS until they
are released, although they are page cache; charlstm drops them every 32 MiB
of text read (corpus.release_pages). The script exits with status 1 when the
peak RSS of train or of the released scan on the largest corpus exceeds that
on the smallest by more than 10%. Usage:

    .venv/bin/python benchmarks/scale_bench.py [--sizes 100,1000] [--steps 50] [--json] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MB = 1_000_000
RSS_LIMIT = 0.10          # peak RSS on the largest corpus may exceed the smallest's by at most 10%

BATCH = 32                # streams B, in training and in the scan (the evaluation reader uses B streams too)
TRAIN_ARGS = ["--variant", "lstm", "--layers", "1", "--hidden", "64", "--embed", "16", "--batch-size", str(BATCH),
              "--seq-len", "64", "--val-frac", "0.001", "--sample-chars", "0", "--threads", "1", "--no-progress"]


# --------------------------------------------------------------------------- phases (child processes)

def phase(args) -> dict:
    """Run one measured phase in this (fresh) process; return its figures."""
    import torch

    from charlstm import batches
    from charlstm.corpus import load_corpus

    torch.set_num_threads(1)   # as the training command's --threads 1; a busy 2-core machine spins otherwise

    out: dict = {"phase": args.phase}
    t0 = time.perf_counter()
    corpus = load_corpus(args.file, data_dir=Path(args.data_dir), progress=False)
    seconds = time.perf_counter() - t0
    if args.phase == "encode":
        size = Path(args.file).stat().st_size
        out.update(seconds=seconds, mb_per_s=size / MB / seconds, n_chars=len(corpus.tokens))
    elif args.phase in ("scan", "scan-norelease"):
        if args.phase == "scan-norelease":
            batches.RELEASE_EVERY_BYTES = 1 << 62
        t0 = time.perf_counter()
        n = 0
        for _x, _y, mask in batches.eval_windows(corpus.tokens, args.streams, 4096):    # (T, B) windows
            n += int(mask.sum())
        out.update(seconds=time.perf_counter() - t0, chars=n)
    return out


def run_measured(cmd: list[str], cwd: Path, log: Path) -> tuple[int, float, str]:
    """Run a command; return (exit status, its peak RSS in MB, its stdout)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024 / MB, log.read_text()


def child_phase(name: str, corpus: Path, data_dir: Path, tmp: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--file", str(corpus),
           "--data-dir", str(data_dir)]
    code, rss, text = run_measured(cmd, tmp, tmp / f"{name}.log")
    if code != 0:
        raise SystemExit(f"phase {name} on {corpus.name} failed ({code}):\n{text}")
    result = json.loads(text.strip().splitlines()[-1])
    result["peak_rss_mb"] = rss
    return result


def train_phase(corpus: Path, tmp: Path, steps: int) -> dict:
    """`charlstm train` on the corpus (cache already warm: tmp/data), whole command measured."""
    run = tmp / f"run-{corpus.stem}"
    cmd = [sys.executable, "-m", "charlstm", "train", "--data", str(corpus), "--out", str(run),
           "--max-steps", str(steps), "--eval-every", str(steps), "--checkpoint-every", str(steps), *TRAIN_ARGS]
    t0 = time.perf_counter()
    code, rss, text = run_measured(cmd, tmp, tmp / "train.log")
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"charlstm train on {corpus.name} failed ({code}):\n{text}")
    shutil.rmtree(run, ignore_errors=True)
    return {"phase": "train", "seconds": seconds, "peak_rss_mb": rss}


# --------------------------------------------------------------------------- driver

def build_corpus(path: Path, size_mb: int) -> int:
    """Repeat tinyshakespeare until the file has at least size_mb MB; returns its size (no big buffer)."""
    block = SHARED.read_bytes()
    written = 0
    with open(path, "wb") as f:
        while written < size_mb * MB:
            f.write(block)
            written += len(block)
    return written


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000", help="corpus sizes in MB, comma-separated (default 100,1000)")
    ap.add_argument("--steps", type=int, default=50, help="training steps per corpus (default 50)")
    ap.add_argument("--tmp", default=None, help="where the temporary directory goes (default: the system's)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return 0
    if not SHARED.is_file():
        print(f"error: {SHARED} not found (the shared tinyshakespeare file)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="charlstm-scale-", dir=args.tmp))
    rows = []
    try:
        for size in sizes:
            corpus = tmp / f"corpus-{size}mb.txt"
            nbytes = build_corpus(corpus, size)
            data_dir = tmp / "data"
            row = {"size_mb": size, "bytes": nbytes}
            print(f"{size} MB: encoding...", file=sys.stderr, flush=True)
            enc = child_phase("encode", corpus, data_dir, tmp)
            row.update(encode_mb_per_s=enc["mb_per_s"], encode_s=enc["seconds"], encode_rss_mb=enc["peak_rss_mb"])
            print(f"{size} MB: training {args.steps} steps...", file=sys.stderr, flush=True)
            tr = train_phase(corpus, tmp, args.steps)
            row.update(train_rss_mb=tr["peak_rss_mb"], train_s=tr["seconds"])
            print(f"{size} MB: scanning...", file=sys.stderr, flush=True)
            sc = child_phase("scan", corpus, data_dir, tmp)
            row.update(scan_rss_mb=sc["peak_rss_mb"], scan_mchar_per_s=sc["chars"] / sc["seconds"] / 1e6)
            nr = child_phase("scan-norelease", corpus, data_dir, tmp)
            row.update(scan_norelease_rss_mb=nr["peak_rss_mb"])
            rows.append(row)
            corpus.unlink()
            shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    small, large = rows[0], rows[-1]
    checks = {}
    for key in ("train_rss_mb", "scan_rss_mb"):
        growth = large[key] / small[key] - 1.0
        checks[key] = {"growth": growth, "ok": growth <= RSS_LIMIT}
    ok = all(c["ok"] for c in checks.values())
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
            "torch": __import__("torch").__version__, "steps": args.steps, "train_args": TRAIN_ARGS}
    if args.json:
        print(json.dumps({"info": info, "rows": rows, "checks": checks, "ok": ok}, indent=1))
    else:
        print(f"{info['date']}, {info['cpu']}, {info['cpus']} CPUs, load {info['load_average'][0]:.1f}, "
              f"Python {info['python']}, torch {info['torch']}")
        print("| corpus | encode MB/s | encode peak RSS MB | train peak RSS MB | scan peak RSS MB "
              "| scan without release MB | scan Mchar/s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size_mb']} MB | {r['encode_mb_per_s']:.1f} | {r['encode_rss_mb']:.0f} | "
                  f"{r['train_rss_mb']:.0f} | {r['scan_rss_mb']:.0f} | {r['scan_norelease_rss_mb']:.0f} | "
                  f"{r['scan_mchar_per_s']:.0f} |")
        for key, c in checks.items():
            print(f"{key}: {large['size_mb']} MB vs {small['size_mb']} MB: {c['growth']:+.1%} "
                  f"(limit +{RSS_LIMIT:.0%}) {'ok' if c['ok'] else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Corpus pipeline benchmark: encoding throughput, batching throughput, and their peak memory.

Builds corpora of 10 MB and 100 MB by repeating ../shared/data/tinyshakespeare.txt
(and a 100 MB non-ASCII variant in which every 'e' is 'é'), then runs each phase
in a fresh Python process so that its peak RSS (``resource.getrusage``) is its own:

- encode: ``load_corpus`` on a cold cache (hash, two decoding passes, cache write)
- reload: ``load_corpus`` on a warm cache (hash, then memory-map)
- batch:  ``StreamBatcher.next_batch`` for a fixed number of steps on the train split

Peak RSS is reported above a baseline process that only imports torch and charlstm.
For batching it also reports private memory (RssAnon, sampled every 50 steps) and
the file pages of the memory-mapped tokens that are resident at the end (RssFile:
page cache the kernel may drop at any time, which grows with the text touched, not
with the corpus). The script exits with status 1 when a target is missed: encoding
the ASCII corpora below 20 MB/s, or batching private memory growing with the corpus
(100 MB vs 10 MB) by more than 10% of the size difference. Usage:

    .venv/bin/python benchmarks/corpus_bench.py [--sizes 10,100] [--steps 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
MB = 1_000_000
ENCODE_TARGET_MBPS = 20.0
BATCH_GROWTH_LIMIT = 0.10   # batching peak RSS may grow by at most 10% of the corpus size difference


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def rss_parts_mb() -> dict:
    """Current RssAnon (private memory) and RssFile (mapped file pages) from /proc, in MB."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value, _unit = line.split()
                parts[key.rstrip(":")] = int(value) * 1024 / MB
    return parts


# --------------------------------------------------------------------------- phases (child processes)

def phase(args) -> dict:
    import torch

    from charlstm.batches import StreamBatcher
    from charlstm.corpus import load_corpus

    out: dict = {"phase": args.phase}
    if args.phase == "baseline":
        out["anon_mb"] = rss_parts_mb()["RssAnon"]
    elif args.phase in ("encode", "reload"):
        t0 = time.perf_counter()
        c = load_corpus(args.file, data_dir=Path(args.data_dir), progress=False)
        seconds = time.perf_counter() - t0
        size = Path(args.file).stat().st_size
        out.update(seconds=seconds, mb_per_s=size / MB / seconds, n_chars=len(c.tokens),
                   vocab=len(c.vocab), dtype=str(c.tokens.dtype))
    elif args.phase == "batch":
        c = load_corpus(args.file, data_dir=Path(args.data_dir), progress=False)
        train = c.split()["train"]
        b = StreamBatcher(train, args.batch_size, args.seq_len)
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        checksum = 0
        anon_peak = rss_parts_mb()["RssAnon"]
        for step in range(args.steps):
            x, y, _ = b.next_batch()
            checksum += int(x[0, 0])
            if step % 50 == 0:
                anon_peak = max(anon_peak, rss_parts_mb()["RssAnon"])
        seconds = time.perf_counter() - t0
        end = rss_parts_mb()
        out.update(anon_peak_mb=max(anon_peak, end["RssAnon"]), file_rss_end_mb=end["RssFile"])
        chars = args.steps * args.batch_size * args.seq_len
        out.update(seconds=seconds, chars_per_s=chars / seconds, steps=args.steps,
                   steps_per_epoch=b.steps_per_epoch, peak_rss_before_loop_mb=rss_before,
                   torch_threads=torch.get_num_threads(), checksum=checksum)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_phase(name: str, file: Path | None, data_dir: Path | None, opts) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--batch-size", str(opts.batch_size),
           "--seq-len", str(opts.seq_len), "--steps", str(opts.steps)]
    if file is not None:
        cmd += ["--file", str(file), "--data-dir", str(data_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver

def build_corpus(path: Path, size_mb: int, unicode: bool = False) -> None:
    """Write about size_mb MB: whole copies of tinyshakespeare (with 'e' -> 'é' if unicode)."""
    text = SHARED.read_bytes()
    if unicode:
        text = text.replace(b"e", "é".encode())
    copies = max(1, round(size_mb * MB / len(text)))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["baseline", "encode", "reload", "batch"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="10,100", help="corpus sizes in MB (default 10,100)")
    ap.add_argument("--steps", type=int, default=2000, help="batching steps per corpus (default 2000)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-unicode", action="store_true", help="skip the non-ASCII corpora")
    ap.add_argument("--unicode-sizes", help="sizes in MB of the non-ASCII corpora (default: the largest of --sizes)")
    ap.add_argument("--workdir", help="where to build the corpora (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    opts = ap.parse_args()

    if opts.phase:
        print(json.dumps(phase(opts)))
        return 0
    if not SHARED.is_file():
        print(f"error: {SHARED} not found; the benchmark builds its corpora from it", file=sys.stderr)
        return 1

    sizes = [int(s) for s in opts.sizes.split(",")]
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="charlstm-corpus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"baseline": run_phase("baseline", None, None, opts), "corpora": []}
    base = results["baseline"]["peak_rss_mb"]
    uni_sizes = [int(s) for s in opts.unicode_sizes.split(",")] if opts.unicode_sizes else [max(sizes)]
    cases = [(s, False) for s in sizes] + ([(s, True) for s in uni_sizes] if not opts.no_unicode else [])
    try:
        for size, uni in cases:
            label = f"{size}MB{'-unicode' if uni else ''}"
            path = work / f"{label}.txt"
            build_corpus(path, size, unicode=uni)
            data_dir = work / f"data-{label}"
            row = {"corpus": label, "bytes": path.stat().st_size}
            for name in ("encode", "reload", "batch"):
                r = run_phase(name, path, data_dir, opts)
                r["peak_rss_above_baseline_mb"] = r["peak_rss_mb"] - base
                row[name] = r
            results["corpora"].append(row)
            path.unlink()
            shutil.rmtree(data_dir)
    finally:
        if not opts.workdir:
            shutil.rmtree(work, ignore_errors=True)

    failures = []
    for row in results["corpora"]:
        if "unicode" not in row["corpus"] and row["encode"]["mb_per_s"] < ENCODE_TARGET_MBPS:
            failures.append(f"{row['corpus']}: encoding {row['encode']['mb_per_s']:.1f} MB/s < {ENCODE_TARGET_MBPS}")
    ascii_rows = [r for r in results["corpora"] if "unicode" not in r["corpus"]]
    if len(ascii_rows) >= 2:
        small, large = ascii_rows[0], ascii_rows[-1]
        growth = large["batch"]["anon_peak_mb"] - small["batch"]["anon_peak_mb"]
        allowed = max(2.0, BATCH_GROWTH_LIMIT * (large["bytes"] - small["bytes"]) / MB)  # 2 MB: allocator noise
        results["batch_rss_growth_mb"] = growth
        results["batch_rss_growth_allowed_mb"] = allowed
        if growth > allowed:
            failures.append(f"batching peak private memory grew {growth:.1f} MB from {small['corpus']} "
                            f"to {large['corpus']} (allowed {allowed:.1f})")
    results["failures"] = failures

    if opts.json:
        print(json.dumps(results))
    else:
        print(f"baseline process (torch + charlstm imported): peak RSS {base:.0f} MB")
        print(f"{'corpus':<16}{'encode MB/s':>12}{'enc +RSS MB':>12}{'reload s':>10}"
              f"{'batch Mchar/s':>14}{'batch +RSS MB':>14}{'batch anon MB':>14}{'batch file MB':>14}")
        for row in results["corpora"]:
            e, r, b = row["encode"], row["reload"], row["batch"]
            print(f"{row['corpus']:<16}{e['mb_per_s']:>12.1f}{e['peak_rss_above_baseline_mb']:>12.1f}"
                  f"{r['seconds']:>10.2f}{b['chars_per_s'] / 1e6:>14.1f}{b['peak_rss_above_baseline_mb']:>14.1f}"
                  f"{b['anon_peak_mb']:>14.1f}{b['file_rss_end_mb']:>14.1f}")
        if "batch_rss_growth_mb" in results:
            print(f"batching peak private (anonymous) memory growth "
                  f"{ascii_rows[0]['corpus']} -> {ascii_rows[-1]['corpus']}: "
                  f"{results['batch_rss_growth_mb']:.1f} MB (allowed {results['batch_rss_growth_allowed_mb']:.1f})")
        for f in failures:
            print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

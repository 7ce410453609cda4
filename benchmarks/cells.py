"""Training-step throughput of every cell variant and backend, as a ratio to nn.LSTM.

One training step is forward + cross-entropy + backward + AdamW step on random
tokens. Every configuration is warmed up, then the repeats are interleaved
(round k times every configuration once) so that a change of machine load hits
all of them alike; the median step time gives chars/s = T*B / median. The ratio
column divides by ``lstm cudnn`` (torch.nn.LSTM) measured in the same run.

    .venv/bin/python benchmarks/cells.py                # reference shape, fp32, CPU
    .venv/bin/python benchmarks/cells.py --quick        # a few seconds, small shape
    .venv/bin/python benchmarks/cells.py --only lstm    # one variant, both backends

Exits with status 1 when custom lstm falls below ``--floor`` times nn.LSTM
(0.6 by default at the reference shape; unchecked at other shapes unless
``--floor`` is given; 0 disables the check).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from charlstm.config import ModelConfig  # noqa: E402
from charlstm.model import build_model  # noqa: E402

# (label, variant, backend, extra ModelConfig fields)
CONFIGS = [
    ("lstm", "lstm", "cudnn", {}),
    ("lstm", "lstm", "custom", {}),
    ("rnn", "rnn", "cudnn", {}),
    ("rnn", "rnn", "custom", {}),
    ("gru (cudnn form)", "gru", "cudnn", {"gru_form": "cudnn"}),
    ("gru (cudnn form)", "gru", "custom", {"gru_form": "cudnn"}),
    ("gru (cho form)", "gru", "custom", {"gru_form": "cho"}),
    ("peephole diag fio", "peephole", "custom", {"peephole_form": "diag", "peepholes": "fio"}),
    ("peephole full fio", "peephole", "custom", {"peephole_form": "full", "peepholes": "fio"}),
    ("coupled", "coupled", "custom", {}),
]


REFERENCE_SHAPE = {"V": 65, "E": 64, "H": 256, "L": 2, "B": 32, "T": 128}


def make_step(cfg: ModelConfig, T: int, B: int, seed: int):
    """A closure running one training step of a fresh model of ``cfg``."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (T, B))  # (T, B)
    y = torch.randint(0, cfg.vocab_size, (T, B))  # (T, B)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits, _ = model(x)  # (T, B, V)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=65, help="V")
    ap.add_argument("--embed", type=int, default=64, help="E")
    ap.add_argument("--hidden", type=int, default=256, help="H")
    ap.add_argument("--layers", type=int, default=2, help="L")
    ap.add_argument("--batch", type=int, default=32, help="B")
    ap.add_argument("--seq-len", type=int, default=128, help="T")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 2; --quick 1)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed steps per configuration, median taken (default 7; --quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--only", default=None, help="comma-separated variants to run (lstm on both backends always runs)")
    ap.add_argument("--quick", action="store_true", help="small shape (H=64, B=8, T=32) and few repeats: a smoke run")
    ap.add_argument("--floor", type=float, default=None,
                    help="exit 1 when custom lstm / nn.LSTM is below this (default 0.6 at the reference shape, "
                         "no check at other shapes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.seq_len, args.batch = 64, 32, 8
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.threads:
        torch.set_num_threads(args.threads)

    only = set(args.only.split(",")) if args.only else None
    configs = [c for c in CONFIGS if only is None or c[1] in only or c[1] == "lstm"]
    T, B = args.seq_len, args.batch
    steps = []
    for _label, variant, backend, extra in configs:
        cfg = ModelConfig(vocab_size=args.vocab, variant=variant, backend=backend, embed=args.embed,
                          hidden=args.hidden, layers=args.layers, **extra)
        steps.append(make_step(cfg, T, B, seed=0))
    for step in steps:
        for _ in range(args.warmup):
            step()
    times = [[] for _ in steps]
    for _ in range(args.repeats):
        for k, step in enumerate(steps):
            times[k].append(step())

    rows = []
    for (label, _variant, backend, _), ts in zip(configs, times):
        med = statistics.median(ts)
        rows.append({"cell": label, "backend": backend, "step_ms": 1000 * med, "chars_per_s": T * B / med,
                     "spread": (max(ts) - min(ts)) / med})
    ref = next(r for r in rows if r["cell"] == "lstm" and r["backend"] == "cudnn")["chars_per_s"]
    for r in rows:
        r["ratio"] = r["chars_per_s"] / ref
    shape = {"V": args.vocab, "E": args.embed, "H": args.hidden, "L": args.layers, "B": B, "T": T}
    if args.floor is None:
        args.floor = 0.6 if shape == REFERENCE_SHAPE else 0.0
    custom_lstm = next(r for r in rows if r["cell"] == "lstm" and r["backend"] == "custom")["ratio"]
    ok = args.floor <= 0 or custom_lstm >= args.floor

    if args.json:
        print(json.dumps({"shape": shape, "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "repeats": args.repeats, "rows": rows, "custom_lstm_ratio": custom_lstm, "floor_ok": ok}))
    else:
        print(f"shape {shape}, fp32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}; warm-up {args.warmup}, median of {args.repeats}")
        print()
        print("| cell | backend | ms/step | chars/s | × nn.LSTM | spread |")
        print("|---|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['cell']} | {r['backend']} | {r['step_ms']:.0f} | {r['chars_per_s']:,.0f} | "
                  f"{r['ratio']:.2f} | {100 * r['spread']:.0f}% |")
        print()
        verdict = ("ok" if ok else "BELOW FLOOR") if args.floor > 0 else "not checked at this shape"
        print(f"custom lstm / nn.LSTM = {custom_lstm:.2f} (floor {args.floor}): {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

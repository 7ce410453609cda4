"""Validation loss of a charlstm checkpoint under the two protocols of docs/training.md.

carried:  32 contiguous streams over the whole validation split, the state carried
          from window to window (what `charlstm train` and `charlstm eval` report);
windowed: the same characters, every 128-character window started from a zero state
          (the protocol of nanoGPT-style evaluations).

    python benchmarks/eval_protocols.py checkpoints/lstm-tinyshakespeare [--streams 32] [--window 128]
"""
import argparse
import json
import math
from pathlib import Path

from charlstm.checkpoint import load_checkpoint
from charlstm.corpus import load_corpus
from charlstm.evaluation import evaluate_loss

p = argparse.ArgumentParser()
p.add_argument("run", type=Path)
p.add_argument("--streams", type=int, default=32)
p.add_argument("--window", type=int, default=128)
args = p.parse_args()

ckpt = load_checkpoint(args.run)
corpus = load_corpus(ckpt.train_cfg.data, progress=False)
if corpus.sha256 != ckpt.corpus_meta.get("sha256"):
    raise SystemExit(f"the corpus {ckpt.train_cfg.data} is not the one the checkpoint was trained on")
val = corpus.split(ckpt.train_cfg.val_frac, ckpt.train_cfg.test_frac)["val"]
out = {"checkpoint": str(ckpt.path), "step": ckpt.step, "val_chars": val.numel()}
for name, carry in (("carried", True), ("windowed", False)):
    loss, n = evaluate_loss(ckpt.model, val, batch_size=args.streams, seq_len=args.window, device="cpu",
                            carry_state=carry)
    out[name] = {"loss_nats": round(loss, 4), "bpc": round(loss / math.log(2), 4), "chars": n}
print(json.dumps(out))

"""The baseline charlstm's quality recipe must beat: a plain nn.LSTM script, no charlstm.

2 layers x 384, embedding 64, B=32 contiguous streams, T=128, AdamW 3e-3 with a
cosine decay over the time budget, clip 1.0, dropout 0.1, trained for --minutes
of wall time on the first 90% of the text. Prints the validation loss (last
10%) under both protocols: state carried over the whole split, and each
128-character window from a zero state.

    python benchmarks/baseline_lstm.py ../shared/data/tinyshakespeare.txt --minutes 10
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("path")
p.add_argument("--minutes", type=float, default=10.0)
p.add_argument("--seed", type=int, default=1337)
# cpu: budget in this process's CPU time (shared machines)
p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
args = p.parse_args()
clock = time.process_time if args.clock == "cpu" else time.perf_counter
torch.manual_seed(args.seed)
text = open(args.path, encoding="utf-8").read()
chars = sorted(set(text))
data = torch.tensor([chars.index(c) for c in text])
n = int(0.9 * len(data))
train, val = data[:n], data[n:]
V, E, H, L, B, T = len(chars), 64, 384, 2, 32, 128


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm = nn.Embedding(V, E), nn.LSTM(E, H, L, dropout=0.1)
        self.drop, self.head = nn.Dropout(0.1), nn.Linear(H, V)

    def forward(self, x, state=None):
        out, state = self.lstm(self.emb(x), state)
        return self.head(self.drop(out)), state


def streams(d, b):                                  # (S, b): b contiguous streams, one per column
    s = (len(d) - 1) // b
    return d[: s * b].view(b, s).t(), d[1: s * b + 1].view(b, s).t()


def evaluate(model, carry):
    model.eval()
    x, y = streams(val, B)
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for t in range(0, x.shape[0], T):
            logits, state = model(x[t:t + T], state if carry else None)
            total += F.cross_entropy(logits.reshape(-1, V), y[t:t + T].reshape(-1), reduction="sum").item()
            count += y[t:t + T].numel()
    model.train()
    return total / count


model = Model()
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
x_all, y_all = streams(train, B)
budget = args.minutes * 60
start = clock()
step, state = 0, None
while (elapsed := clock() - start) < budget:
    t = (step % (x_all.shape[0] // T)) * T
    if t == 0:
        state = None                                # epoch start: zero state
    lr = 3e-3 * min(1, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
    for g in opt.param_groups:
        g["lr"] = lr
    logits, state = model(x_all[t:t + T], state)
    state = tuple(s.detach() for s in state)
    loss = F.cross_entropy(logits.reshape(-1, V), y_all[t:t + T].reshape(-1))
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step += 1
    if step % 200 == 0:
        print(f"step {step} loss {loss.item():.4f} {elapsed:.0f}s", flush=True)
print(f"steps {step}, chars/s {step * B * T / (clock() - start):.0f} ({args.clock} clock)")
print(f"val carried {evaluate(model, True):.4f} nats/char, windowed {evaluate(model, False):.4f} nats/char")

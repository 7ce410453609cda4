"""Generation from a checkpoint: one character at a time, the state carried, the prefix never re-run.

The prime is read by the model's own ``forward`` (one call per window of 1024
characters); after that each new character costs one *step*. Three steppers
compute that step:

- :class:`~charlstm.native.NativeStep` (the default where it runs): the same
  arithmetic in C, a chunk of characters per call (charlstm/native.py), for
  float32 CPU models of every variant but the peephole's full form, when
  sampling by temperature or greedily and a C compiler is there.
- :class:`FastStep` (the default otherwise) reads the weights out of a
  :class:`~charlstm.model.CharModel` once and computes the equations of
  ``../shared/EQUATIONS.md`` directly: the embedding is folded into layer 0's
  input weights (a ``V x G*H`` table, so layer 0 needs one row lookup instead
  of a matrix product), every other layer does one matrix product for its input
  and one for its recurrence, gate blocks are reordered so that all sigmoid
  gates are one call, and the whole generation loop (step, head, sampling) can
  run as a TorchScript function, without Python between characters.
  It exists for every variant and backend and gives the same logits as
  ``model.forward`` (tests check this for each one).
- :class:`ModelStep` calls ``model.forward`` with ``T = 1`` and is the
  reference (and the fallback for any other module with CharModel's interface).

Sampling is temperature, top-k, nucleus (top-p) or greedy (argmax), drawn with
a seeded ``torch.Generator`` (Gumbel-max: the noise of a chunk of characters is drawn
at once, and each character is an add and an argmax; torch.multinomial's distribution
with fewer operations): the same seed gives the same text on the same machine.
``--num-samples N`` runs N streams as one batch.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .errors import CharlstmError, UsageError
from .runtime import check_threads, resolve_device, torch_threads

PRIME_WINDOW = 1024      # prime characters read per model.forward call
CHUNK = 32               # characters generated between two streaming callbacks


# --------------------------------------------------------------------------- options

@dataclass
class SamplingOptions:
    """How the next character is chosen from the logits."""

    temperature: float = 1.0     # divide the logits by this (> 0); lower is more conservative
    top_k: int = 0               # keep only the K most likely characters (0: all)
    top_p: float = 1.0           # keep the smallest set whose probability reaches P (1: all)
    greedy: bool = False         # always the most likely character (the options above are ignored)

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(f"--temperature must be > 0 (got {self.temperature}); use --greedy for the most likely character")
        if self.top_k is None:
            self.top_k = 0
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 1 (got {self.top_k})")
        if self.top_p is None:
            self.top_p = 1.0
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")
        self.temperature = float(self.temperature)
        self.top_k = int(self.top_k)
        self.top_p = float(self.top_p)


def gumbel_noise(n: int, B: int, V: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """Noise for n draws of B streams from V characters: (n, B, V) float32, -log of Exp(1) variates.

    Drawn once per chunk of characters, so that each step adds it and takes an argmax (two operations
    instead of a softmax and a fresh draw)."""
    q = torch.empty(n, B, V, device=device).exponential_(1.0, generator=generator)
    return q.clamp_min_(1e-30).log_().neg_()


def _choose(logits: Tensor, temperature: float, top_k: int, top_p: float, greedy: bool,
            noise: Optional[Tensor]) -> Tensor:
    """The next character of each stream: logits (B, V) and its row of `gumbel_noise` -> ids (B,) long.

    The Gumbel-max draw: with q_i ~ Exp(1), argmax (l_i / T - log q_i) is i with probability
    softmax(l / T)_i, the distribution torch.multinomial draws from (the same race as argmax p_i / q_i,
    taken in logs, so the softmax is never needed)."""
    if greedy or noise is None:
        return logits.argmax(1)
    V = logits.size(1)
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, 1).values[:, -1:]                    # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(logits / temperature, 1)                       # (B, V)
        sorted_p, order = probs.sort(1, descending=True)
        before = sorted_p.cumsum(1) - sorted_p                               # mass of the likelier ones
        drop = torch.zeros_like(probs).scatter(1, order, (before >= top_p).to(probs.dtype))   # the likeliest stays
        logits = logits.masked_fill(drop > 0, float("-inf"))
    return torch.add(noise, logits, alpha=1.0 / temperature).argmax(1)


def choose_next(logits: Tensor, temperature: float, top_k: int, top_p: float, greedy: bool,
                generator: Optional[torch.Generator]) -> Tensor:
    """The next character of each stream: logits (B, V) -> ids (B,) long, drawn with `generator`."""
    noise = None if greedy else gumbel_noise(1, logits.size(0), logits.size(1), generator, logits.device)[0]
    return _choose(logits, temperature, top_k, top_p, greedy, noise)


# --------------------------------------------------------------------------- the fast step
#
# Written in the TorchScript subset of Python so that `_generate_chunk` can be
# scripted; the same functions run eagerly when scripting is unavailable.
#
# The hidden states of all layers live side by side in one buffer z (B, L*H),
# layer k's h in columns [kH, (k+1)H). A layer k >= 1 finds its input (the new h
# of layer k - 1) and its own previous h next to each other, z[:, (k-1)H:(k+1)H],
# so for the LSTMs and the RNN one matrix product by the stacked weights
# [W_ih; W_hh]^T gives all its gates; every layer writes its new h straight
# back into its columns (`out=`). Fewer operations per character is what makes
# one stream fast: the weights are read once either way.
# `layers[k]` holds the tensors of layer k, prepared by FastStep:
#   [0] w_x  (in, G*H)    input weights, transposed; (in + H, G*H) [W_ih; W_hh]^T for a stacked layer
#                         (k >= 1 and not a GRU); empty for layer 0 (the table has them)
#   [1] b_x  (G*H,)       every bias that simply adds (zeros without biases)
#   [2] w_h  (H, G*H)     recurrent weights, transposed (empty for a stacked layer; gru cho: only
#                         the r and z blocks, (H, 2H))
#   [3] b_h  (G*H,)       gru (cudnn form): b_hh, which sits inside r * (...) for the n block
#   [4] w_hn (H, H)       gru cho: the n block's recurrent weights, applied to r * h
#   [4..6] p_i, p_f, p_o  peephole: (H,) diag, (H, H) full transposed, or empty without that peephole
# Gate blocks are reordered where it saves calls: lstm i,f,o,g; coupled f,o,g.


def _peep(pre: Tensor, p: Tensor, c: Tensor) -> Tensor:
    """pre + P(c) for one peephole gate: p (H,) diag, (H, H) full (transposed), or empty (none)."""
    if p.numel() == 0:
        return pre
    if p.dim() == 1:
        return torch.addcmul(pre, p, c)
    return torch.addmm(pre, c, p)


def _cell(kind: str, H: int, pre: Tensor, h: Tensor, c: Tensor, w: List[Tensor]) -> Tensor:
    """One layer, one step. `pre` is the gates' pre-activation (B, G*H), all of it for the LSTMs and
    the RNN, the input half for the GRUs; h (B, H) is the layer's columns of z, overwritten with the
    new h. Returns the new c (c itself for the GRUs and the RNN)."""
    if kind == "lstm":
        s, g = pre.split([3 * H, H], 1)                                      # (B, 3H), (B, H)
        i, f, o = torch.sigmoid(s).chunk(3, 1)
        c = torch.addcmul(f * c, i, torch.tanh(g))
        torch.mul(o, torch.tanh(c), out=h)
        return c
    if kind == "gru":
        x_rz, x_n = pre.split([2 * H, H], 1)
        h_rz, h_n = torch.addmm(w[3], h, w[2]).split([2 * H, H], 1)
        r, z = torch.sigmoid(x_rz + h_rz).chunk(2, 1)
        n = torch.tanh(torch.addcmul(x_n, r, h_n))
        torch.lerp(n, h, z, out=h)                                           # (1 - z) * n + z * h
        return c
    if kind == "rnn":
        torch.tanh(pre, out=h)
        return c
    if kind == "coupled":
        s, g = pre.split([2 * H, H], 1)
        f, o = torch.sigmoid(s).chunk(2, 1)
        c = torch.lerp(torch.tanh(g), c, f)                                  # f * c + (1 - f) * g
        torch.mul(o, torch.tanh(c), out=h)
        return c
    if kind == "gru_cho":
        x_rz, x_n = pre.split([2 * H, H], 1)
        r, z = torch.sigmoid(torch.addmm(x_rz, h, w[2])).chunk(2, 1)
        n = torch.tanh(torch.addmm(x_n, r * h, w[4]))
        torch.lerp(h, n, z, out=h)                                           # (1 - z) * h + z * n
        return c
    # peephole (gate order i, f, g, o as stored)
    i, f, g, o = pre.chunk(4, 1)
    i = torch.sigmoid(_peep(i, w[4], c))
    f = torch.sigmoid(_peep(f, w[5], c))
    c = torch.addcmul(f * c, i, torch.tanh(g))
    o = torch.sigmoid(_peep(o, w[6], c))
    torch.mul(o, torch.tanh(c), out=h)
    return c


def _advance(kind: str, H: int, table: Tensor, layers: List[List[Tensor]], head_w: Tensor, head_b: Tensor,
             x: Tensor, z: Tensor, cs: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    """Feed characters x (B,) through every layer, updating the hidden states z (B, L*H) in place:
    the logits (B, V) of the next one, and the new cell states."""
    gru = kind == "gru" or kind == "gru_cho"
    new_c: List[Tensor] = []
    L = len(layers)
    for k in range(L):
        w = layers[k]
        h = z[:, k * H:(k + 1) * H]
        if k == 0:
            pre = table.index_select(0, x)                                   # (B, G*H), embedding folded in
            if not gru:
                pre = torch.addmm(pre, h, w[2])
        elif gru:
            pre = torch.addmm(w[1], z[:, (k - 1) * H:k * H], w[0])          # the input half
        else:
            pre = torch.addmm(w[1], z[:, (k - 1) * H:(k + 1) * H], w[0])    # [x, h] @ [W_ih; W_hh]^T
        new_c.append(_cell(kind, H, pre, h, cs[k], w))
    return torch.addmm(head_b, z[:, (L - 1) * H:], head_w), new_c           # (B, V)


def _generate_chunk(kind: str, H: int, table: Tensor, layers: List[List[Tensor]], head_w: Tensor, head_b: Tensor,
                    logits: Tensor, z: Tensor, cs: List[Tensor], n: int,
                    temperature: float, top_k: int, top_p: float, greedy: bool,
                    generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """n characters per stream from the pending logits (B, V): ids (n, B), then the logits after them
    (z, the hidden states, is updated in place) and the cell states."""
    noise: Optional[Tensor] = None
    if not greedy:
        noise = gumbel_noise(n, logits.size(0), logits.size(1), generator, logits.device)
    out: List[Tensor] = []
    for t in range(n):
        row: Optional[Tensor] = None
        if noise is not None:
            row = noise[t]
        x = _choose(logits, temperature, top_k, top_p, greedy, row)         # (B,)
        out.append(x)
        logits, cs = _advance(kind, H, table, layers, head_w, head_b, x, z, cs)
    return torch.stack(out), logits, cs


_SCRIPTED: dict = {}


def _scripted_generate_chunk():
    """`_generate_chunk` compiled by TorchScript (no Python between characters), or None where unavailable."""
    if "fn" not in _SCRIPTED:
        fn = None
        if os.environ.get("CHARLSTM_NO_SCRIPT", "") in ("", "0"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit.script is deprecated in recent torch; it still runs
                    fn = torch.jit.script(_generate_chunk)
            except Exception:  # any failure: the eager function computes the same thing
                fn = None
        _SCRIPTED["fn"] = fn
    return _SCRIPTED["fn"]


class ModelStep:
    """The reference stepper: ``model.forward`` on one character (T = 1), the state carried."""

    name = "model.forward"

    def __init__(self, model):
        self.model = model
        self.state = None

    def load_state(self, state) -> None:
        """Continue from a model State (h (L, B, H), c (L, B, H) or None)."""
        self.state = state

    def get_state(self):
        return self.state

    def advance(self, x: Tensor) -> Tensor:
        """Feed characters x (B,) and return the logits (B, V) of the next ones."""
        logits, self.state = self.model(x.view(1, -1), self.state)
        return logits[0]

    def generate(self, logits: Tensor, n: int, opts: SamplingOptions, generator) -> tuple[Tensor, Tensor]:
        """n characters per stream from the pending logits: ids (n, B) and the logits after them."""
        noise = None if opts.greedy else gumbel_noise(n, logits.size(0), logits.size(1), generator, logits.device)
        out = []
        for t in range(n):
            x = _choose(logits, opts.temperature, opts.top_k, opts.top_p, opts.greedy,
                        None if noise is None else noise[t])
            out.append(x)
            logits = self.advance(x)
        return torch.stack(out), logits


class FastStep:
    """An inference-only step for a CharModel of any variant and backend, built from its weights.

    Computes the same logits as ``model.forward`` one character at a time (to
    float rounding), with fewer and larger operations. The weights are copied
    when the stepper is built: build a new one after changing the model.
    """

    name = "fast step"

    def __init__(self, model, *, script: bool = True):
        cfg = model.cfg
        # the step's kind: the variant, with the GRU's two forms apart ('gru' is the cudnn form)
        self.kind = "gru_cho" if cfg.variant == "gru" and cfg.gru_form == "cho" else cfg.variant
        self.H, self.L = cfg.hidden, cfg.layers
        self.has_c = cfg.variant in ("lstm", "peephole", "coupled")
        w = model.head.weight
        self.device, self.dtype = w.device, w.dtype
        with torch.no_grad():
            self.layers: List[List[Tensor]] = []
            for k in range(self.L):
                w_ih, w_hh, b_x, b_h, peep = self._layer_weights(model, k)
                self.layers.append(self._prepare(k, w_ih, w_hh, b_x, b_h, peep))
                if k == 0:
                    # Fold the embedding into layer 0: one row of (V, G*H) per character.
                    self.table = torch.addmm(self._order(b_x), model.embedding.weight, self._order(w_ih).t()).contiguous()
            self.head_w = model.head.weight.t().contiguous().clone()                    # (H, V)
            self.head_b = model.head.bias.clone()                                      # (V,)
        self._fn = _scripted_generate_chunk() if script else None
        self.scripted = self._fn is not None
        self.z = torch.empty(0, device=self.device, dtype=self.dtype)              # (B, L*H), see above
        self.cs: List[Tensor] = []

    # ------------------------------------------------------------------ weights
    def _layer_weights(self, model, k: int):
        """Layer k's (w_ih, w_hh, bias that adds, bias inside r*(...) or None, peephole or None)
        in the cells' layout, from either backend."""
        cfg = model.cfg
        if cfg.backend == "cudnn":
            rnn = model.rnn
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{k}", None), getattr(rnn, f"bias_hh_l{k}", None)
            peep = None
        else:
            cell = model.rnn.layers[k].cell
            w_ih, w_hh = cell.weight_ih, cell.weight_hh
            b_ih = cell.bias_ih if cell.bias_ih is not None else cell.bias
            b_hh = cell.bias_hh
            peep = (cell.weight_ch, cell.peepholes) if getattr(cell, "weight_ch", None) is not None else None
        zeros = torch.zeros(w_ih.shape[0], device=w_ih.device, dtype=w_ih.dtype)
        b_ih = zeros if b_ih is None else b_ih
        b_hh = zeros if b_hh is None else b_hh
        if self.kind == "gru":
            return w_ih, w_hh, b_ih, b_hh, None
        return w_ih, w_hh, b_ih + b_hh, None, peep

    def _order(self, t: Tensor) -> Tensor:
        """Reorder gate blocks (rows) for the fast cell: lstm i,f,g,o -> i,f,o,g; coupled f,g,o -> f,o,g."""
        H = self.H
        if self.kind == "lstm":
            i, f, g, o = t.split(H, 0)
            return torch.cat([i, f, o, g], 0)
        if self.kind == "coupled":
            f, g, o = t.split(H, 0)
            return torch.cat([f, o, g], 0)
        return t

    def _prepare(self, k: int, w_ih, w_hh, b_x, b_h, peep) -> List[Tensor]:
        """Layer k's tensors in the layout the step functions read (see the comment above `_peep`)."""
        H, dev, dt = self.H, w_ih.device, w_ih.dtype
        empty = torch.empty(0, device=dev, dtype=dt)
        w_x = empty if k == 0 else self._order(w_ih).t().contiguous()               # (in, G*H)
        w_h = self._order(w_hh).t().contiguous()                                     # (H, G*H)
        if self.kind == "gru_cho":
            w_h, w_hn = w_hh[: 2 * H].t().contiguous(), w_hh[2 * H:]
        elif k > 0 and self.kind not in ("gru", "gru_cho"):
            w_x, w_h = torch.cat([w_x, w_h], 0), empty                               # stacked: (in + H, G*H)
        out = [w_x, self._order(b_x).clone(), w_h, (b_h if b_h is not None else empty).clone()]
        if self.kind == "gru_cho":
            out.append(w_hn.t().contiguous())                                        # (H, H)
        if self.kind == "peephole":
            out += self._peepholes(peep, empty)
        return out

    def _peepholes(self, peep, empty) -> List[Tensor]:
        """p_i, p_f, p_o from the cell's (weight_ch, gates): one block per gate listed, in the order f, i, o."""
        H = self.H
        found = {}
        if peep is not None:
            weight_ch, gates = peep
            for j, g in enumerate(gates):
                block = weight_ch[j * H:(j + 1) * H]                                 # (H,) or (H, H)
                found[g] = block.clone() if block.dim() == 1 else block.t().contiguous()
        return [found.get(g, empty) for g in "ifo"]

    # ------------------------------------------------------------------ state
    def load_state(self, state) -> None:
        """Continue from a model State (h (L, B, H), c (L, B, H) or None)."""
        L, B, H = state.h.shape
        self.z = state.h.to(self.dtype).permute(1, 0, 2).reshape(B, L * H).clone()   # (B, L*H)
        if self.has_c:
            self.cs = [t.contiguous() for t in state.c.to(self.dtype).unbind(0)]
        else:
            self.cs = [torch.empty(0, device=self.device, dtype=self.dtype)] * self.L

    def get_state(self):
        """The current state as a model State."""
        from .model import State

        B = self.z.shape[0]
        h = self.z.view(B, self.L, self.H).transpose(0, 1).contiguous()             # (L, B, H)
        return State(h, torch.stack(self.cs) if self.has_c else None)

    # ------------------------------------------------------------------ steps
    def advance(self, x: Tensor) -> Tensor:
        """Feed characters x (B,) and return the logits (B, V) of the next ones."""
        logits, self.cs = _advance(self.kind, self.H, self.table, self.layers, self.head_w, self.head_b,
                                   x, self.z, self.cs)
        return logits

    def generate(self, logits: Tensor, n: int, opts: SamplingOptions, generator) -> tuple[Tensor, Tensor]:
        """n characters per stream from the pending logits (B, V): ids (n, B) and the logits after them."""
        fn = self._fn if self._fn is not None else _generate_chunk
        ids, logits, self.cs = fn(self.kind, self.H, self.table, self.layers, self.head_w, self.head_b,
                                  logits, self.z, self.cs, n, opts.temperature, opts.top_k, opts.top_p,
                                  opts.greedy, generator)
        return ids, logits


def make_stepper(model, *, fast: bool = True, script: bool = True, native: bool = True,
                 precision: str = "fp32", options: SamplingOptions | None = None):
    """The stepper for a CharModel: the native step where it can run this model and these options
    (see charlstm/native.py), else the fast torch step (``fast=False``, or another kind of module:
    ModelStep). ``precision='fp16'`` asks for the native step's float16 weights, and is an error
    where that step cannot run."""
    from . import native as native_mod
    from .model import CharModel

    if precision not in native_mod.PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(native_mod.PRECISIONS)} (got {precision!r})")
    why = native_unavailable(model, options) if native and fast else "the native step was not asked for"
    if why is None:
        return native_mod.NativeStep(model, precision)
    if precision != "fp32":
        raise UsageError(f"--precision {precision} needs the native step, which cannot run here: {why}")
    if fast and isinstance(model, CharModel):
        return FastStep(model, script=script)
    return ModelStep(model)


def native_unavailable(model, options: SamplingOptions | None = None) -> Optional[str]:
    """Why the native step cannot sample from this model with these options (None: it can)."""
    from . import native as native_mod
    from .model import CharModel

    if not isinstance(model, CharModel):
        return "not a CharModel"
    if options is not None and (options.top_k or options.top_p < 1.0) and not options.greedy:
        return "top-k and top-p sampling use the torch step"
    why = native_mod.unsupported(model)
    if why is None:
        lib, word = native_mod.library()
        why = None if lib is not None else word
    return why


def stepping_threads(stepper, threads: int | None) -> int | None:
    """Torch threads for generating with this stepper when the user gave ``threads`` (None: the
    default): all cores for the native step, which shares each step out among them, one for the
    torch steps, whose small operations a second thread mostly waits for (docs/sampling.md)."""
    if threads is not None:
        return threads
    return None if getattr(stepper, "native", False) else 1


def read_prime(model, ids: Tensor, batch_size: int, state=None) -> tuple[Tensor, object]:
    """Condition the model on ids (T,) for batch_size identical streams, PRIME_WINDOW characters
    per forward call: the logits (B, V) after the last one, and the state."""
    logits = None
    for start in range(0, ids.numel(), PRIME_WINDOW):
        window = ids[start:start + PRIME_WINDOW].view(-1, 1).expand(-1, batch_size)   # (T, B)
        out, state = model(window, state)                                             # (T, B, V)
        logits = out[-1]
    return logits, state


def start_token(vocab, generator: torch.Generator) -> tuple[int, bool]:
    """The hidden first input without a prime: a newline where the vocabulary has one (text starts
    after a line break), else a character drawn uniformly, as char-rnn does, which is printed.
    Returns (token id, whether it is part of the output)."""
    if "\n" in vocab.stoi:
        return vocab.stoi["\n"], False
    return int(torch.randint(len(vocab), (1,), generator=generator)), True


@dataclass
class Generation:
    """The texts of one generation and how they were made."""

    texts: list[str]             # one per sample, each beginning with the prime
    prime: str                   # the prime as given
    skipped: list[str]           # distinct prime characters left out (``unknown='skip'``)
    seed: int
    stepper: str                 # 'native step (fp32)', 'fast step (TorchScript)', 'fast step' or 'model.forward'
    generated: int               # characters generated per sample


def generate(model, vocab, *, prime: str = "", length: int = 500, num_samples: int = 1,
             options: SamplingOptions | None = None, seed: int | None = None, unknown: str = "error",
             on_text: Callable[[list[str]], None] | None = None, fast: bool = True, script: bool = True,
             native: bool = True, precision: str = "fp32", threads: int | None = None,
             chunk: int = CHUNK) -> Generation:
    """Generate ``num_samples`` texts of ``length`` characters after ``prime``, as one batch.

    The prime is read once; then one step per character carries the state
    forward under ``torch.inference_mode()``. ``on_text`` receives the new text
    of every sample as it is produced (a list with one string per sample; the
    prime comes first). Characters of the prime outside the vocabulary raise
    CharlstmError naming them, or are left out with ``unknown='skip'``.
    The stepper is ``make_stepper``'s choice (``native``, ``precision``);
    ``threads`` torch threads generate (None: `stepping_threads`' default).
    """
    from .corpus import encode_text

    options = options or SamplingOptions()
    if length < 0:
        raise UsageError(f"--length must be >= 0 (got {length})")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1 (got {num_samples})")
    if unknown not in ("error", "skip"):
        raise UsageError(f"--unknown must be error or skip (got {unknown!r})")
    ids = encode_text(prime, vocab, unknown, hint="remove them from --prime or pass --unknown skip")
    skipped = vocab.unknown(prime) if ids.numel() < len(prime) else []
    if seed is None:
        seed = secrets.randbits(63)
    device = model.head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    B = num_samples
    texts = [prime] * B
    if on_text is not None and prime:
        on_text([prime] * B)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids = ids.to(device)
            left = length
            if ids.numel() == 0:
                first, shown = start_token(vocab, generator)
                ids = torch.tensor([first], device=device)
                if shown and left > 0:
                    texts = [t + vocab.chars[first] for t in texts]
                    left -= 1
                    if on_text is not None:
                        on_text([vocab.chars[first]] * B)
            logits, state = read_prime(model, ids, B)
            stepper = make_stepper(model, fast=fast, script=script, native=native, precision=precision,
                                   options=options)
            stepper.load_state(state)
            pieces: list[list[str]] = [[] for _ in range(B)]
            with torch_threads(stepping_threads(stepper, threads)):
                while left > 0:
                    n = min(chunk, left)
                    out, logits = stepper.generate(logits, n, options, generator)    # (n, B)
                    new = [vocab.decode(col) for col in out.t().cpu().tolist()]
                    for piece, text in zip(pieces, new):
                        piece.append(text)
                    if on_text is not None:
                        on_text(new)
                    left -= n
    finally:
        model.train(was_training)
    texts = [t + "".join(p) for t, p in zip(texts, pieces)]
    name = stepper.name + (" (TorchScript)" if getattr(stepper, "scripted", False) else "")
    return Generation(texts=texts, prime=prime, skipped=skipped, seed=seed, stepper=name, generated=length)


# --------------------------------------------------------------------------- command line

def sample_header(i: int, n: int) -> str:
    """The line that opens sample i of n when several are generated."""
    return f"----- sample {i} of {n} -----\n"


def format_samples(texts: list[str]) -> str:
    """All samples as one text: a single sample as it is, several each under a header line."""
    if len(texts) == 1:
        return texts[0]
    return "".join(sample_header(i + 1, len(texts)) + t + "\n" for i, t in enumerate(texts))


class _Stream:
    """Writes sample 1 to stdout as it is produced; the other samples follow when all are done."""

    def __init__(self, n: int, out=None):
        self.n = n
        self.out = out or sys.stdout
        self.started = False

    def __call__(self, new: list[str]) -> None:
        if not self.started:
            self.started = True
            if self.n > 1:
                self.out.write(sample_header(1, self.n))
        self.out.write(new[0])
        self.out.flush()

    def finish(self, texts: list[str]) -> None:
        if not self.started:
            self([texts[0]])
        self.out.write("\n")
        for i, t in enumerate(texts[1:], start=2):
            self.out.write(sample_header(i, self.n) + t + "\n")
        self.out.flush()


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_from_cli(*, run: Path | None, prime: str, length: int, temperature: float, top_k: int | None,
                 top_p: float | None, greedy: bool, seed: int | None, num_samples: int, output: Path | None,
                 no_stream: bool, unknown: str, device: str, threads: int | None = None, precision: str = "fp32",
                 checkpoints: Path = Path("checkpoints")) -> Generation:
    """`charlstm sample`: load the checkpoint RUN names and print (or write) what it generates.

    ``threads`` torch threads while generating (None: all cores for the native
    step, one for the torch steps; see `stepping_threads` and docs/sampling.md)."""
    check_threads(threads)                  # before the checkpoint is loaded
    return _sample_command(run=run, prime=prime, length=length, temperature=temperature, top_k=top_k,
                           top_p=top_p, greedy=greedy, seed=seed, num_samples=num_samples, output=output,
                           no_stream=no_stream, unknown=unknown, device=device, threads=threads,
                           precision=precision, checkpoints=checkpoints)


def _sample_command(*, run, prime, length, temperature, top_k, top_p, greedy, seed, num_samples, output,
                    no_stream, unknown, device, threads, precision, checkpoints) -> Generation | None:
    from .checkpoint import load_checkpoint, resolve_checkpoint, write_text_atomic

    options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    if length < 0:
        raise UsageError(f"--length must be >= 0 (got {length})")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1 (got {num_samples})")
    if unknown not in ("error", "skip"):
        raise UsageError(f"--unknown must be error or skip (got {unknown!r})")
    if output is not None and Path(output).is_dir():
        raise UsageError(f"--output {output} is a directory; give a file name")
    dev = resolve_device(device)
    path = resolve_checkpoint(run, checkpoints)
    if run is None:
        _note(f"sampling from {path} (the most recent run under {checkpoints}/)")
    ckpt = load_checkpoint(path, map_location=dev)
    stream = _Stream(num_samples) if output is None and not no_stream else None
    try:
        gen = generate(ckpt.model, ckpt.vocab, prime=prime, length=length, num_samples=num_samples, options=options,
                       seed=seed, unknown=unknown, on_text=stream, precision=precision, threads=threads)
        if output is not None:
            try:
                write_text_atomic(Path(output), format_samples(gen.texts))
            except OSError as e:
                raise CharlstmError(f"cannot write --output {output}: {e.strerror or e}") from e
            _note(f"wrote {num_samples} sample(s), {sum(len(t) for t in gen.texts):,} characters, to {output}")
        elif stream is not None:
            stream.finish(gen.texts)
        else:
            sys.stdout.write(format_samples(gen.texts) + ("\n" if num_samples == 1 else ""))
            sys.stdout.flush()
        # the notes come after the text has ended its line, so that each starts a line of its own
        if gen.skipped:
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in gen.skipped)
            _note(f"left out of the prime {len(gen.skipped)} character(s) not in the vocabulary: {shown}")
        if seed is None:
            _note(f"seed {gen.seed} (pass --seed {gen.seed} to get this text again)")
    except BrokenPipeError:
        # The reader went away (`charlstm sample | head`): stop quietly, as other Unix tools do.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
            pass
        return None
    return gen

"""The steppers that generate text one character at a time, the state carried.

- :class:`~charlstm.native.step.NativeStep` (the default where it runs): the step in C, a chunk
  of characters per call, for float32 CPU models of every variant (docs/sampling.md);
- :class:`FastStep` (the default otherwise): the equations straight from the weights, for every
  variant and backend, in TorchScript where torch can script it;
- :class:`ModelStep`: ``model.forward`` with T = 1, the reference.

Every stepper has ``load_state``, ``get_state``, ``advance(x)`` and ``generate(logits, n, opts,
noise)``; the caller draws the noise (sampling.gumbel_noise), so every stepper draws alike.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from .errors import UsageError
from .model import CharModel, State
from .native.build import library
from .native.step import PRECISIONS, NativeStep
from .native.step import unsupported as native_step_unsupported
from .sampling import SamplingOptions, choose
from .stepweights import step_weights

PRIME_WINDOW = 1024      # prime characters read per model.forward call


# --------------------------------------------------------------------------- the torch step (TorchScript)

def _peep(pre: Tensor, p: Tensor, c: Tensor) -> Tensor:
    """pre + P(c) for one peephole gate: p (H,) diag, (H, H) full (transposed), or empty (none)."""
    if p.numel() == 0:
        return pre
    if p.dim() == 1:
        return torch.addcmul(pre, p, c)
    return torch.addmm(pre, c, p)


def _cell(kind: str, H: int, pre: Tensor, h: Tensor, c: Tensor, w: list[Tensor]) -> Tensor:
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


def _advance(kind: str, H: int, table: Tensor, layers: list[list[Tensor]], head_w: Tensor, head_b: Tensor,
             x: Tensor, z: Tensor, cs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Feed characters x (B,) through every layer, updating the hidden states z (B, L*H) in place:
    the logits (B, V) of the next one, and the new cell states."""
    gru = kind == "gru" or kind == "gru_cho"
    new_c: list[Tensor] = []
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


def _generate_chunk(kind: str, H: int, table: Tensor, layers: list[list[Tensor]], head_w: Tensor, head_b: Tensor,
                    logits: Tensor, z: Tensor, cs: list[Tensor], n: int,
                    temperature: float, top_k: int, top_p: float, greedy: bool,
                    noise: Tensor | None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """n characters per stream from the pending logits (B, V) and the chunk's noise (n, B, V) (None:
    greedy): ids (n, B), then the logits after them (z, the hidden states, is updated in place) and
    the cell states."""
    out: list[Tensor] = []
    for t in range(n):
        row: Tensor | None = None
        if noise is not None:
            row = noise[t]
        x = choose(logits, temperature, top_k, top_p, greedy, row)         # (B,)
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

    def load_state(self, state: State) -> None:
        """Continue from a model State (h (L, B, H), c (L, B, H) or None)."""
        self.state = state

    def get_state(self) -> State:
        return self.state

    def advance(self, x: Tensor) -> Tensor:
        """Feed characters x (B,) and return the logits (B, V) of the next ones."""
        logits, self.state = self.model(x.view(1, -1), self.state)
        return logits[0]

    def generate(self, logits: Tensor, n: int, opts: SamplingOptions, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """n characters per stream from the pending logits and the chunk's noise (n, B, V) (None:
        greedy): ids (n, B) and the logits after them."""
        out = []
        for t in range(n):
            x = choose(logits, opts.temperature, opts.top_k, opts.top_p, opts.greedy,
                        None if noise is None else noise[t])
            out.append(x)
            logits = self.advance(x)
        return torch.stack(out), logits


class FastStep:
    """An inference-only step for a CharModel of any variant and backend, built from its weights.

    Computes the same logits as ``model.forward`` one character at a time (to float rounding),
    with fewer and larger operations (stepweights.py); the generation loop runs as a TorchScript
    function where torch can script it. The weights are copied when the stepper is built.
    """

    name = "fast step"

    def __init__(self, model, *, script: bool = True):
        w = step_weights(model)
        self.kind, self.H, self.L, self.has_c = w.kind, w.H, w.L, w.has_c
        self.table, self.layers, self.head_w, self.head_b = w.table, w.layers, w.head_w, w.head_b
        self.device, self.dtype = w.head_w.device, w.head_w.dtype
        self._fn = _scripted_generate_chunk() if script else None
        self.scripted = self._fn is not None
        self.z = torch.empty(0, device=self.device, dtype=self.dtype)              # (B, L*H)
        self.cs: list[Tensor] = []

    def load_state(self, state: State) -> None:
        """Continue from a model State (h (L, B, H), c (L, B, H) or None)."""
        L, B, H = state.h.shape
        self.z = state.h.to(self.dtype).permute(1, 0, 2).reshape(B, L * H).clone()   # (B, L*H)
        if self.has_c:
            self.cs = [t.contiguous() for t in state.c.to(self.dtype).unbind(0)]
        else:
            self.cs = [torch.empty(0, device=self.device, dtype=self.dtype)] * self.L

    def get_state(self) -> State:
        """The current state as a model State."""
        B = self.z.shape[0]
        h = self.z.view(B, self.L, self.H).transpose(0, 1).contiguous()             # (L, B, H)
        return State(h, torch.stack(self.cs) if self.has_c else None)

    def advance(self, x: Tensor) -> Tensor:
        """Feed characters x (B,) and return the logits (B, V) of the next ones."""
        logits, self.cs = _advance(self.kind, self.H, self.table, self.layers, self.head_w, self.head_b,
                                   x, self.z, self.cs)
        return logits

    def generate(self, logits: Tensor, n: int, opts: SamplingOptions, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """n characters per stream from the pending logits (B, V) and the chunk's noise (n, B, V) (None:
        greedy): ids (n, B) and the logits after them."""
        fn = self._fn if self._fn is not None else _generate_chunk
        ids, logits, self.cs = fn(self.kind, self.H, self.table, self.layers, self.head_w, self.head_b,
                                  logits, self.z, self.cs, n, opts.temperature, opts.top_k, opts.top_p,
                                  opts.greedy, noise)
        return ids, logits


def make_stepper(model, *, fast: bool = True, script: bool = True, native: bool = True,
                 precision: str = "fp32", options: SamplingOptions | None = None):
    """The stepper for a CharModel: the native step where it can run this model and these options
    (charlstm/native/step.py), else the fast torch step (``fast=False``, another kind of module, or a
    cell without a step kind in the registry: ModelStep). ``precision`` 'fp16' or 'int8' asks for the
    native step's float16 or int8 weights (native.abi.PRECISIONS), and is an error where that step
    cannot run."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    why = native_unavailable(model, options) if native and fast else "the native step was not asked for"
    if why is None:
        return NativeStep(model, precision)
    if precision != "fp32":
        raise UsageError(f"--precision {precision} needs the native step, which cannot run here: {why}")
    if fast and isinstance(model, CharModel) and model.spec.step is not None:
        return FastStep(model, script=script)
    return ModelStep(model)


def native_unavailable(model, options: SamplingOptions | None = None) -> str | None:
    """Why the native step cannot sample from this model with these options (None: it can)."""
    if not isinstance(model, CharModel):
        return "not a CharModel"
    if options is not None and (options.top_k or options.top_p < 1.0) and not options.greedy:
        return "top-k and top-p sampling use the torch step"
    why = native_step_unsupported(model)
    if why is None:
        lib, word = library()
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

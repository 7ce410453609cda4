"""The character model: embedding -> stacked recurrent layers -> linear head.

The stack is either torch's ``nn.RNN/LSTM/GRU`` (backend ``cudnn``; cuDNN on a GPU, PyTorch's own
kernels on a CPU) or the custom cells of the registry run by ``layers.RecurrentStack`` (backend
``custom``, every variant and form). Both name their weights as ``nn.LSTM`` does, and
:func:`convert_state_dict` maps one layout onto the other. The recurrent state is passed in and
returned explicitly as a :class:`State`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import ModelConfig, TrainConfig
from .errors import UsageError
from .fused import Tokens
from .layers import RecurrentStack
from .native import loops as native_loops
from .registry import CellSpec, spec_for


class State(NamedTuple):
    """The recurrent state of every layer."""

    h: Tensor                      # (L, B, H)
    c: Tensor | None               # (L, B, H) for the LSTM family, None for rnn and gru


class LayerWeights(NamedTuple):
    """One layer's parameters in the cells' layout, from either backend (for the sampling steps)."""

    w_ih: Tensor                   # (G*H, in)
    w_hh: Tensor                   # (G*H, H)
    b_ih: Tensor | None         # (G*H,) the input bias (the only bias of one-bias cells)
    b_hh: Tensor | None         # (G*H,) the recurrent bias of two-bias cells
    peep: tuple | None          # (weight_ch, gates) of a peephole cell with peepholes


def has_cudnn(cfg: ModelConfig) -> bool:
    """Whether the variant (and form) exists as torch.nn.RNN/LSTM/GRU."""
    return spec_for(cfg).cudnn is not None


def _device(device) -> torch.device:
    """The device asked for; None is the default one, cuda where present (as --device auto)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def custom_is_faster(cfg: ModelConfig, device=None) -> bool:
    """Whether the custom cells train faster than torch.nn's module on this device: on a CPU where the
    native loops run this config (the library built, H a multiple of 8), not on a GPU, where cuDNN's
    fused kernels win (docs/performance.md). On a CPU the first call may compile the library."""
    return _device(device).type == "cpu" and native_loops.unavailable_for(cfg.hidden) is None


def resolve_backend(cfg: ModelConfig, device=None) -> str:
    """'cudnn' or 'custom' for this config on this device (None: the default device, cuda where
    present); UsageError for an impossible pair. 'auto' takes the custom cells where the variant has
    no torch.nn module or where they are faster (custom_is_faster), else the torch.nn module."""
    if cfg.backend == "auto":
        return "custom" if not has_cudnn(cfg) or custom_is_faster(cfg, device) else "cudnn"
    if cfg.backend == "cudnn" and not has_cudnn(cfg):
        what = "gru --gru-form cho" if cfg.variant == "gru" else cfg.variant
        raise UsageError(
            f"--backend cudnn has no {what} cell (cuDNN offers rnn, lstm and gru in its own form); "
            "use --backend custom or --backend auto"
        )
    return cfg.backend


def describe_backend(model) -> str:
    """What runs a model's recurrent layers, in words, for summaries and `info`: 'cudnn (torch.nn.LSTM)',
    'custom (native loops)', or e.g. 'custom (torch loops; native loop: <why it cannot run>)'. The
    custom layers are asked which fast path would run an input of the model's type and device."""
    if model.cfg.backend == "cudnn":
        return f"cudnn (torch.nn.{type(model.rnn).__name__})"
    w = model.head.weight
    runs, reasons = [], []
    for layer in model.rnn.layers:
        path, why = layer.fast_path(w.new_zeros(1, 1, layer.cell.input_size))
        runs.append(path.name + "s" if path is not None and layer.use_fused else "step by step")
        reasons += [r for r in why if "=1 turns them on" not in r]   # opt-in GPU paths that are off: not news
    runs, reasons = list(dict.fromkeys(runs)), list(dict.fromkeys(reasons))
    shown = ", ".join(runs) + ("" if runs == ["native loops"] or not reasons else "; " + "; ".join(reasons))
    return f"custom ({shown})"


class CharModel(nn.Module):
    """Embedding -> recurrent stack (layer dropout between layers and before the head) -> logits."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise UsageError("the model needs a vocabulary size (ModelConfig.vocab_size > 0)")
        cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg, device))
        if cfg.backend == "custom" and _device(device).type == "cpu":
            native_loops.unavailable_for(cfg.hidden)     # compiles the C loops now, before any timing
        if cfg.init == "chrono":
            if cfg.chrono_tmax == 0:
                cfg.chrono_tmax = TrainConfig.seq_len     # nobody set it: the default training window
            if cfg.chrono_tmax < 2:
                raise UsageError(f"--chrono-tmax must be at least 2 (got {cfg.chrono_tmax})")
        self.cfg = cfg
        self.spec: CellSpec = spec_for(cfg)
        V, E, H, L = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.layers
        self.embedding = nn.Embedding(V, E)
        if cfg.backend == "cudnn":
            self.rnn = self.spec.cudnn(E, H, num_layers=L, bias=cfg.bias, dropout=cfg.dropout if L > 1 else 0.0)
        else:
            self.rnn = RecurrentStack(lambda n_in: self.spec.make_cell(cfg, n_in), E, H, L, cfg.dropout,
                                      self.spec.fast_paths)
        self.layer_dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(H, V)
        self.reset_parameters()

    @property
    def has_cell_state(self) -> bool:
        return self.spec.has_cell_state

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Initialise as EQUATIONS.md says: recurrent weights uniform(-1/sqrt(H), 1/sqrt(H)) (the
        mogrifier's rounds as nn.Linear's weights), forget-gate bias (LSTM family) or chrono
        initialisation; embedding N(0, 1), head uniform(-1/sqrt(H), 1/sqrt(H)) with zero bias."""
        H = self.cfg.hidden
        bound = 1.0 / math.sqrt(H)
        nn.init.normal_(self.embedding.weight, 0.0, 1.0)
        nn.init.uniform_(self.head.weight, -bound, bound)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            if self.cfg.backend == "cudnn":
                for p in self.rnn.parameters():
                    p.uniform_(-bound, bound)
            else:                                   # each cell's own init (the same for all but the mogrifier)
                for layer in self.rnn.layers:
                    layer.cell.reset_parameters()
            if self.cfg.bias:
                for k in range(self.cfg.layers):
                    self._init_gate_biases(*self._layer_biases(k))

    def _layer_biases(self, k: int) -> tuple[Tensor, Tensor | None]:
        """Layer k's bias that carries the gate-bias init, and the second bias (zeroed there) if any."""
        if self.cfg.backend == "cudnn":
            return getattr(self.rnn, f"bias_ih_l{k}"), getattr(self.rnn, f"bias_hh_l{k}")
        cell = self.rnn.layers[k].cell
        if cell.bias_ih is not None:
            return cell.bias_ih, cell.bias_hh
        return cell.bias, None

    def _init_gate_biases(self, main: Tensor, other: Tensor | None) -> None:
        """The forget-gate bias (--forget-bias) or chrono initialisation of the gates the registry names."""
        cfg, spec, H = self.cfg, self.spec, self.cfg.hidden

        def put(gate: str, value) -> None:
            rows = slice(spec.block(gate) * H, (spec.block(gate) + 1) * H)
            main[rows] = value
            if other is not None:
                other[rows] = 0.0  # the sum b_ih + b_hh carries the value

        if cfg.init == "chrono":
            u = torch.empty(H, dtype=main.dtype, device=main.device).uniform_(1.0, cfg.chrono_tmax - 1.0)
            keep = torch.log(u)  # (H,) bias of the gate that keeps the old state
            for gate, sign in spec.chrono:
                put(gate, sign * keep)
        elif spec.forget_gate is not None:
            put(spec.forget_gate, cfg.forget_bias)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device=None) -> State:
        """Zeros for every layer: h (L, B, H) and, for the LSTM family, c (L, B, H)."""
        w = self.head.weight
        shape = (self.cfg.layers, batch_size, self.cfg.hidden)
        device = w.device if device is None else device
        h = torch.zeros(shape, device=device, dtype=w.dtype)
        c = torch.zeros(shape, device=device, dtype=w.dtype) if self.has_cell_state else None
        return State(h, c)

    def _per_layer(self, state: State) -> list[tuple]:
        tensors = (state.h,) if state.c is None else (state.h, state.c)
        return list(zip(*(t.unbind(0) for t in tensors)))

    @staticmethod
    def _stacked(finals: list[tuple]) -> State:
        h = torch.stack([s[0] for s in finals])  # (L, B, H)
        c = torch.stack([s[1] for s in finals]) if len(finals[0]) > 1 else None
        return State(h, c)

    def _prepare_state(self, state: State | None, batch_size: int, device) -> State:
        if state is None:
            return self.init_state(batch_size, device=device)
        dtype = self.head.weight.dtype  # a state from a bf16-autocast window goes back to the weights' dtype
        if self.has_cell_state and state.c is None:
            raise UsageError(f"a {self.cfg.variant} model needs a state with a cell state c")
        return State(state.h.to(dtype), None if state.c is None or not self.has_cell_state else state.c.to(dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """idx (T, B) long and the state -> logits (T, B, V) and the final state."""
        T, B = idx.shape
        state = self._prepare_state(state, B, idx.device)
        if self.cfg.backend == "cudnn":
            hx = state.h if state.c is None else (state.h, state.c)
            out, hn = self.rnn(self.embedding(idx), hx)  # (T, B, H)
            new_state = State(*hn) if isinstance(hn, tuple) else State(hn, None)
        else:   # the first layer embeds the ids itself, or gathers its input half from the table (layers.Tokens)
            out, finals = self.rnn(Tokens(idx, self.embedding.weight), self._per_layer(state))  # (T, B, H)
            new_state = self._stacked(finals)
        logits = self.head(self.layer_dropout(out))  # (T, B, V)
        return logits, new_state

    def forward_with_gates(self, idx: Tensor, state: State | None = None):
        """Like forward, and also every gate activation: a list with one dict per layer,
        {name: (T, B, H)} with names such as 'i', 'f', 'g', 'o', 'c', 'h' (LSTM family),
        'r', 'z', 'n', 'h' (gru) or 'h' (rnn). A cudnn-backed model runs its custom twin
        with the same weights."""
        if self.cfg.backend == "cudnn":
            with torch.random.fork_rng(devices=[]):  # building the twin must not move the caller's RNG
                twin = CharModel(dataclasses.replace(self.cfg, backend="custom"))
            twin.load_state_dict(self.state_dict())
            twin.to(device=self.head.weight.device, dtype=self.head.weight.dtype)
            twin.train(self.training)
            return twin.forward_with_gates(idx, state)
        T, B = idx.shape
        state = self._prepare_state(state, B, idx.device)
        x = self.embedding(idx)  # (T, B, E)
        out, finals, gates = self.rnn(x, self._per_layer(state), return_gates=True)
        logits = self.head(self.layer_dropout(out))  # (T, B, V)
        return logits, self._stacked(finals), gates

    def layer_weights(self, k: int) -> LayerWeights:
        """Layer k's parameters in the cells' layout, from either backend."""
        if self.cfg.backend == "cudnn":
            rnn = self.rnn
            return LayerWeights(getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}"),
                                getattr(rnn, f"bias_ih_l{k}", None), getattr(rnn, f"bias_hh_l{k}", None), None)
        cell = self.rnn.layers[k].cell
        weight_ch = getattr(cell, "weight_ch", None)
        return LayerWeights(cell.weight_ih, cell.weight_hh, cell.bias_ih if cell.bias_ih is not None else cell.bias,
                            cell.bias_hh, None if weight_ch is None else (weight_ch, cell.peepholes))

    def num_parameters(self) -> int:
        """The number of parameters trained (the cuDNN layout's second bias included)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights saved by either backend (converted to this model's layout first)."""
        sd = convert_state_dict(state_dict, self.cfg, self.cfg.backend)
        return super().load_state_dict(sd, strict=strict, assign=assign)


def build_model(cfg: ModelConfig, device=None) -> CharModel:
    """The model of a config for a device (None: the default one, cuda where present); its ``cfg``
    has the backend resolved ('cudnn' or 'custom', see resolve_backend). The model is built on the
    CPU; move it with ``.to(device)``. UsageError for an impossible variant/backend pair."""
    return CharModel(cfg, device)


def detach_state(state: State) -> State:
    """The same state cut from the autograd graph (between truncated-BPTT windows)."""
    return State(state.h.detach(), None if state.c is None else state.c.detach())


_CUDNN_KEY = re.compile(r"^(.*)rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")
_CUSTOM_KEY = re.compile(r"^(.*)rnn\.layers\.(\d+)\.cell\.(weight_ih|weight_hh|bias_ih|bias_hh)$")


def convert_state_dict(sd: dict, cfg: ModelConfig, to_backend: str) -> dict:
    """A model state dict in the layout of ``to_backend`` ('cudnn' or 'custom'), from either layout.

    Only the recurrent weights are renamed (``rnn.weight_ih_l0`` <-> ``rnn.layers.0.cell.weight_ih``);
    the tensors are the same, since the custom cells use nn.LSTM/GRU/RNN's shapes and gate order.
    UsageError when the variant has no cuDNN layout (peephole, coupled, gru cho)."""
    if to_backend not in ("cudnn", "custom"):
        raise UsageError(f"to_backend must be 'cudnn' or 'custom' (got {to_backend!r})")
    out = {}
    for key, value in sd.items():
        m = _CUDNN_KEY.match(key) if to_backend == "custom" else _CUSTOM_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        if not has_cudnn(cfg):
            what = "gru in the cho form" if cfg.variant == "gru" else cfg.variant
            raise UsageError(f"{what} has no cuDNN layout; its weights only load into a custom model")
        if to_backend == "custom":
            prefix, name, k = m.groups()
            out[f"{prefix}rnn.layers.{k}.cell.{name}"] = value
        else:
            prefix, k, name = m.groups()
            out[f"{prefix}rnn.{name}_l{k}"] = value
    return out

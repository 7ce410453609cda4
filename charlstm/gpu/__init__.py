"""GPU fast paths for the custom cells: Triton step kernels (kernels.py, launched by the autograd
Functions of functions.py: one launch per time step, the recurrent product and the gate pointwise
fused) and CUDA-graph capture of a window (graphs.py). Optional (``pip install 'charlstm[gpu]'``):
triton is imported only when first needed, and where it or a CUDA device is absent nothing here
runs. The contract and the switches: docs/performance.md, "GPU: Triton kernels"."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from .. import cells
from ..fused import FastPath, peephole_weights

__all__ = ["KINDS", "ENV", "available", "why_unavailable", "enabled", "run_layer", "run_cell", "triton_loop", "load"]

KINDS = ("lstm", "peephole", "peephole_full", "coupled", "gru", "gru_cho", "rnn")
ENV = "CHARLSTM_TRITON"          # "1": the registry's triton paths may run
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_loaded: dict = {}                # "module": functions.py once imported, "error": why it could not be


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def load():
    """The ``functions`` module (imports triton); None where it cannot be imported."""
    if "module" not in _loaded and "error" not in _loaded:
        if importlib.util.find_spec("triton") is None:
            _loaded["error"] = "triton is not installed (pip install 'charlstm[gpu]')"
        elif _interpreting() and importlib.util.find_spec("numpy") is None:
            _loaded["error"] = "Triton's interpreter (TRITON_INTERPRET=1) needs numpy, which is not installed"
        else:
            try:
                from . import functions as module  # triton: optional and heavy, imported on first use
                _loaded["module"] = module
            except Exception as e:  # a broken triton install: say why, change nothing
                _loaded["error"] = f"triton could not be imported: {type(e).__name__}: {e}"
    return _loaded.get("module")


def why_unavailable(x: Tensor | None = None) -> str | None:
    """Why the Triton kernels cannot run (for ``x``), or None when they can."""
    if load() is None:
        return _loaded["error"]
    interpreted = load().INTERPRETED
    if x is None:
        if interpreted or torch.cuda.is_available():
            return None
        return "no CUDA device (and TRITON_INTERPRET=1 was not set before triton was imported)"
    if x.device.type != "cuda" and not interpreted:
        return f"x is on {x.device.type}; the kernels run on CUDA (or anywhere under TRITON_INTERPRET=1)"
    dtype = _compute_dtype(x)
    if dtype not in DTYPES:
        return f"dtype {dtype} (the kernels take {', '.join(str(d) for d in DTYPES)})"
    return None


def available(x: Tensor | None = None) -> bool:
    """Whether the Triton kernels can run (for input ``x``)."""
    return why_unavailable(x) is None


def enabled() -> bool:
    """The CHARLSTM_TRITON switch: true for 1/on/true/yes."""
    return os.environ.get(ENV, "0").lower() in ("1", "on", "true", "yes")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """x's dtype, or autocast's where autocast is on for x's device."""
    try:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
    except (TypeError, AttributeError):  # torch < 2.4
        if x.is_cuda and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


def run_layer(kind: str, x: Tensor, state: tuple | None, w_ih: Tensor, w_hh: Tensor, b: Tensor | None = None, *,
              b_hh: Tensor | None = None, peep: Tensor | None = None) -> tuple[Tensor, tuple]:
    """One layer over a window with the Triton kernels: outputs (T, B, H) and the final state.

    x (T, B, E); state (h0,) or (h0, c0), each (B, H), or None for zeros; w_ih (G*H, E),
    w_hh (G*H, H); b the bias folded into the input projection (G*H,) or None (for ``gru``,
    b_ih, with b_hh apart); peep the peephole weights of i, f, o, zeros for a gate without
    one: (3, H) for ``peephole``, (3H, H) for ``peephole_full``. x and the weights run in
    autocast's dtype where autocast is on, else in x's; cell states stay in float32.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    reason = why_unavailable(x)
    if reason is not None:
        raise RuntimeError(f"the Triton kernels cannot run here: {reason}")
    if kind.startswith("peephole") and peep is None:
        raise ValueError(f"{kind} needs its peephole weights (peep)")
    F = load()
    H = w_hh.shape[1]
    with_c = kind in ("lstm", "peephole", "peephole_full", "coupled")
    if state is None:
        state = tuple(x.new_zeros(x.shape[1], H) for _ in range(2 if with_c else 1))
    if x.shape[0] == 0:
        return x.new_empty(0, x.shape[1], H), tuple(state)
    dtype = _compute_dtype(x)
    x, w_ih, w_hh = x.to(dtype), w_ih.to(dtype), w_hh.to(dtype)
    h0 = state[0].to(dtype)
    if kind in ("peephole", "peephole_full"):
        hs, c = F.TritonPeepholeLSTM.apply(x, h0, state[1], w_ih, w_hh, b, peep, kind == "peephole_full")
    elif with_c:
        fn = F.TritonLSTM if kind == "lstm" else F.TritonCoupledLSTM
        hs, c = fn.apply(x, h0, state[1], w_ih, w_hh, b)
    elif kind == "gru":
        hs = F.TritonGRU.apply(x, h0, w_ih, w_hh, b, b_hh)
    elif kind == "gru_cho":
        hs = F.TritonChoGRU.apply(x, h0, w_ih, w_hh, b)
    else:
        hs = F.TritonRNN.apply(x, h0, w_ih, w_hh, b)
    return hs, ((hs[-1], c) if with_c else (hs[-1],))


def run_cell(kind: str, cell: cells.Cell, x: Tensor, state: tuple | None = None) -> tuple[Tensor, tuple]:
    """A cells.py cell over x (T, B, E) from ``state`` with the Triton kernels of ``kind``: outputs
    (T, B, H) and the final state, as the other fast paths return them."""
    if kind == "gru":
        return run_layer(kind, x, state, cell.weight_ih, cell.weight_hh, cell.bias_ih, b_hh=cell.bias_hh)
    peep = peephole_weights(cell) if kind.startswith("peephole") else None
    return run_layer(kind, x, state, cell.weight_ih, cell.weight_hh, cell.input_bias(), peep=peep)


def triton_loop(kind: str) -> FastPath:
    """The fast path that runs a cell with the Triton kernels of ``kind`` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")

    def unavailable(cell, x: Tensor) -> str | None:
        if not enabled():
            return f"the Triton kernels are off ({ENV}=1 turns them on)"
        return why_unavailable(x)

    return FastPath("triton", lambda cell, x, state: run_cell(kind, cell, x, state), unavailable)

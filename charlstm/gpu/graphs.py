"""CUDA-graph capture of one layer's window: its per-step launches recorded once, then replayed
(``run_graphed``, ``run_cell_graphed``, ``graphed`` as a FastPath; the ``CHARLSTM_CUDA_GRAPHS``
switch). On CUDA with autograd on only; everywhere else the layer is called as it is. Why:
docs/performance.md, "GPU: Triton kernels"."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..fused import FastPath

ENV = "CHARLSTM_CUDA_GRAPHS"
_GRAPHS: dict = {}               # (id(layer), shapes, dtypes, flags) -> graphed module
_WINDOWS: dict = {}              # (id(cell), run) -> Window, for run_cell_graphed


def enabled() -> bool:
    """The CHARLSTM_CUDA_GRAPHS switch: true for 1/on/true/yes."""
    return os.environ.get(ENV, "0").lower() in ("1", "on", "true", "yes")


def capturable(x: Tensor) -> bool:
    """Whether a window on x can be captured: x on CUDA, autograd on, no capture under way."""
    return (x.is_cuda and torch.cuda.is_available() and torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing())


class Window(nn.Module):
    """A cell and a window runner as one module: ``run(cell, x, state) -> (h, state)`` (a FastPath's
    ``run``), for capture."""

    def __init__(self, cell: nn.Module, run: Callable):
        super().__init__()
        self.cell = cell
        self.run = run

    def forward(self, x: Tensor, state: tuple | None = None):
        return self.run(self.cell, x, state)


class _Flat(nn.Module):
    """layer(x, state) with the state spread into positional tensors, as capture wants them."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, *state: Tensor):
        h, final = self.layer(x, tuple(state))
        return (h, *final)


def _autocast_without_cache():
    """Capture and replay refuse autocast's weight cache: keep autocast as it is, minus the cache."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _key(layer: nn.Module, args: tuple) -> tuple:
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return (id(layer), layer.training, autocast,
            tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args))


def run_graphed(layer: nn.Module, x: Tensor, state: tuple | None) -> tuple[Tensor, tuple]:
    """``layer(x, state)``, replayed from CUDA graphs captured on first use for these shapes
    (a plain call where ``capturable(x)`` is false or ``state`` is None).

    The graphs read the parameters where they live, so optimizer steps in place are seen; outputs
    are copied out of the graphs' buffers, so they stay valid. Rules for the caller:
    ``layer(x, state) -> (h (T, B, H), state)`` must not itself call run_graphed and must have
    static control flow for given shapes (the torch loops' and the Triton Functions do); one call
    per layer per backward (a second forward of the same layer before the backward would
    overwrite the first's saved activations)."""
    if not capturable(x) or state is None:
        return layer(x, state)
    args = (x, *state)
    key = _key(layer, args)
    with _autocast_without_cache():
        graphed = _GRAPHS.get(key)
        if graphed is None:
            graphed = torch.cuda.make_graphed_callables(_Flat(layer), args, allow_unused_input=True)
            _GRAPHS[key] = graphed
        out = tuple(o.clone() for o in graphed(*args))     # out of the graph's static buffers
    return out[0], out[1:]


def run_cell_graphed(cell: nn.Module, run: Callable, x: Tensor, state: tuple | None) -> tuple[Tensor, tuple]:
    """``run(cell, x, state)`` (a FastPath's ``run``) through ``run_graphed``, with
    one ``Window`` per cell and runner kept here, so that every call finds its captured graphs."""
    key = (id(cell), run)
    if key not in _WINDOWS:
        _WINDOWS[key] = Window(cell, run)
    return run_graphed(_WINDOWS[key], x, state)


def graphed(path: FastPath) -> FastPath:
    """``path`` replayed from CUDA graphs (``run_cell_graphed``) where graphs are on and x can be captured."""
    def unavailable(cell, x: Tensor) -> str | None:
        if not enabled():
            return f"CUDA graphs are off ({ENV}=1 turns them on)"
        if not capturable(x):
            return "the window cannot be captured (not on CUDA, no autograd, or a capture under way)"
        return path.unavailable(cell, x)

    return FastPath(f"{path.name} (CUDA graph)", lambda cell, x, state: run_cell_graphed(cell, path.run, x, state),
                    unavailable)


def cached() -> int:
    """How many captured windows are held."""
    return len(_GRAPHS)


def clear() -> None:
    """Drop every captured window (and the memory its graphs hold): call it when a model is done with."""
    _GRAPHS.clear()
    _WINDOWS.clear()

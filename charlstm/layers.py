"""One recurrent layer that runs any cell over time, and the stack of such layers.

The layer hoists the input projection out of the time loop (one matrix multiply over all T*B
inputs) and steps through ``unbind(0)`` (linear backward, unlike ``xp[t]``). A new cell needs no
change here. Where a fast path given by the cell registry can run the window, the layer runs
that instead: the same equations over the whole window (fused.py, fused_native.py). The
step-by-step loop stays the reference, and runs when no path can, when the gate activations
are asked for, and when ``use_fused`` is off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .cells import Cell, LayerState
from .fused import FastPath, Tokens


def _tensor_of(x: Tensor | Tokens) -> Tensor:
    """The tensor whose device and dtype an input has: x itself, or a first layer's embedding table."""
    return x.table if isinstance(x, Tokens) else x


class Recurrent(nn.Module):
    """Runs one cell over a sequence: x (T, B, E) and a state -> outputs (T, B, H), final state."""

    use_fused: bool = True  # run a fast path where one can (False: always step by step)

    def __init__(self, cell: Cell, fast_paths: Sequence[FastPath] = ()):
        super().__init__()
        self.cell = cell
        self.fast_paths = tuple(fast_paths)

    def fast_path(self, x: Tensor | Tokens) -> tuple[FastPath | None, list[str]]:
        """The first fast path that can run input x, and why each one before it cannot."""
        reasons = []
        probe = _tensor_of(x)                                # the paths ask for the input's device and dtype
        for path in self.fast_paths:
            why = path.unavailable(self.cell, probe)
            if why is None:
                return path, reasons
            reasons.append(f"{path.name}: {why}")
        return None, reasons

    def forward(self, x: Tensor | Tokens, state: LayerState | None = None, *, return_gates: bool = False):
        """Outputs (T, B, H) and the final state; with ``return_gates`` also a dict of
        every activation of the cell stacked over time, each (T, B, H). x: the inputs
        (T, B, E), or a first layer's token ids with the embedding table (``Tokens``)."""
        tokens = x if isinstance(x, Tokens) else None
        T, B = x.ids.shape if tokens is not None else x.shape[:2]
        if state is None:
            like = _tensor_of(x)
            state = self.cell.zero_state(B, device=like.device, dtype=like.dtype)
        path = self.fast_path(x)[0] if self.use_fused and not return_gates and T > 0 else None
        if tokens is not None:
            if path is not None and path.run_tokens is not None:
                return path.run_tokens(self.cell, tokens, tuple(state))
            x = tokens.embedded()
        if path is not None:
            return path.run(self.cell, x, tuple(state))
        if x.shape[0] == 0:
            return x.new_empty(0, x.shape[1], self.cell.hidden_size), tuple(state)
        xp = self.cell.project(x)  # (T, B, G*H), one matmul for all steps
        if return_gates:
            return self._forward_gates(xp, state)
        outputs = []
        for xp_t in xp.unbind(0):  # (B, G*H)
            h, state = self.cell(xp_t, state)
            outputs.append(h)
        return torch.stack(outputs), state  # (T, B, H)

    def _forward_gates(self, xp: Tensor, state: LayerState):
        steps = []
        for xp_t in xp.unbind(0):
            g = self.cell.gates(xp_t, state)
            state = tuple(g[name] for name in self.cell.state_names)
            steps.append(g)
        gates = {k: torch.stack([s[k] for s in steps]) for k in steps[0]}  # each (T, B, H)
        return gates["h"], state, gates


class RecurrentStack(nn.Module):
    """Layers stacked: layer k's outputs are layer k+1's inputs, with layer dropout
    between layers (never on the recurrent path)."""

    def __init__(self, make_cell: Callable[[int], Cell], input_size: int, hidden_size: int,
                 num_layers: int, layer_dropout: float = 0.0, fast_paths: Sequence[FastPath] = ()):
        super().__init__()
        self.layers = nn.ModuleList(
            Recurrent(make_cell(input_size if k == 0 else hidden_size), fast_paths) for k in range(num_layers)
        )
        self.layer_dropout = nn.Dropout(layer_dropout)

    def forward(self, x: Tensor | Tokens, states: list[LayerState] | None = None, *, return_gates: bool = False):
        """x (T, B, E) or the first layer's ``Tokens``, one state per layer -> top outputs
        (T, B, H), final states (and, with ``return_gates``, one dict of stacked activations per
        layer)."""
        if states is None:
            states = [None] * len(self.layers)
        finals, all_gates = [], []
        for k, (layer, state) in enumerate(zip(self.layers, states)):
            if k > 0:
                x = self.layer_dropout(x)
            if return_gates:
                x, state, gates = layer(x, state, return_gates=True)
                all_gates.append(gates)
            else:
                x, state = layer(x, state)
            finals.append(state)
        if return_gates:
            return x, finals, all_gates
        return x, finals

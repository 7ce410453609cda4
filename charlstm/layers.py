"""One recurrent layer that runs any cell over time, and the stack of such layers.

The layer hoists the input projection out of the time loop: ``cell.project``
is one matrix multiply over all T*B inputs, and the loop (over ``unbind(0)``,
whose backward is linear in T, unlike indexing ``xp[t]``) only adds the
recurrent product. A new cell needs no change here.

For speed, a layer whose cell has a fused implementation (every cell of
``cells.py``; see ``fused.py`` and docs/performance.md) runs that instead: the
same equations, one ``torch.autograd.Function`` for the whole window. The
step-by-step loop below stays the reference, and runs when ``use_fused`` is
False, when the gate activations are asked for, and under autocast.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from . import fused
from .cells import Cell, LayerState


class Recurrent(nn.Module):
    """Runs one cell over a sequence: x (T, B, E) and a state -> outputs (T, B, H), final state."""

    use_fused: bool = True  # run fused.py's loop where the cell has one (False: always step by step)

    def __init__(self, cell: Cell):
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, state: LayerState | None = None, *, return_gates: bool = False):
        """Outputs (T, B, H) and the final state; with ``return_gates`` also a dict of
        every activation of the cell stacked over time, each (T, B, H)."""
        if state is None:
            state = self.cell.zero_state(x.shape[1], device=x.device, dtype=x.dtype)
        if self.use_fused and not return_gates and fused.supports(self.cell, x):
            return fused.run_layer(self.cell, x, state)
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
                 num_layers: int, layer_dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            Recurrent(make_cell(input_size if k == 0 else hidden_size)) for k in range(num_layers)
        )
        self.layer_dropout = nn.Dropout(layer_dropout)

    def forward(self, x: Tensor, states: list[LayerState] | None = None, *, return_gates: bool = False):
        """x (T, B, E), one state per layer -> top outputs (T, B, H), final states
        (and, with ``return_gates``, one dict of stacked activations per layer)."""
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

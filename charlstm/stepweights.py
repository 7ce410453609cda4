"""A model's weights laid out for one-character steps (``step_weights``), shared by the torch and the
C sampling steps: the states of all layers side by side in one buffer, the embedding folded into
layer 0's table, stacked products where they save calls (docs/sampling.md, "The native step")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The step's gate order, as indices of the cell's blocks, where it differs from the cell's (it saves
# calls): lstm i, f, o, g; coupled f, o, g.
STEP_ORDER = {"lstm": (0, 1, 3, 2), "coupled": (0, 2, 1)}
STACKED = ("lstm", "peephole", "coupled", "rnn")      # kinds whose layers k >= 1 do one stacked product


@dataclass
class StepWeights:
    """Everything a sampling step reads, copied out of a model.

    The hidden states of all layers live side by side in one buffer z (B, L*H), layer k's h in
    columns [kH, (k+1)H). A layer k >= 1 finds its input (the new h of layer k - 1) and its own
    previous h next to each other, so for the LSTMs and the RNN one product by the stacked
    [W_ih; W_hh]^T gives all its gates. ``layers[k]`` holds the tensors of layer k:
      [0] w_x  (in, G*H)    input weights, transposed; (in + H, G*H) [W_ih; W_hh]^T for a stacked layer
                            (k >= 1 and not a GRU); empty for layer 0 (the table has them)
      [1] b_x  (G*H,)       every bias that simply adds (zeros without biases)
      [2] w_h  (H, G*H)     recurrent weights, transposed (empty for a stacked layer; gru cho: only the
                            r and z blocks, (H, 2H))
      [3] b_h  (G*H,)       gru (cudnn form): b_hh, which sits inside r * (...) for the n block
      [4] w_hn (H, H)       gru cho: the n block's recurrent weights, applied to r * h
      [4..6] p_i, p_f, p_o  peephole: (H,) diag, (H, H) full transposed, or empty without that peephole
    """

    kind: str                      # the registry's step kind: lstm, peephole, coupled, gru, gru_cho, rnn
    H: int
    L: int
    has_c: bool
    table: Tensor                  # (V, G*H) layer 0's input half of every gate per character
    layers: list[list[Tensor]]     # per layer, see above
    head_w: Tensor                 # (H, V)
    head_b: Tensor                 # (V,)


def _order(kind: str, t: Tensor, H: int) -> Tensor:
    order = STEP_ORDER.get(kind)
    return t if order is None else torch.cat([t[k * H:(k + 1) * H] for k in order], 0)


def _peepholes(peep, H: int, empty: Tensor) -> list[Tensor]:
    """p_i, p_f, p_o from a cell's (weight_ch, gates): one block per gate listed, in the order f, i, o."""
    found = {}
    if peep is not None:
        weight_ch, gates = peep
        for j, g in enumerate(gates):
            block = weight_ch[j * H:(j + 1) * H]                                 # (H,) or (H, H)
            found[g] = block.clone() if block.dim() == 1 else block.t().contiguous()
    return [found.get(g, empty) for g in "ifo"]


def _layer(kind: str, k: int, H: int, lw) -> tuple[list[Tensor], Tensor, Tensor]:
    """Layer k's tensors in the step's layout, and its input weights and additive bias (for the table)."""
    w_ih, w_hh = lw.w_ih, lw.w_hh
    zeros = torch.zeros(w_ih.shape[0], device=w_ih.device, dtype=w_ih.dtype)
    b_ih = zeros if lw.b_ih is None else lw.b_ih
    b_hh = zeros if lw.b_hh is None else lw.b_hh
    b_x, b_h = (b_ih, b_hh) if kind == "gru" else (b_ih + b_hh, None)
    empty = w_ih.new_empty(0)
    w_x = empty if k == 0 else _order(kind, w_ih, H).t().contiguous()          # (in, G*H)
    w_h = _order(kind, w_hh, H).t().contiguous()                               # (H, G*H)
    if kind == "gru_cho":
        w_h = w_hh[: 2 * H].t().contiguous()
    elif k > 0 and kind in STACKED:
        w_x, w_h = torch.cat([w_x, w_h], 0), empty                             # stacked: (in + H, G*H)
    out = [w_x, _order(kind, b_x, H).clone(), w_h, (b_h if b_h is not None else empty).clone()]
    if kind == "gru_cho":
        out.append(w_hh[2 * H:].t().contiguous())                              # (H, H)
    if kind == "peephole":
        out += _peepholes(lw.peep, H, empty)
    return out, w_ih, b_x


def step_weights(model) -> StepWeights:
    """The weights of a CharModel (either backend) in the sampling steps' layout, copied."""
    kind, H, L = model.spec.step, model.cfg.hidden, model.cfg.layers
    with torch.no_grad():
        layers, table = [], None
        for k in range(L):
            tensors, w_ih, b_x = _layer(kind, k, H, model.layer_weights(k))
            layers.append(tensors)
            if k == 0:
                table = torch.addmm(_order(kind, b_x, H), model.embedding.weight, _order(kind, w_ih, H).t())
        return StepWeights(kind=kind, H=H, L=L, has_c=model.spec.has_cell_state, table=table.contiguous(),
                           layers=layers, head_w=model.head.weight.t().contiguous().clone(),
                           head_b=model.head.bias.clone())

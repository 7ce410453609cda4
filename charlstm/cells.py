"""The recurrent cells of ../shared/EQUATIONS.md, one small class each. A cell maps one time step
``(x_proj_t, state) -> (h_t, state)``: ``project`` computes the input half of every gate for all
steps at once (hoisted out of the time loop by the layer), ``gates`` returns every activation of a
step. Parameters are named and ordered as torch.nn.LSTM / GRU / RNN's, so weights copy between the
custom cells and the cuDNN-backed modules (docs/cells.md, "Composition" and "Parameters")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LayerState = tuple  # per layer: (h,) or (h, c), each (B, H)


class Cell(nn.Module):
    """What every cell shares: sizes, the hoisted input projection, a zero state."""

    gate_blocks: int = 1          # G: rows of weight_ih are G*H
    state_names: tuple = ("h",)   # the tensors of one layer's state
    two_biases: bool = False      # bias_ih and bias_hh (cuDNN layout) instead of one bias

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        G, H = self.gate_blocks, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(G * H, H))
        if bias and self.two_biases:
            self.bias_ih = nn.Parameter(torch.empty(G * H))
            self.bias_hh = nn.Parameter(torch.empty(G * H))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if bias and not self.two_biases:
            self.bias = nn.Parameter(torch.empty(G * H))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as PyTorch's RNNs do."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def input_bias(self) -> Tensor | None:
        """The bias folded into the hoisted projection (both biases where they simply add)."""
        if self.two_biases and self.bias_ih is not None:
            return self.bias_ih + self.bias_hh
        return self.bias

    def project(self, x: Tensor) -> Tensor:
        """The input half of every gate for all steps at once: (..., E) -> (..., G*H)."""
        return F.linear(x, self.weight_ih, self.input_bias())

    def zero_state(self, batch_size: int, *, device=None, dtype=None) -> LayerState:
        """Zeros for every state tensor, each (B, H)."""
        return tuple(torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype) for _ in self.state_names)

    def gates(self, x_proj_t: Tensor, state: LayerState) -> dict[str, Tensor]:
        """Every activation of one step, including the new state, each (B, H)."""
        raise NotImplementedError

    def forward(self, x_proj_t: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One step: the projected input (B, G*H) and the state -> output h_t (B, H), new state."""
        g = self.gates(x_proj_t, state)
        new_state = tuple(g[name] for name in self.state_names)
        return new_state[0], new_state

    def extra_repr(self) -> str:
        has_bias = self.bias is not None or self.bias_ih is not None
        return f"{self.input_size}, {self.hidden_size}, bias={has_bias}"


class RNNCell(Cell):
    """rnn: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) (nn.RNN, tanh)."""

    gate_blocks = 1
    state_names = ("h",)
    two_biases = True

    def gates(self, x_proj_t: Tensor, state: LayerState) -> dict[str, Tensor]:
        (h,) = state
        h = torch.tanh(x_proj_t + F.linear(h, self.weight_hh))  # (B, H)
        return {"h": h}


class LSTMCell(Cell):
    """lstm: forget, input and output gates, candidate g = C~ (gate order i, f, g, o as nn.LSTM)."""

    gate_blocks = 4
    state_names = ("h", "c")
    two_biases = True

    def gates(self, x_proj_t: Tensor, state: LayerState) -> dict[str, Tensor]:
        h, c = state
        pre = x_proj_t + F.linear(h, self.weight_hh)  # (B, 4H)
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        return {"i": i, "f": f, "g": g, "o": o, "c": c, "h": h}


class PeepholeLSTMCell(Cell):
    """peephole: lstm whose gates f and i also see C_{t-1}, and o sees the new C_t.

    ``form='diag'``: P_g(C) = p_g * C, ``weight_ch`` (kH,) ; ``form='full'``:
    P_g(C) = U_g C, ``weight_ch`` (kH, H); k gates from ``peepholes`` (a subset
    of 'fio', blocks stored in that order).
    """

    gate_blocks = 4
    state_names = ("h", "c")
    two_biases = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *,
                 form: str = "diag", peepholes: str = "fio"):
        self.form = form
        self.peepholes = "".join(g for g in "fio" if g in peepholes)
        super().__init__(input_size, hidden_size, bias)
        # the parameters above were initialised in super().__init__; add the peepholes now
        k, H = len(self.peepholes), hidden_size
        shape = (k * H,) if form == "diag" else (k * H, H)
        if k:
            self.weight_ch = nn.Parameter(torch.empty(shape))
        else:
            self.register_parameter("weight_ch", None)
        self.reset_parameters()

    def peephole(self, gate: str, c: Tensor) -> Tensor | int:
        """P_gate(c) (B, H), or 0 when that gate has no peephole."""
        if gate not in self.peepholes:
            return 0
        H = self.hidden_size
        k = self.peepholes.index(gate)
        w = self.weight_ch[k * H:(k + 1) * H]  # (H,) or (H, H)
        return w * c if self.form == "diag" else F.linear(c, w)

    def gates(self, x_proj_t: Tensor, state: LayerState) -> dict[str, Tensor]:
        h, c_prev = state
        pre = x_proj_t + F.linear(h, self.weight_hh)  # (B, 4H)
        i, f, g, o = pre.chunk(4, 1)
        f = torch.sigmoid(f + self.peephole("f", c_prev))
        i = torch.sigmoid(i + self.peephole("i", c_prev))
        g = torch.tanh(g)
        c = f * c_prev + i * g
        o = torch.sigmoid(o + self.peephole("o", c))
        h = o * torch.tanh(c)
        return {"i": i, "f": f, "g": g, "o": o, "c": c, "h": h}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", form={self.form}, peepholes={self.peepholes!r}"


class CoupledLSTMCell(Cell):
    """coupled (CIFG): C_t = f * C_{t-1} + (1 - f) * C~_t; three gate blocks f, g, o, no input gate."""

    gate_blocks = 3
    state_names = ("h", "c")
    two_biases = False

    def gates(self, x_proj_t: Tensor, state: LayerState) -> dict[str, Tensor]:
        h, c = state
        pre = x_proj_t + F.linear(h, self.weight_hh)  # (B, 3H)
        f, g, o = pre.chunk(3, 1)
        f, g, o = torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + (1.0 - f) * g
        h = o * torch.tanh(c)
        return {"f": f, "g": g, "o": o, "c": c, "h": h}


class GRUCell(Cell):
    """gru, ``cudnn`` form (nn.GRU): reset applied after the recurrent product; z keeps the old state.

    r = σ(x_r + W_hr h + b_hr), z = σ(x_z + W_hz h + b_hz),
    n = tanh(x_n + r * (W_hn h + b_hn)), h_t = (1 - z) * n + z * h.
    """

    gate_blocks = 3
    state_names = ("h",)
    two_biases = True

    def input_bias(self) -> Tensor | None:
        # b_hn sits inside r * (...), so only b_ih is folded into the projection.
        return self.bias_ih

    def gates(self, x_proj_t: Tensor, state: LayerState) -> dict[str, Tensor]:
        (h,) = state
        hp = F.linear(h, self.weight_hh, self.bias_hh)  # (B, 3H)
        xr, xz, xn = x_proj_t.chunk(3, 1)
        hr, hz, hn = hp.chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return {"r": r, "z": z, "n": n, "h": h}


class ChoGRUCell(Cell):
    """gru, ``cho`` form (Cho et al. 2014, the seed's): reset applied before the recurrent product.

    r = σ(x_r + W_hr h + b_r), z = σ(x_z + W_hz h + b_z),
    n = tanh(x_n + W_hn (r * h) + b_n), h_t = (1 - z) * h + z * n.
    Weight blocks in the order r, z, n like nn.GRU; one bias per gate.
    """

    gate_blocks = 3
    state_names = ("h",)
    two_biases = False

    def gates(self, x_proj_t: Tensor, state: LayerState) -> dict[str, Tensor]:
        (h,) = state
        H = self.hidden_size
        hrz = F.linear(h, self.weight_hh[: 2 * H])  # (B, 2H)
        xr, xz, xn = x_proj_t.chunk(3, 1)
        hr, hz = hrz.chunk(2, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + F.linear(r * h, self.weight_hh[2 * H:]))
        h = (1.0 - z) * h + z * n
        return {"r": r, "z": z, "n": n, "h": h}


class MogrifierLSTMCell(Cell):
    """mogrifier (Melis et al. 2020): x and h gate each other for ``rounds`` rounds, then the lstm runs.

    With x^(-1) = x_t and h^(0) = h_{t-1}, round i = 1 .. r: odd x^(i) = 2σ(Q^(i) h^(i-1)) * x^(i-2),
    even h^(i) = 2σ(R^(i) x^(i-1)) * h^(i-2); the lstm step takes the last x and h (``x_mod``,
    ``h_mod``) in place of x_t and h_{t-1} (the carried c is not modulated). r = 0 is the lstm.

    The lstm part is LSTMCell's (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``, gates
    i, f, g, o). Round i's matrix is ``weight_q<i>`` (E, H) for odd i and ``weight_r<i>`` (H, E)
    for even i; at ``rank`` k > 0 it is the product of ``weight_q<i>_a`` (E, k) and
    ``weight_q<i>_b`` (k, H) (``weight_r<i>_a`` (H, k), ``weight_r<i>_b`` (k, E)). The rounds have
    no biases; each matrix is initialised as nn.Linear's weight, uniform ±1/sqrt(its columns).

    The input x_t is modulated by h_{t-1} before the W_ih product, so that product cannot be
    hoisted out of the time loop: :meth:`project` returns x itself and every step does all of it.
    """

    gate_blocks = 4
    state_names = ("h", "c")
    two_biases = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, rounds: int = 5, rank: int = 0):
        self.rounds, self.rank = rounds, rank
        super().__init__(input_size, hidden_size, bias)
        # the lstm part was initialised in super().__init__; add the rounds' matrices now
        for name, shape in self.round_shapes():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def round_shapes(self) -> list[tuple[str, tuple[int, int]]]:
        """(name, shape) of every round matrix, rounds in order (a before b at low rank)."""
        E, H, k = self.input_size, self.hidden_size, self.rank
        out = []
        for i in range(1, self.rounds + 1):
            name, rows, cols = (f"weight_q{i}", E, H) if i % 2 else (f"weight_r{i}", H, E)
            out += [(name, (rows, cols))] if k == 0 else [(name + "_a", (rows, k)), (name + "_b", (k, cols))]
        return out

    def round_weights(self) -> list[Tensor]:
        """The rounds' matrices in round order: one per round, or (a, b) per round at low rank."""
        return [getattr(self, name) for name, _ in self.round_shapes()]

    def reset_parameters(self) -> None:
        """The lstm part uniform(-1/sqrt(H), 1/sqrt(H)); each round matrix as nn.Linear's weight."""
        super().reset_parameters()
        for name, (_, cols) in self.round_shapes():
            if name in self._parameters:
                bound = 1.0 / math.sqrt(cols)
                nn.init.uniform_(self._parameters[name], -bound, bound)

    def project(self, x: Tensor) -> Tensor:
        """x itself: the input is modulated by the state before its product, inside the step."""
        return x

    def round_product(self, i: int, v: Tensor) -> Tensor:
        """Q^(i) v (odd i) or R^(i) v (even i) for a batch of row vectors v."""
        name = f"weight_q{i}" if i % 2 else f"weight_r{i}"
        if self.rank == 0:
            return F.linear(v, getattr(self, name))
        return F.linear(F.linear(v, getattr(self, name + "_b")), getattr(self, name + "_a"))

    def mogrify(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """The rounds: x_t (B, E) and h_{t-1} (B, H) -> the modulated x (B, E) and h (B, H)."""
        for i in range(1, self.rounds + 1):
            if i % 2:
                x = 2.0 * torch.sigmoid(self.round_product(i, h)) * x
            else:
                h = 2.0 * torch.sigmoid(self.round_product(i, x)) * h
        return x, h

    def gates(self, x_proj_t: Tensor, state: LayerState) -> dict[str, Tensor]:
        h, c = state
        x_mod, h_mod = self.mogrify(x_proj_t, h)
        pre = F.linear(x_mod, self.weight_ih, self.input_bias()) + F.linear(h_mod, self.weight_hh)  # (B, 4H)
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        return {"x_mod": x_mod, "h_mod": h_mod, "i": i, "f": f, "g": g, "o": o, "c": c, "h": h}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rounds={self.rounds}, rank={self.rank}"

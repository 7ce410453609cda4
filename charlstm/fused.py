"""The torch loops: each custom cell over a whole window as one torch.autograd.Function, and
``FastPath``, what every fast path of a layer is (layers.Recurrent tries them in the order registry.py
lists). This module holds the shared helpers and the lstm family (lstm, peephole, coupled);
fused_gru.py the gru (both forms) and the rnn, fused_mogrifier.py the mogrifier. They compute exactly
the equations of cells.py; how the loops are made fast is in docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cells import Cell, LayerState

CHUNK = 16   # backward: steps whose derivative factors are computed together, just before use


def _prev(buf: Tensor) -> Tensor:
    """The (T, B, H) view of the values before each step in a (T+1, B, H) buffer."""
    return buf[:-1]


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _block_len(T: int) -> int:
    """Steps in the backward's longest block (the length of its block buffers)."""
    return min(CHUNK, T)


def _chunks(T: int):
    """(start, end) of the backward's blocks of steps, last block first."""
    end = T
    while end > 0:
        start = max(0, end - CHUNK)
        yield start, end
        end = start


def _doubled_rows(t: Tensor | None, H: int, block: int) -> Tensor | None:
    """A copy of t with gate block ``block`` (rows block*H:(block+1)*H) doubled.

    The candidate gate g = tanh(p) is computed as 2 * sigmoid(2p) - 1 so that one
    sigmoid call activates every gate of a step; the factor 2 goes into copies of
    g's weight and bias rows. Doubling is exact in floating point."""
    if t is None:
        return None
    out = t.clone()
    out[block * H:(block + 1) * H] *= 2
    return out


def _project(x: Tensor, w_ih: Tensor, b: Tensor | None) -> Tensor:
    """The input half of every gate for all steps, one matrix multiply: (T, B, E) -> (T, B, G*H)."""
    T, B, E = x.shape
    x2 = x.reshape(T * B, E)
    out = torch.mm(x2, w_ih.t()) if b is None else torch.addmm(b, x2, w_ih.t())
    return out.view(T, B, -1)


def _input_grads(ctx, dpre: Tensor, x: Tensor, w_ih: Tensor, has_bias: bool):
    """Gradients of the hoisted projection from those of the pre-activations dpre (T, B, G*H):
    dx (T, B, E), dW_ih and the bias, each ONE product or sum over all T*B rows."""
    T, B, E = x.shape
    flat = dpre.view(T * B, -1)
    dx = flat.mm(w_ih).view(T, B, E) if ctx.needs_input_grad[0] else None
    dw_ih = flat.t().mm(x.reshape(T * B, E))
    db = flat.sum(0) if has_bias else None
    return dx, dw_ih, db


def _lstm_factors(gates4: Tensor, c_prev: Tensor, tc: Tensor, K: Tensor, Ko: Tensor, od: Tensor, tmp: Tensor) -> None:
    """The derivative factors of a block of n steps of the lstm family's activated gates
    gates4 (n, B, 4, H) (i, f, g, o), written into the block buffers: K (n, B, >=3, H) with
    dpre_{i,f,g} = dc * K, Ko (n, B, H) with dpre_o = dh * Ko, and od = o (1 - tanh(c)^2);
    c_prev (n, B, H) the cell states before each step, tc (n, B, H) tanh(c_t), tmp scratch."""
    i, f, g, o = gates4.unbind(2)                                                       # each (n, B, H)
    torch.mul(torch.addcmul(i, i, i, value=-1, out=tmp), g, out=K[:, :, 0])             # g i (1 - i)
    torch.mul(torch.addcmul(f, f, f, value=-1, out=tmp), c_prev, out=K[:, :, 1])        # c_prev f (1 - f)
    torch.addcmul(i, torch.mul(i, g, out=tmp), g, value=-1, out=K[:, :, 2])            # i (1 - g^2)
    torch.mul(torch.addcmul(o, o, o, value=-1, out=tmp), tc, out=Ko)                    # tanh(c) o (1 - o)
    torch.addcmul(o, torch.mul(o, tc, out=tmp), tc, value=-1, out=od)


# --------------------------------------------------------------------------- fast paths

@dataclass(frozen=True)
class FastPath:
    """One way to run a layer's whole window faster than step by step (see layers.Recurrent)."""

    name: str                                                        # 'torch loop', 'native loop', ...
    run: Callable[[Cell, Tensor, LayerState], tuple[Tensor, LayerState]]   # x (T, B, E) -> (T, B, H), state
    unavailable: Callable[[Cell, Tensor], str | None]              # why it cannot run this input (None: it can)
    # the same for a first layer given token ids and the embedding table (layers.Tokens); None: the
    # layer embeds the ids and calls ``run``
    run_tokens: Callable[[Cell, Tokens, LayerState], tuple[Tensor, LayerState]] | None = None


class Tokens(NamedTuple):
    """A first layer's input as token ids (T, B) and the embedding table (V, E) rather than the
    embedded (T, B, E): a fast path with ``run_tokens`` gathers rows of the table's projection
    (V, G*H), one small product, instead of projecting all T*B embedded inputs (docs/performance.md,
    "The first layer's input, and AdamW fused")."""

    ids: Tensor
    table: Tensor

    def embedded(self) -> Tensor:
        return torch.nn.functional.embedding(self.ids, self.table)   # (T, B, E)


def autocast_on(x: Tensor) -> bool:
    """Whether mixed precision (autocast) is active for x's device; the step-by-step layer handles it."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if x.device.type == "cpu" else torch.is_autocast_enabled()


def _torch_loop_unavailable(cell: Cell, x: Tensor) -> str | None:
    return "autocast is on (the step-by-step layer runs mixed precision)" if autocast_on(x) else None


def torch_loop(run) -> FastPath:
    """The torch loop ``run`` (cell, x, state) -> (h (T, B, H), state) as a FastPath: it runs any input
    but under autocast."""
    return FastPath("torch loop", run, _torch_loop_unavailable)


# --------------------------------------------------------------------------- lstm

class _LSTM(torch.autograd.Function):
    """lstm over a window. Inputs: x (T, B, E); h0, c0 (B, H); w_ih (4H, E), w_hh (4H, H)
    and b (4H,) (b_ih + b_hh) or None, gate order i, f, g, o. Outputs: h (T, B, H), c_T (B, H)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        gates = _project(x, _doubled_rows(w_ih, H, 2), _doubled_rows(b, H, 2))  # (T, B, 4H) i, f, 2g, o
        hs = x.new_empty(T + 1, B, H)                       # h_{-1} .. h_{T-1}
        cs = x.new_empty(T + 1, B, H)                       # c_{-1} .. c_{T-1}
        tcs = x.new_empty(T, B, H)                          # tanh(c_t)
        hs[0], cs[0] = h0, c0
        w_t = _doubled_rows(w_hh, H, 2).t()
        G, Hs, C, TC = (a.unbind(0) for a in (gates, hs, cs, tcs))
        Ig, Fg, Gg, Og = (gates[:, :, k * H:(k + 1) * H].unbind(0) for k in range(4))
        for t in range(T):
            G[t].addmm_(Hs[t], w_t).sigmoid_()              # (B, 4H) every gate in one call
            Gg[t].mul_(2).sub_(1)                           # g = 2 sigmoid(2p) - 1 = tanh(p)
            c = torch.mul(Fg[t], C[t], out=C[t + 1])        # c = f * c_prev + i * g
            c.addcmul_(Ig[t], Gg[t])
            torch.mul(Og[t], torch.tanh(c, out=TC[t]), out=Hs[t + 1])
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, gates, hs, cs, tcs, w_ih, w_hh)
        return hs[1:], cs[T]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        x, gates, hs, cs, tcs, w_ih, w_hh = ctx.saved_tensors
        T, B, H4 = gates.shape
        H = H4 // 4
        dhs = _zeros_if_none(dhs, tcs)
        gates4 = gates.view(T, B, 4, H)
        dpre = torch.empty_like(gates)                      # (T, B, 4H) gradient of the pre-activations
        dpre4 = dpre.view(T, B, 4, H)
        DP, DP4, DPo, DH, Ft = dpre.unbind(0), dpre4.unbind(0), dpre4[:, :, 3].unbind(0), dhs.unbind(0), \
            gates4[:, :, 1].unbind(0)
        n_max = _block_len(T)
        K_buf = gates.new_empty(n_max, B, 4, H)             # dpre_{i,f,g} = dc * K, dpre_o = dh * K_o
        od_buf = gates.new_empty(n_max, B, H)               # o (1 - tanh(c)^2)
        tmp_buf = gates.new_empty(n_max, B, H)
        dc = _zeros_if_none(dc_last, cs[0]).clone()         # carries f_{t+1} * dc_{t+1}
        dh = DH[T - 1]
        bufs = (torch.empty_like(dc), torch.empty_like(dc))
        for start, end in _chunks(T):
            n = end - start
            K, od = K_buf[:n], od_buf[:n]
            _lstm_factors(gates4[start:end], cs[start:end], tcs[start:end], K, K[:, :, 3], od, tmp_buf[:n])
            Kt, Ko, OD = K.unbind(0), K[:, :, 3].unbind(0), od.unbind(0)
            for t in range(end - 1, start - 1, -1):
                j = t - start
                dc.addcmul_(dh, OD[j])                      # dc_t
                torch.mul(Kt[j], dc.unsqueeze(1), out=DP4[t])   # i, f, g (and o, overwritten next)
                torch.mul(Ko[j], dh, out=DPo[t])
                dh = torch.addmm(DH[t - 1], DP[t], w_hh, out=bufs[t & 1]) if t else DP[t].mm(w_hh)
                dc.mul_(Ft[t])
        dw_hh = dpre.view(T * B, H4).t().mm(_prev(hs).reshape(T * B, H))   # one GEMM over all steps
        dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, ctx.has_bias)
        return dx, dh, dc, dw_ih, dw_hh, db


# --------------------------------------------------------------------------- peephole

class _PeepholeLSTM(torch.autograd.Function):
    """peephole lstm over a window. Inputs: x (T, B, E); h0, c0 (B, H); w_ih (4H, E),
    w_hh (4H, H), b (4H,) or None, gate order i, f, g, o; p the peephole weights of
    gates i, f, o: (3, H) per unit (diag form) or (3H, H) matrices (full form), zeros
    for gates without one; ``full`` says which. i and f see c_{t-1}, o sees the new c_t."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b, p, full):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        gates = _project(x, _doubled_rows(w_ih, H, 2), _doubled_rows(b, H, 2))  # (T, B, 4H) i, f, 2g, o
        hs = x.new_empty(T + 1, B, H)
        cs = x.new_empty(T + 1, B, H)
        tcs = x.new_empty(T, B, H)
        hs[0], cs[0] = h0, c0
        w_t = _doubled_rows(w_hh, H, 2).t()
        G, Hs, C, TC = (a.unbind(0) for a in (gates, hs, cs, tcs))
        Ig, Fg, Gg, Og = (gates[:, :, k * H:(k + 1) * H].unbind(0) for k in range(4))
        IF, IFG = gates[:, :, :2 * H].unbind(0), gates[:, :, :3 * H].unbind(0)
        IF2 = gates[:, :, :2 * H].view(T, B, 2, H).unbind(0)
        if full:
            u_if_t, u_o_t = p[:2 * H].t(), p[2 * H:].t()    # (H, 2H), (H, H)
        else:
            p_if, p_o = p[:2], p[2]                         # (2, H), (H,)
        for t in range(T):
            G[t].addmm_(Hs[t], w_t)                         # (B, 4H)
            if full:                                        # i, f see c_prev
                IF[t].addmm_(C[t], u_if_t)
            else:
                IF2[t].addcmul_(p_if, C[t].unsqueeze(1))
            IFG[t].sigmoid_()
            Gg[t].mul_(2).sub_(1)                           # g = tanh(p)
            c = torch.mul(Fg[t], C[t], out=C[t + 1])
            c.addcmul_(Ig[t], Gg[t])
            if full:                                        # o sees the new c
                Og[t].addmm_(c, u_o_t)
            else:
                Og[t].addcmul_(p_o, c)
            Og[t].sigmoid_()
            torch.mul(Og[t], torch.tanh(c, out=TC[t]), out=Hs[t + 1])
        ctx.full = full
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, gates, hs, cs, tcs, w_ih, w_hh, p)
        return hs[1:], cs[T]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        x, gates, hs, cs, tcs, w_ih, w_hh, p = ctx.saved_tensors
        full = ctx.full
        T, B, H4 = gates.shape
        H = H4 // 4
        dhs = _zeros_if_none(dhs, tcs)
        gates4 = gates.view(T, B, 4, H)
        dpre = torch.empty_like(gates)
        dpre4 = dpre.view(T, B, 4, H)
        DP, DH, Ft = dpre.unbind(0), dhs.unbind(0), gates4[:, :, 1].unbind(0)
        DPifg, DPo = dpre4[:, :, :3].unbind(0), dpre4[:, :, 3].unbind(0)
        DPif, DPif2 = dpre[:, :, :2 * H].unbind(0), dpre4[:, :, :2].unbind(0)
        if full:
            u_if, u_o = p[:2 * H], p[2 * H:]                # (2H, H), (H, H)
        else:
            p_if, p_o = p[:2].unsqueeze(0), p[2]            # (1, 2, H), (H,)
        n_max = _block_len(T)
        K_buf = gates.new_empty(n_max, B, 3, H)             # dpre_{i,f,g} = dc * K
        Ko_buf = gates.new_empty(n_max, B, H)               # dpre_o = dh * K_o
        od_buf = gates.new_empty(n_max, B, H)
        tmp_buf = gates.new_empty(n_max, B, H)
        dc = _zeros_if_none(dc_last, cs[0]).clone()
        dh = DH[T - 1]
        bufs = (torch.empty_like(dc), torch.empty_like(dc))
        for start, end in _chunks(T):
            n = end - start
            K, Ko, od = K_buf[:n], Ko_buf[:n], od_buf[:n]
            _lstm_factors(gates4[start:end], cs[start:end], tcs[start:end], K, Ko, od, tmp_buf[:n])
            Kt, KO, OD = K.unbind(0), Ko.unbind(0), od.unbind(0)
            for t in range(end - 1, start - 1, -1):
                j = t - start
                dpo = torch.mul(KO[j], dh, out=DPo[t])
                dc.addcmul_(dh, OD[j])                      # dc_t: through h, from the next step,
                if full:                                    # and through o's peephole
                    dc.addmm_(dpo, u_o)
                else:
                    dc.addcmul_(dpo, p_o)
                torch.mul(Kt[j], dc.unsqueeze(1), out=DPifg[t])
                dh = torch.addmm(DH[t - 1], DP[t], w_hh, out=bufs[t & 1]) if t else DP[t].mm(w_hh)
                dc.mul_(Ft[t])                              # to c_{t-1}: f dc + the peepholes of i, f
                if full:
                    dc.addmm_(DPif[t], u_if)
                else:
                    dc.add_((DPif2[t] * p_if).sum(1))
        dw_hh = dpre.view(T * B, H4).t().mm(_prev(hs).reshape(T * B, H))
        dp = _peephole_grad(dpre, cs, full)
        dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, ctx.has_bias)
        return dx, dh, dc, dw_ih, dw_hh, db, dp, None


def _peephole_grad(dpre: Tensor, cs: Tensor, full: bool) -> Tensor:
    """The peephole weights' gradient, (3, H) diag or (3H, H) full, from the pre-activations'
    dpre (T, B, 4H) and the cell states cs (T+1, B, H): i and f saw c_{t-1}, o saw c_t."""
    T, B, H4 = dpre.shape
    H = H4 // 4
    c_prev, c_new = _prev(cs), cs[1:]
    if full:
        flat = dpre.view(T * B, H4)
        return torch.cat([flat[:, :2 * H].t().mm(c_prev.reshape(T * B, H)),
                          flat[:, 3 * H:].t().mm(c_new.reshape(T * B, H))])
    dpre4 = dpre.view(T, B, 4, H)
    return torch.stack([
        (dpre4[:, :, 0] * c_prev).sum((0, 1)),
        (dpre4[:, :, 1] * c_prev).sum((0, 1)),
        (dpre4[:, :, 3] * c_new).sum((0, 1)),
    ])


# --------------------------------------------------------------------------- coupled

class _CoupledLSTM(torch.autograd.Function):
    """coupled (CIFG) over a window: c = f * c_prev + (1 - f) * g. Inputs: x (T, B, E);
    h0, c0 (B, H); w_ih (3H, E), w_hh (3H, H), b (3H,) or None, gate order f, g, o."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        gates = _project(x, _doubled_rows(w_ih, H, 1), _doubled_rows(b, H, 1))  # (T, B, 3H) f, 2g, o
        hs = x.new_empty(T + 1, B, H)
        cs = x.new_empty(T + 1, B, H)
        tcs = x.new_empty(T, B, H)
        hs[0], cs[0] = h0, c0
        w_t = _doubled_rows(w_hh, H, 1).t()
        G, Hs, C, TC = (a.unbind(0) for a in (gates, hs, cs, tcs))
        Fg, Gg, Og = (gates[:, :, k * H:(k + 1) * H].unbind(0) for k in range(3))
        for t in range(T):
            G[t].addmm_(Hs[t], w_t).sigmoid_()              # (B, 3H)
            Gg[t].mul_(2).sub_(1)                           # g = tanh(p)
            c = torch.lerp(Gg[t], C[t], Fg[t], out=C[t + 1])    # g + f * (c_prev - g)
            torch.mul(Og[t], torch.tanh(c, out=TC[t]), out=Hs[t + 1])
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, gates, hs, cs, tcs, w_ih, w_hh)
        return hs[1:], cs[T]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        x, gates, hs, cs, tcs, w_ih, w_hh = ctx.saved_tensors
        T, B, H3 = gates.shape
        H = H3 // 3
        dhs = _zeros_if_none(dhs, tcs)
        gates3 = gates.view(T, B, 3, H)
        dpre = torch.empty_like(gates)
        dpre3 = dpre.view(T, B, 3, H)
        DP, DP3, DPo, DH, Ft = dpre.unbind(0), dpre3.unbind(0), dpre3[:, :, 2].unbind(0), dhs.unbind(0), \
            gates3[:, :, 0].unbind(0)
        n_max = _block_len(T)
        K_buf = gates.new_empty(n_max, B, 3, H)             # dpre_{f,g} = dc * K, dpre_o = dh * K_o
        od_buf = gates.new_empty(n_max, B, H)
        tmp_buf = gates.new_empty(n_max, B, H)
        tmp2_buf = gates.new_empty(n_max, B, H)
        dc = _zeros_if_none(dc_last, cs[0]).clone()
        dh = DH[T - 1]
        bufs = (torch.empty_like(dc), torch.empty_like(dc))
        for start, end in _chunks(T):
            n = end - start
            f, g, o = gates3[start:end].unbind(2)
            K, od, tmp, tmp2, tc = K_buf[:n], od_buf[:n], tmp_buf[:n], tmp2_buf[:n], tcs[start:end]
            torch.sub(cs[start:end], g, out=tmp2)
            torch.mul(torch.addcmul(f, f, f, value=-1, out=tmp), tmp2, out=K[:, :, 0])   # (c_prev - g) f (1 - f)
            torch.mul(g, g, out=tmp2).neg_().add_(1)
            torch.mul(torch.sub(1, f, out=tmp), tmp2, out=K[:, :, 1])                   # (1 - f)(1 - g^2)
            torch.mul(torch.addcmul(o, o, o, value=-1, out=tmp), tc, out=K[:, :, 2])    # tanh(c) o (1 - o)
            torch.addcmul(o, torch.mul(o, tc, out=tmp), tc, value=-1, out=od)
            Kt, Ko, OD = K.unbind(0), K[:, :, 2].unbind(0), od.unbind(0)
            for t in range(end - 1, start - 1, -1):
                j = t - start
                dc.addcmul_(dh, OD[j])
                torch.mul(Kt[j], dc.unsqueeze(1), out=DP3[t])   # f, g (and o, overwritten next)
                torch.mul(Ko[j], dh, out=DPo[t])
                dh = torch.addmm(DH[t - 1], DP[t], w_hh, out=bufs[t & 1]) if t else DP[t].mm(w_hh)
                dc.mul_(Ft[t])
        dw_hh = dpre.view(T * B, H3).t().mm(_prev(hs).reshape(T * B, H))
        dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, ctx.has_bias)
        return dx, dh, dc, dw_ih, dw_hh, db


# --------------------------------------------------------------------------- the lstm family's fast paths

def peephole_weights(cell) -> Tensor:
    """The peephole weights of gates i, f, o, zeros for a gate without one: (3, H) in the diag form,
    (3H, H) in the full form (cells.py stores only the gates listed, in the order f, i, o)."""
    H = cell.hidden_size
    shape = (H,) if cell.form == "diag" else (H, H)
    blocks = []
    for gate in "ifo":
        if cell.weight_ch is not None and gate in cell.peepholes:
            k = cell.peepholes.index(gate)
            blocks.append(cell.weight_ch[k * H:(k + 1) * H])
        else:
            blocks.append(cell.weight_hh.new_zeros(shape))
    return torch.stack(blocks) if cell.form == "diag" else torch.cat(blocks)


def _lstm(cell, x, state):
    hs, c = _LSTM.apply(x, state[0], state[1], cell.weight_ih, cell.weight_hh, cell.input_bias())
    return hs, (hs[-1], c)


def _peephole(cell, x, state):
    hs, c = _PeepholeLSTM.apply(x, state[0], state[1], cell.weight_ih, cell.weight_hh, cell.input_bias(),
                                peephole_weights(cell), cell.form == "full")
    return hs, (hs[-1], c)


def _coupled(cell, x, state):
    hs, c = _CoupledLSTM.apply(x, state[0], state[1], cell.weight_ih, cell.weight_hh, cell.input_bias())
    return hs, (hs[-1], c)

LSTM = torch_loop(_lstm)
PEEPHOLE = torch_loop(_peephole)
COUPLED = torch_loop(_coupled)

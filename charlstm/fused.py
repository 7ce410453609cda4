"""The custom cells over a whole window as one torch.autograd.Function each (the torch loops).

Each Function hoists the input projection out of the time loop, runs the recurrent product and
the gate pointwise in place step by step, and in backward computes every weight gradient as one
matrix product over all T*B rows. They compute exactly the equations of cells.py; how and why
is in docs/performance.md. The cell registry (registry.py) names, per cell, the fast paths that
may run it: a :class:`FastPath` here (torch loops) or in fused_native.py (time loops in C).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
        n_max = min(CHUNK, T)
        K_buf = gates.new_empty(n_max, B, 4, H)             # dpre_{i,f,g} = dc * K, dpre_o = dh * K_o
        od_buf = gates.new_empty(n_max, B, H)               # o (1 - tanh(c)^2)
        tmp_buf = gates.new_empty(n_max, B, H)
        dc = _zeros_if_none(dc_last, cs[0]).clone()         # carries f_{t+1} * dc_{t+1}
        dh = DH[T - 1]
        bufs = (torch.empty_like(dc), torch.empty_like(dc))
        for start, end in _chunks(T):
            n = end - start
            i, f, g, o = gates4[start:end].unbind(2)        # each (n, B, H)
            K, od, tmp, tc = K_buf[:n], od_buf[:n], tmp_buf[:n], tcs[start:end]
            torch.mul(torch.addcmul(i, i, i, value=-1, out=tmp), g, out=K[:, :, 0])             # g i (1 - i)
            torch.mul(torch.addcmul(f, f, f, value=-1, out=tmp), cs[start:end], out=K[:, :, 1])  # c_prev f (1 - f)
            torch.addcmul(i, torch.mul(i, g, out=tmp), g, value=-1, out=K[:, :, 2])            # i (1 - g^2)
            torch.mul(torch.addcmul(o, o, o, value=-1, out=tmp), tc, out=K[:, :, 3])            # tanh(c) o (1 - o)
            torch.addcmul(o, torch.mul(o, tc, out=tmp), tc, value=-1, out=od)
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
        n_max = min(CHUNK, T)
        K_buf = gates.new_empty(n_max, B, 3, H)             # dpre_{i,f,g} = dc * K
        Ko_buf = gates.new_empty(n_max, B, H)               # dpre_o = dh * K_o
        od_buf = gates.new_empty(n_max, B, H)
        tmp_buf = gates.new_empty(n_max, B, H)
        dc = _zeros_if_none(dc_last, cs[0]).clone()
        dh = DH[T - 1]
        bufs = (torch.empty_like(dc), torch.empty_like(dc))
        for start, end in _chunks(T):
            n = end - start
            i, f, g, o = gates4[start:end].unbind(2)
            K, Ko, od, tmp, tc = K_buf[:n], Ko_buf[:n], od_buf[:n], tmp_buf[:n], tcs[start:end]
            torch.mul(torch.addcmul(i, i, i, value=-1, out=tmp), g, out=K[:, :, 0])
            torch.mul(torch.addcmul(f, f, f, value=-1, out=tmp), cs[start:end], out=K[:, :, 1])
            torch.addcmul(i, torch.mul(i, g, out=tmp), g, value=-1, out=K[:, :, 2])
            torch.mul(torch.addcmul(o, o, o, value=-1, out=tmp), tc, out=Ko)
            torch.addcmul(o, torch.mul(o, tc, out=tmp), tc, value=-1, out=od)
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
        flat = dpre.view(T * B, H4)
        dw_hh = flat.t().mm(_prev(hs).reshape(T * B, H))
        c_prev, c_new = _prev(cs), cs[1:]
        if full:
            dp = torch.cat([flat[:, :2 * H].t().mm(c_prev.reshape(T * B, H)),
                            flat[:, 3 * H:].t().mm(c_new.reshape(T * B, H))])
        else:
            dp = torch.stack([
                (dpre4[:, :, 0] * c_prev).sum((0, 1)),
                (dpre4[:, :, 1] * c_prev).sum((0, 1)),
                (dpre4[:, :, 3] * c_new).sum((0, 1)),
            ])
        dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, ctx.has_bias)
        return dx, dh, dc, dw_ih, dw_hh, db, dp, None


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
        n_max = min(CHUNK, T)
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


# --------------------------------------------------------------------------- gru (cudnn form)

class _GRU(torch.autograd.Function):
    """gru in nn.GRU's form over a window. Inputs: x (T, B, E); h0 (B, H); w_ih (3H, E),
    w_hh (3H, H), b_ih and b_hh (3H,) or None, gate order r, z, n. Output: h (T, B, H)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        xp = _project(x, w_ih, b_ih)                        # (T, B, 3H) W_ih x + b_ih
        hp = torch.empty_like(xp)                           # (T, B, 3H) W_hh h + b_hh
        rz = x.new_empty(T, B, 2 * H)                       # activated r, z
        n = x.new_empty(T, B, H)
        hs = x.new_empty(T + 1, B, H)
        hs[0] = h0
        w_t = w_hh.t()
        HP, RZ, N, Hs = (a.unbind(0) for a in (hp, rz, n, hs))
        Xrz, Xn = xp[:, :, :2 * H].unbind(0), xp[:, :, 2 * H:].unbind(0)
        HPrz, HPn = hp[:, :, :2 * H].unbind(0), hp[:, :, 2 * H:].unbind(0)
        R, Z = rz[:, :, :H].unbind(0), rz[:, :, H:].unbind(0)
        for t in range(T):
            if b_hh is None:
                torch.mm(Hs[t], w_t, out=HP[t])
            else:
                torch.addmm(b_hh, Hs[t], w_t, out=HP[t])    # (B, 3H)
            torch.add(Xrz[t], HPrz[t], out=RZ[t]).sigmoid_()
            torch.addcmul(Xn[t], R[t], HPn[t], out=N[t]).tanh_()
            torch.lerp(N[t], Hs[t], Z[t], out=Hs[t + 1])    # (1 - z) * n + z * h_prev
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, hp, rz, n, hs, w_ih, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        x, hp, rz, n, hs, w_ih, w_hh = ctx.saved_tensors
        T, B, H3 = hp.shape
        H = H3 // 3
        dx = torch.empty_like(hp)                           # (T, B, 3H) gradient of W_ih x + b_ih
        dhp = torch.empty_like(hp)                          # (T, B, 3H) gradient of W_hh h + b_hh
        DX, DHP = dx.view(T, B, 3, H).unbind(0), dhp.view(T, B, 3, H).unbind(0)
        DHPf, DH, Zt = dhp.unbind(0), dhs.unbind(0), rz[:, :, H:].unbind(0)
        n_max = min(CHUNK, T)
        A_buf = hp.new_empty(n_max, B, 3, H)                # dx = dh * A
        Ah_buf = hp.new_empty(n_max, B, 3, H)               # dhp = dh * A_h
        tmp_buf, tmp2_buf = hp.new_empty(n_max, B, H), hp.new_empty(n_max, B, H)
        dh = DH[T - 1]
        bufs = (torch.empty_like(hs[0]), torch.empty_like(hs[0]))
        for start, end in _chunks(T):
            m = end - start
            r, z, nn_ = rz[start:end, :, :H], rz[start:end, :, H:], n[start:end]
            hn, h_prev = hp[start:end, :, 2 * H:], hs[start:end]
            A, Ah, tmp, tmp2 = A_buf[:m], Ah_buf[:m], tmp_buf[:m], tmp2_buf[:m]
            torch.mul(nn_, nn_, out=tmp2).neg_().add_(1)
            torch.mul(torch.sub(1, z, out=tmp), tmp2, out=A[:, :, 2])          # (1 - z)(1 - n^2)
            torch.addcmul(r, r, r, value=-1, out=tmp).mul_(hn)
            torch.mul(A[:, :, 2], tmp, out=A[:, :, 0])                         # a_n hn r (1 - r)
            torch.sub(h_prev, nn_, out=tmp)
            torch.mul(torch.addcmul(z, z, z, value=-1, out=tmp2), tmp, out=A[:, :, 1])   # (h_prev - n) z (1 - z)
            Ah[:, :, :2] = A[:, :, :2]
            torch.mul(A[:, :, 2], r, out=Ah[:, :, 2])                          # dhn = dpre_n * r
            At, AHt = A.unbind(0), Ah.unbind(0)
            for t in range(end - 1, start - 1, -1):
                j = t - start
                d = dh.unsqueeze(1)
                torch.mul(At[j], d, out=DX[t])
                torch.mul(AHt[j], d, out=DHP[t])
                nxt = torch.addmm(DH[t - 1], DHPf[t], w_hh, out=bufs[t & 1]) if t else DHPf[t].mm(w_hh)
                dh = nxt.addcmul_(dh, Zt[t])                 # + dh * z: h_prev's direct path
        dw_hh = dhp.view(T * B, H3).t().mm(_prev(hs).reshape(T * B, H))
        db_hh = dhp.sum((0, 1)) if ctx.has_bias[1] else None
        dxin, dw_ih, db_ih = _input_grads(ctx, dx, x, w_ih, ctx.has_bias[0])
        return dxin, dh, dw_ih, dw_hh, db_ih, db_hh


# --------------------------------------------------------------------------- gru (cho form)

class _ChoGRU(torch.autograd.Function):
    """gru in Cho et al.'s form over a window: n = tanh(W_in x + W_hn (r * h) + b_n). Inputs:
    x (T, B, E); h0 (B, H); w_ih (3H, E), w_hh (3H, H), b (3H,) or None, gate order r, z, n."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        rz = _project(x, w_ih[:2 * H], None if b is None else b[:2 * H])    # (T, B, 2H)
        n = _project(x, w_ih[2 * H:], None if b is None else b[2 * H:])     # (T, B, H)
        rh = x.new_empty(T, B, H)                           # r * h_prev
        hs = x.new_empty(T + 1, B, H)
        hs[0] = h0
        w_rz_t, w_n_t = w_hh[:2 * H].t(), w_hh[2 * H:].t()
        RZ, N, RH, Hs = (a.unbind(0) for a in (rz, n, rh, hs))
        R, Z = rz[:, :, :H].unbind(0), rz[:, :, H:].unbind(0)
        for t in range(T):
            RZ[t].addmm_(Hs[t], w_rz_t).sigmoid_()
            torch.mul(R[t], Hs[t], out=RH[t])
            N[t].addmm_(RH[t], w_n_t).tanh_()
            torch.lerp(Hs[t], N[t], Z[t], out=Hs[t + 1])    # (1 - z) * h_prev + z * n
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, rz, n, rh, hs, w_ih, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        x, rz, n, rh, hs, w_ih, w_hh = ctx.saved_tensors
        T, B, H2 = rz.shape
        H = H2 // 2
        w_rz, w_n = w_hh[:2 * H], w_hh[2 * H:]
        dpre = x.new_empty(T, B, 3 * H)                     # gradient of the pre-activations r, z, n
        DR, DZ, DN = (dpre[:, :, k * H:(k + 1) * H].unbind(0) for k in range(3))
        DRZ, DH = dpre[:, :, :2 * H].unbind(0), dhs.unbind(0)
        n_max = min(CHUNK, T)
        fac_buf = x.new_empty(4, n_max, B, H)               # a_n, a_z, a_r, 1 - z
        tmp_buf = x.new_empty(n_max, B, H)
        drh_buf = torch.empty_like(hs[0])
        dh = DH[T - 1]
        bufs = (torch.empty_like(hs[0]), torch.empty_like(hs[0]))
        for start, end in _chunks(T):
            m = end - start
            r, z, nn_, h_prev = rz[start:end, :, :H], rz[start:end, :, H:], n[start:end], hs[start:end]
            a_n, a_z, a_r, one_z = fac_buf[:, :m]
            tmp = tmp_buf[:m]
            torch.mul(nn_, nn_, out=tmp).neg_().add_(1)
            torch.mul(z, tmp, out=a_n)                                          # dpre_n = dh * z (1 - n^2)
            torch.mul(torch.addcmul(z, z, z, value=-1, out=tmp), torch.sub(nn_, h_prev, out=a_z), out=a_z)
            torch.mul(torch.addcmul(r, r, r, value=-1, out=tmp), h_prev, out=a_r)   # dpre_r = d(rh) h r (1 - r)
            torch.sub(1, z, out=one_z)
            AN, AZ, AR, OZ, R = a_n.unbind(0), a_z.unbind(0), a_r.unbind(0), one_z.unbind(0), r.unbind(0)
            for t in range(end - 1, start - 1, -1):
                j = t - start
                dpn = torch.mul(dh, AN[j], out=DN[t])
                torch.mul(dh, AZ[j], out=DZ[t])
                drh = torch.mm(dpn, w_n, out=drh_buf)        # (B, H) gradient of r * h_prev
                torch.mul(drh, AR[j], out=DR[t])
                nxt = torch.addmm(DH[t - 1], DRZ[t], w_rz, out=bufs[t & 1]) if t else DRZ[t].mm(w_rz)
                dh = nxt.addcmul_(dh, OZ[j]).addcmul_(drh, R[j])
        flat = dpre.view(T * B, 3 * H)
        dw_hh = torch.cat([
            flat[:, :2 * H].t().mm(_prev(hs).reshape(T * B, H)),
            flat[:, 2 * H:].t().mm(rh.view(T * B, H)),
        ])
        dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, ctx.has_bias)
        return dx, dh, dw_ih, dw_hh, db


# --------------------------------------------------------------------------- rnn

class _RNN(torch.autograd.Function):
    """rnn (tanh) over a window. Inputs: x (T, B, E); h0 (B, H); w_ih (H, E), w_hh (H, H),
    b (H,) (b_ih + b_hh) or None. Output: h (T, B, H)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        hs = x.new_empty(T + 1, B, H)
        hs[0] = h0
        hs[1:] = _project(x, w_ih, b)                       # the input half, then the loop adds W_hh h
        w_t = w_hh.t()
        Hs = hs.unbind(0)
        for t in range(T):
            Hs[t + 1].addmm_(Hs[t], w_t).tanh_()
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, hs, w_ih, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        x, hs, w_ih, w_hh = ctx.saved_tensors
        T1, B, H = hs.shape
        T = T1 - 1
        dpre = torch.empty(T, B, H, dtype=hs.dtype, device=hs.device)
        DP, DH = dpre.unbind(0), dhs.unbind(0)
        a_buf = hs.new_empty(min(CHUNK, T), B, H)
        dh = DH[T - 1]
        bufs = (torch.empty_like(hs[0]), torch.empty_like(hs[0]))
        for start, end in _chunks(T):
            h = hs[start + 1:end + 1]
            a = torch.mul(h, h, out=a_buf[:end - start]).neg_().add_(1)     # 1 - h^2
            A = a.unbind(0)
            for t in range(end - 1, start - 1, -1):
                torch.mul(dh, A[t - start], out=DP[t])
                dh = torch.addmm(DH[t - 1], DP[t], w_hh, out=bufs[t & 1]) if t else DP[t].mm(w_hh)
        dw_hh = dpre.view(T * B, H).t().mm(_prev(hs).reshape(T * B, H))
        dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, ctx.has_bias)
        return dx, dh, dw_ih, dw_hh, db


# --------------------------------------------------------------------------- fast paths

@dataclass(frozen=True)
class FastPath:
    """One way to run a layer's whole window faster than step by step (see layers.Recurrent)."""

    name: str                                                        # 'torch loop', 'native loop', ...
    run: Callable[[Cell, Tensor, LayerState], tuple[Tensor, LayerState]]   # x (T, B, E) -> (T, B, H), state
    unavailable: Callable[[Cell, Tensor], str | None]              # why it cannot run this input (None: it can)


def autocast_on(x: Tensor) -> bool:
    """Whether mixed precision (autocast) is active for x's device; the step-by-step layer handles it."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if x.device.type == "cpu" else torch.is_autocast_enabled()


def _torch_loop_unavailable(cell: Cell, x: Tensor) -> str | None:
    return "autocast is on (the step-by-step layer runs mixed precision)" if autocast_on(x) else None


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


def _gru(cell, x, state):
    hs = _GRU.apply(x, state[0], cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    return hs, (hs[-1],)


def _cho_gru(cell, x, state):
    hs = _ChoGRU.apply(x, state[0], cell.weight_ih, cell.weight_hh, cell.bias)
    return hs, (hs[-1],)


def _rnn(cell, x, state):
    hs = _RNN.apply(x, state[0], cell.weight_ih, cell.weight_hh, cell.input_bias())
    return hs, (hs[-1],)


def torch_loop(run) -> FastPath:
    return FastPath("torch loop", run, _torch_loop_unavailable)


LSTM = torch_loop(_lstm)
PEEPHOLE = torch_loop(_peephole)
COUPLED = torch_loop(_coupled)
GRU = torch_loop(_gru)
CHO_GRU = torch_loop(_cho_gru)
RNN = torch_loop(_rnn)



# --------------------------------------------------------------------------- mogrifier

def _mogrifier_values(x: Tensor, hs: Tensor, xh: Tensor, x_mid: list, h_mid: list, r: int) -> tuple[list, list]:
    """The x values [x, x^(1), x^(3), ...] and h values [h_prev, h^(2), h^(4), ...] of r rounds, each
    (T, B, .): the input, the hidden states before each step (hs[:-1]), the intermediate buffers,
    and the last x and h of each step as views into xh = [x↑, h↑] (T, B, E+H) where a round makes them."""
    E = x.shape[-1]
    xv = [x, *x_mid] + ([xh[:, :, :E]] if r >= 1 else [])
    hv = [hs[:-1], *h_mid] + ([xh[:, :, E:]] if r >= 2 else [])
    return xv, hv


def _mogrifier_rounds(r: int, xv: list, hv: list) -> list[tuple]:
    """Round i = 1 .. r as (odd, product input, scaled value, result), each a (T, B, .) tensor from
    the lists of x values xv = [x, x^(1), x^(3), ...] and h values hv = [h_prev, h^(2), h^(4), ...]."""
    out = []
    for i in range(1, r + 1):
        if i % 2:
            j = (i + 1) // 2
            out.append((True, hv[j - 1], xv[j - 1], xv[j]))        # x^(i) = 2σ(Q h^(i-1)) * x^(i-2)
        else:
            j = i // 2
            out.append((False, xv[j], hv[j - 1], hv[j]))           # h^(i) = 2σ(R x^(i-1)) * h^(i-2)
    return out


class _Mogrifier(torch.autograd.Function):
    """mogrifier lstm over a window. Inputs: x (T, B, E); h0, c0 (B, H); w_ih (4H, E), w_hh (4H, H),
    b (4H,) (b_ih + b_hh) or None, gate order i, f, g, o; rank (0: full); then the rounds' matrices
    in round order: Q^(i) (E, H) / R^(i) (H, E), or at rank k their factors (a, b) per round.
    Outputs: h (T, B, H), c_T (B, H).

    Each step runs the rounds, then ONE product [x↑, h↑] @ [W_ih, W_hh]^T for every gate; backward
    computes [dW_ih, dW_hh] and each round's matrix gradient as one product over all T*B rows."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b, rank, *mats):
        T, B, E = x.shape
        H = w_hh.shape[1]
        r = len(mats) // (2 if rank else 1)
        xh = x.new_empty(T, B, E + H)                       # [x↑, h↑] of every step
        hs = x.new_empty(T + 1, B, H)                       # h_{-1} .. h_{T-1}
        cs = x.new_empty(T + 1, B, H)
        tcs = x.new_empty(T, B, H)                          # tanh(c_t)
        gates = x.new_empty(T, B, 4 * H)                    # i, f, g, o activated
        hs[0], cs[0] = h0, c0
        x_mid = [x.new_empty(T, B, E) for _ in range((r + 1) // 2 - 1)]     # x^(1), x^(3), ... but the last
        h_mid = [x.new_empty(T, B, H) for _ in range(r // 2 - 1)]           # h^(2), h^(4), ... but the last
        xv, hv = _mogrifier_values(x, hs, xh, x_mid, h_mid, r)
        if r == 0:
            xh[:, :, :E] = x
        rounds = _mogrifier_rounds(r, xv, hv)
        sig2 = [x.new_empty(res.shape) for _, _, _, res in rounds]        # 2σ(Q h) or 2σ(R x)
        low = [x.new_empty(T, B, rank) for _ in rounds] if rank else []   # v @ (factor b)^T
        steps = _Mogrifier._steps(rounds, sig2, low, mats, rank)
        w_t = _doubled_rows(torch.cat([w_ih, w_hh], 1), H, 2).t()          # (E + H, 4H)
        b2 = _doubled_rows(b, H, 2)
        G, Hs, C, TC, XH = (a.unbind(0) for a in (gates, hs, cs, tcs, xh))
        XHh = xh[:, :, E:].unbind(0)
        Ig, Fg, Gg, Og = (gates[:, :, k * H:(k + 1) * H].unbind(0) for k in range(4))
        for t in range(T):
            for _odd, src, prev, res, s, u, m in steps:
                if rank:
                    torch.mm(torch.mm(src[t], m[1], out=u[t]), m[0], out=s[t])
                else:
                    torch.mm(src[t], m, out=s[t])
                s[t].sigmoid_().mul_(2)
                torch.mul(s[t], prev[t], out=res[t])
            if r < 2:                                       # h↑ is h_{t-1}
                XHh[t].copy_(Hs[t])
            (torch.mm(XH[t], w_t, out=G[t]) if b2 is None else torch.addmm(b2, XH[t], w_t, out=G[t])).sigmoid_()
            Gg[t].mul_(2).sub_(1)                           # g = tanh(p)
            c = torch.mul(Fg[t], C[t], out=C[t + 1])
            c.addcmul_(Ig[t], Gg[t])
            torch.mul(Og[t], torch.tanh(c, out=TC[t]), out=Hs[t + 1])
        ctx.has_bias, ctx.rank, ctx.r, ctx.n_mid = b is not None, rank, r, (len(x_mid), len(h_mid))
        ctx.save_for_backward(x, xh, hs, cs, tcs, gates, w_ih, w_hh, *x_mid, *h_mid, *sig2, *low, *mats)
        return hs[1:], cs[T]

    @staticmethod
    def _steps(rounds, sig2, low, mats, rank):
        """Per round: (odd, and the unbound sequences src, prev, result, 2σ, low-rank product, and
        the round's transposed matrix, or its transposed factors (a^T, b^T))."""
        steps = []
        for k, (odd, src, prev, res) in enumerate(rounds):
            m = (mats[2 * k].t(), mats[2 * k + 1].t()) if rank else mats[k].t()
            u = low[k].unbind(0) if rank else None
            steps.append((odd, src.unbind(0), prev.unbind(0), res.unbind(0), sig2[k].unbind(0), u, m))
        return steps

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        x, xh, hs, cs, tcs, gates, w_ih, w_hh, *rest = ctx.saved_tensors
        r, rank = ctx.r, ctx.rank
        T, B, E = x.shape
        H = w_hh.shape[1]
        n_x, n_h = ctx.n_mid
        n_low = r if rank else 0
        x_mid, h_mid, rest = rest[:n_x], rest[n_x:n_x + n_h], rest[n_x + n_h:]
        sig2, low, mats = rest[:r], rest[r:r + n_low], rest[r + n_low:]
        xv, hv = _mogrifier_values(x, hs, xh, x_mid, h_mid, r)
        rounds = _mogrifier_rounds(r, xv, hv)
        da = [_Mogrifier._round_factor(s2, prev) for s2, (_, _, prev, _) in zip(sig2, rounds)]   # then * d result
        dlow = [torch.empty_like(u) for u in low]
        back = [(odd, da[k].unbind(0), sig2[k].unbind(0), dlow[k].unbind(0) if rank else None,
                 (mats[2 * k], mats[2 * k + 1]) if rank else mats[k])
                for k, (odd, _, _, _) in reversed(list(enumerate(rounds)))]
        dpre, dxh, dh, dc = _Mogrifier._backward_loop(dhs, dc_last, gates, cs, tcs, torch.cat([w_ih, w_hh], 1),
                                                      back, rank)
        dw = dpre.view(T * B, 4 * H).t().mm(xh.view(T * B, E + H))         # [dW_ih, dW_hh], one GEMM
        db = dpre.sum((0, 1)) if ctx.has_bias else None
        dmats = []
        for k, (_, src, _, _) in enumerate(rounds):                         # one product per matrix
            flat_da, flat_src = da[k].view(T * B, -1).t(), src.reshape(T * B, src.shape[-1])
            if rank:
                dmats += [flat_da.mm(low[k].view(T * B, rank)), dlow[k].view(T * B, rank).t().mm(flat_src)]
            else:
                dmats.append(flat_da.mm(flat_src))
        dx = dxh[:, :, :E] if ctx.needs_input_grad[0] else None
        return (dx, dh, dc, dw[:, :E], dw[:, E:], db, None, *dmats)

    @staticmethod
    def _round_factor(s2: Tensor, prev: Tensor) -> Tensor:
        """d result / d pre-activation of one round for every step: prev * 2σ(1 - σ), with s2 = 2σ."""
        out = torch.mul(s2, s2)
        return out.mul_(-0.5).add_(s2).mul_(prev)

    @staticmethod
    def _backward_loop(dhs, dc_last, gates, cs, tcs, w_cat, back, rank):
        """The time loop of backward: the gates' pre-activation gradient dpre (T, B, 4H), and
        d[x↑, h↑] = dpre @ [W_ih, W_hh] taken back through the rounds (``back``, last round first)
        in place, so that dxh (T, B, E+H) ends with dx in its first E columns; each round's
        pre-activation gradient is left in its factor buffer (and low-rank product's in its own).
        Returns dpre, dxh, dh0, dc0."""
        T, B, H4 = gates.shape
        H = H4 // 4
        E = w_cat.shape[1] - H
        dhs = _zeros_if_none(dhs, tcs)
        gates4 = gates.view(T, B, 4, H)
        dpre = torch.empty_like(gates)                      # (T, B, 4H)
        dpre4 = dpre.view(T, B, 4, H)
        dxh = gates.new_empty(T, B, E + H)                  # (T, B, E+H)
        DP, DP4, DPo, DH = dpre.unbind(0), dpre4.unbind(0), dpre4[:, :, 3].unbind(0), dhs.unbind(0)
        Ft, DXH, DX, DHM = gates4[:, :, 1].unbind(0), dxh.unbind(0), dxh[:, :, :E].unbind(0), dxh[:, :, E:].unbind(0)
        n_max = min(CHUNK, T)
        K_buf = gates.new_empty(n_max, B, 4, H)             # dpre_{i,f,g} = dc * K, dpre_o = dh * K_o
        od_buf = gates.new_empty(n_max, B, H)               # o (1 - tanh(c)^2)
        tmp_buf = gates.new_empty(n_max, B, H)
        dc = _zeros_if_none(dc_last, cs[0]).clone()         # carries f_{t+1} * dc_{t+1}
        dh = DH[T - 1]
        for start, end in _chunks(T):
            i, f, g, o = gates4[start:end].unbind(2)        # each (n, B, H)
            n = end - start
            K, od, tmp, tc = K_buf[:n], od_buf[:n], tmp_buf[:n], tcs[start:end]
            torch.mul(torch.addcmul(i, i, i, value=-1, out=tmp), g, out=K[:, :, 0])             # g i (1 - i)
            torch.mul(torch.addcmul(f, f, f, value=-1, out=tmp), cs[start:end], out=K[:, :, 1])  # c_prev f (1 - f)
            torch.addcmul(i, torch.mul(i, g, out=tmp), g, value=-1, out=K[:, :, 2])            # i (1 - g^2)
            torch.mul(torch.addcmul(o, o, o, value=-1, out=tmp), tc, out=K[:, :, 3])            # tanh(c) o (1 - o)
            torch.addcmul(o, torch.mul(o, tc, out=tmp), tc, value=-1, out=od)
            Kt, Ko, OD = K.unbind(0), K[:, :, 3].unbind(0), od.unbind(0)
            for t in range(end - 1, start - 1, -1):
                j = t - start
                dc.addcmul_(dh, OD[j])                      # dc_t
                torch.mul(Kt[j], dc.unsqueeze(1), out=DP4[t])
                torch.mul(Ko[j], dh, out=DPo[t])
                torch.mm(DP[t], w_cat, out=DXH[t])          # d[x↑, h↑] (B, E+H)
                dx, dh = DX[t], DHM[t]
                for odd, DA, S2, DU, m in back:             # last round first
                    d_res, d_src = (dx, dh) if odd else (dh, dx)
                    a = DA[t].mul_(d_res)                   # the round's pre-activation gradient
                    d_res.mul_(S2[t])                       # to the value it scaled
                    if rank:
                        d_src.addmm_(torch.mm(a, m[0], out=DU[t]), m[1])
                    else:
                        d_src.addmm_(a, m)                  # to the product's input
                if t:
                    dh.add_(DH[t - 1])                      # dh_{t-1}: through the rounds and from above
                dc.mul_(Ft[t])
        return dpre, dxh, dh.contiguous(), dc


def _mogrifier(cell, x, state):
    if cell.rounds == 0:                                    # exactly the lstm: its loop, input projection hoisted
        return _lstm(cell, x, state)
    hs, c = _Mogrifier.apply(x, state[0], state[1], cell.weight_ih, cell.weight_hh, cell.input_bias(), cell.rank,
                             *cell.round_weights())
    return hs, (hs[-1], c)


MOGRIFIER = torch_loop(_mogrifier)

"""Fused recurrent layers: the custom cells run over a whole window with few kernel calls.

The basic layer of ``layers.py`` runs a cell step by step under autograd, so a
training step records and replays dozens of small operations per time step.
Here each cell has a ``torch.autograd.Function`` that runs the whole time loop
itself:

- forward: the input projection is one matrix multiply over all T*B inputs
  (done before the loop, by autograd); each step is one ``addmm`` for the
  recurrent product written into a preallocated gate buffer, then in-place
  activations and ``out=`` products. Only what backward needs is kept
  (activated gates, cell states, outputs).
- backward: the reverse loop computes the gate gradients of each step with a
  few fused products (their derivative factors are computed for all steps at
  once before the loop) and one ``addmm`` for the gradient flowing to
  ``h_{t-1}``; the recurrent weight gradient is then ONE matrix multiply over
  all T*B rows (dW_hh = dG^T @ H_prev) instead of T small ones.

Every function computes exactly the equations of ``cells.py`` (EQUATIONS.md);
``tests/test_fused.py`` checks outputs, final states and gradients against
the step-by-step cells and ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, and runs
``gradcheck`` in float64.

Entry points: :func:`supports` (is there a fused path for this cell) and
:func:`run_layer` (run one layer over a window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["supports", "run_layer", "FUSED_VARIANTS"]

# Cell class name -> the function below that runs it.
FUSED_VARIANTS = ("RNNCell", "LSTMCell", "PeepholeLSTMCell", "CoupledLSTMCell", "GRUCell", "ChoGRUCell")


def _prev(buf: Tensor) -> Tensor:
    """The (T, B, H) view of the values before each step in a (T+1, B, H) buffer."""
    return buf[:-1]


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


# --------------------------------------------------------------------------- lstm

class _LSTM(torch.autograd.Function):
    """lstm over a window. Inputs: xp (T, B, 4H) projected inputs with both biases,
    gate order i, f, g, o; h0, c0 (B, H); w_hh (4H, H). Outputs: h (T, B, H), c_T (B, H)."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh):
        T, B, H4 = xp.shape
        H = H4 // 4
        gates = torch.empty_like(xp)                        # (T, B, 4H) activated i, f, g, o
        hs = xp.new_empty(T + 1, B, H)                      # h_{-1} .. h_{T-1}
        cs = xp.new_empty(T + 1, B, H)                      # c_{-1} .. c_{T-1}
        tcs = xp.new_empty(T, B, H)                         # tanh(c_t)
        hs[0], cs[0] = h0, c0
        w_t = w_hh.t()
        G, X, Hs, C, TC = (a.unbind(0) for a in (gates, xp, hs, cs, tcs))
        I, Fg, Gg, O = (gates[:, :, k * H:(k + 1) * H].unbind(0) for k in range(4))
        IF = gates[:, :, :2 * H].unbind(0)
        for t in range(T):
            torch.addmm(X[t], Hs[t], w_t, out=G[t])         # (B, 4H) pre-activations
            IF[t].sigmoid_()
            Gg[t].tanh_()
            O[t].sigmoid_()
            c = torch.mul(Fg[t], C[t], out=C[t + 1])        # c = f * c_prev + i * g
            c.addcmul_(I[t], Gg[t])
            torch.mul(O[t], torch.tanh(c, out=TC[t]), out=Hs[t + 1])
        ctx.save_for_backward(gates, hs, cs, tcs, w_hh)
        return hs[1:], cs[T]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        gates, hs, cs, tcs, w_hh = ctx.saved_tensors
        T, B, H4 = gates.shape
        H = H4 // 4
        dhs = _zeros_if_none(dhs, tcs)
        i, f, g, o = gates.view(T, B, 4, H).unbind(2)       # each (T, B, H)
        # Derivative factors for every step at once: dpre_{i,f,g} = dc * K, dpre_o = dh * K_o.
        K = torch.empty_like(gates).view(T, B, 4, H)
        torch.mul(torch.addcmul(i, i, i, value=-1), g, out=K[:, :, 0])          # g i (1 - i)
        torch.mul(torch.addcmul(f, f, f, value=-1), _prev(cs), out=K[:, :, 1])  # c_prev f (1 - f)
        torch.addcmul(i, i * g, g, value=-1, out=K[:, :, 2])                    # i (1 - g^2)
        torch.mul(torch.addcmul(o, o, o, value=-1), tcs, out=K[:, :, 3])        # tanh(c) o (1 - o)
        o_dtanh = torch.addcmul(o, o * tcs, tcs, value=-1)                      # o (1 - tanh(c)^2)
        dpre = torch.empty_like(gates)                      # (T, B, 4H)
        dpre4 = dpre.view(T, B, 4, H)
        DP, DP4, Kt, DH, OD, Ft = (a.unbind(0) for a in (dpre, dpre4, K, dhs, o_dtanh, f))
        DPo, Ko = dpre4[:, :, 3].unbind(0), K[:, :, 3].unbind(0)
        dc = _zeros_if_none(dc_last, cs[0]).clone()         # carries f_{t+1} * dc_{t+1}
        dh = DH[T - 1]
        bufs = (torch.empty_like(dc), torch.empty_like(dc))
        for t in range(T - 1, -1, -1):
            dc.addcmul_(dh, OD[t])                          # dc_t
            torch.mul(Kt[t], dc.unsqueeze(1), out=DP4[t])   # i, f, g (and o, overwritten next)
            torch.mul(Ko[t], dh, out=DPo[t])
            dh = torch.addmm(DH[t - 1], DP[t], w_hh, out=bufs[t & 1]) if t else DP[t].mm(w_hh)
            dc.mul_(Ft[t])
        dw_hh = dpre.view(T * B, H4).t().mm(_prev(hs).reshape(T * B, H))   # one GEMM over all steps
        return dpre, dh, dc, dw_hh


# --------------------------------------------------------------------------- peephole

class _PeepholeLSTM(torch.autograd.Function):
    """peephole lstm over a window. Inputs: xp (T, B, 4H) with the bias, gate order
    i, f, g, o; h0, c0 (B, H); w_hh (4H, H); p the peephole weights of gates i, f, o:
    (3, H) per unit (diag form) or (3H, H) matrices (full form), zeros for gates
    without one; ``full`` says which. i and f see c_{t-1}, o sees the new c_t."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, p, full):
        T, B, H4 = xp.shape
        H = H4 // 4
        gates = torch.empty_like(xp)                        # (T, B, 4H) activated i, f, g, o
        hs = xp.new_empty(T + 1, B, H)
        cs = xp.new_empty(T + 1, B, H)
        tcs = xp.new_empty(T, B, H)
        hs[0], cs[0] = h0, c0
        w_t = w_hh.t()
        G, X, Hs, C, TC = (a.unbind(0) for a in (gates, xp, hs, cs, tcs))
        I, Fg, Gg, O = (gates[:, :, k * H:(k + 1) * H].unbind(0) for k in range(4))
        IF = gates[:, :, :2 * H].unbind(0)
        IF2 = gates[:, :, :2 * H].view(T, B, 2, H).unbind(0)
        if full:
            u_if_t, u_o_t = p[:2 * H].t(), p[2 * H:].t()    # (H, 2H), (H, H)
        else:
            p_if, p_o = p[:2], p[2]                         # (2, H), (H,)
        for t in range(T):
            torch.addmm(X[t], Hs[t], w_t, out=G[t])         # (B, 4H)
            if full:                                        # i, f see c_prev
                IF[t].addmm_(C[t], u_if_t)
            else:
                IF2[t].addcmul_(p_if, C[t].unsqueeze(1))
            IF[t].sigmoid_()
            Gg[t].tanh_()
            c = torch.mul(Fg[t], C[t], out=C[t + 1])
            c.addcmul_(I[t], Gg[t])
            if full:                                        # o sees the new c
                O[t].addmm_(c, u_o_t)
            else:
                O[t].addcmul_(p_o, c)
            O[t].sigmoid_()
            torch.mul(O[t], torch.tanh(c, out=TC[t]), out=Hs[t + 1])
        ctx.full = full
        ctx.save_for_backward(gates, hs, cs, tcs, w_hh, p)
        return hs[1:], cs[T]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        gates, hs, cs, tcs, w_hh, p = ctx.saved_tensors
        full = ctx.full
        T, B, H4 = gates.shape
        H = H4 // 4
        dhs = _zeros_if_none(dhs, tcs)
        i, f, g, o = gates.view(T, B, 4, H).unbind(2)
        c_prev, c_new = _prev(cs), cs[1:]
        K = torch.empty(T, B, 3, H, dtype=gates.dtype, device=gates.device)
        torch.mul(torch.addcmul(i, i, i, value=-1), g, out=K[:, :, 0])          # dpre_i = dc * K_i
        torch.mul(torch.addcmul(f, f, f, value=-1), c_prev, out=K[:, :, 1])     # dpre_f = dc * K_f
        torch.addcmul(i, i * g, g, value=-1, out=K[:, :, 2])                    # dpre_g = dc * K_g
        Ko = torch.mul(torch.addcmul(o, o, o, value=-1), tcs)                   # dpre_o = dh * K_o
        o_dtanh = torch.addcmul(o, o * tcs, tcs, value=-1)
        dpre = torch.empty_like(gates)
        dpre4 = dpre.view(T, B, 4, H)
        DP, DH, OD, KO, Ft = (a.unbind(0) for a in (dpre, dhs, o_dtanh, Ko, f))
        DPifg, Kt, DPo = dpre4[:, :, :3].unbind(0), K.unbind(0), dpre4[:, :, 3].unbind(0)
        DPif, DPif2 = dpre[:, :, :2 * H].unbind(0), dpre4[:, :, :2].unbind(0)
        if full:
            u_if, u_o = p[:2 * H], p[2 * H:]                # (2H, H), (H, H)
        else:
            p_if, p_o = p[:2].unsqueeze(0), p[2]            # (1, 2, H), (H,)
        dc = _zeros_if_none(dc_last, cs[0]).clone()
        dh = DH[T - 1]
        bufs = (torch.empty_like(dc), torch.empty_like(dc))
        for t in range(T - 1, -1, -1):
            dpo = torch.mul(KO[t], dh, out=DPo[t])
            dc.addcmul_(dh, OD[t])                          # dc_t: through h, from the next step,
            if full:                                        # and through o's peephole
                dc.addmm_(dpo, u_o)
            else:
                dc.addcmul_(dpo, p_o)
            torch.mul(Kt[t], dc.unsqueeze(1), out=DPifg[t])
            dh = torch.addmm(DH[t - 1], DP[t], w_hh, out=bufs[t & 1]) if t else DP[t].mm(w_hh)
            dc.mul_(Ft[t])                                  # to c_{t-1}: f dc + the peepholes of i, f
            if full:
                dc.addmm_(DPif[t], u_if)
            else:
                dc.add_((DPif2[t] * p_if).sum(1))
        dw_hh = dpre.view(T * B, H4).t().mm(_prev(hs).reshape(T * B, H))
        flat = dpre.view(T * B, H4)
        if full:
            dp = torch.cat([flat[:, :2 * H].t().mm(c_prev.reshape(T * B, H)),
                            flat[:, 3 * H:].t().mm(c_new.reshape(T * B, H))])
        else:
            dp = torch.stack([
                (dpre4[:, :, 0] * c_prev).sum((0, 1)),
                (dpre4[:, :, 1] * c_prev).sum((0, 1)),
                (dpre4[:, :, 3] * c_new).sum((0, 1)),
            ])
        return dpre, dh, dc, dw_hh, dp, None


# --------------------------------------------------------------------------- coupled

class _CoupledLSTM(torch.autograd.Function):
    """coupled (CIFG) over a window: c = f * c_prev + (1 - f) * g. Inputs: xp (T, B, 3H)
    with the bias, gate order f, g, o; h0, c0 (B, H); w_hh (3H, H)."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh):
        T, B, H3 = xp.shape
        H = H3 // 3
        gates = torch.empty_like(xp)                        # (T, B, 3H) activated f, g, o
        hs = xp.new_empty(T + 1, B, H)
        cs = xp.new_empty(T + 1, B, H)
        tcs = xp.new_empty(T, B, H)
        hs[0], cs[0] = h0, c0
        w_t = w_hh.t()
        G, X, Hs, C, TC = (a.unbind(0) for a in (gates, xp, hs, cs, tcs))
        Fg, Gg, O = (gates[:, :, k * H:(k + 1) * H].unbind(0) for k in range(3))
        for t in range(T):
            torch.addmm(X[t], Hs[t], w_t, out=G[t])
            Fg[t].sigmoid_()
            Gg[t].tanh_()
            O[t].sigmoid_()
            c = torch.sub(C[t], Gg[t], out=C[t + 1])        # c = g + f * (c_prev - g)
            c.mul_(Fg[t]).add_(Gg[t])
            torch.mul(O[t], torch.tanh(c, out=TC[t]), out=Hs[t + 1])
        ctx.save_for_backward(gates, hs, cs, tcs, w_hh)
        return hs[1:], cs[T]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        gates, hs, cs, tcs, w_hh = ctx.saved_tensors
        T, B, H3 = gates.shape
        H = H3 // 3
        dhs = _zeros_if_none(dhs, tcs)
        f, g, o = gates.view(T, B, 3, H).unbind(2)
        K = torch.empty_like(gates).view(T, B, 3, H)
        torch.mul(torch.addcmul(f, f, f, value=-1), _prev(cs) - g, out=K[:, :, 0])  # (c_prev - g) f (1 - f)
        torch.mul(1 - f, torch.addcmul(torch.ones_like(g), g, g, value=-1), out=K[:, :, 1])  # (1 - f)(1 - g^2)
        torch.mul(torch.addcmul(o, o, o, value=-1), tcs, out=K[:, :, 2])            # tanh(c) o (1 - o)
        o_dtanh = torch.addcmul(o, o * tcs, tcs, value=-1)
        dpre = torch.empty_like(gates)
        dpre3 = dpre.view(T, B, 3, H)
        DP, DP3, Kt, DH, OD, Ft = (a.unbind(0) for a in (dpre, dpre3, K, dhs, o_dtanh, f))
        DPo, Ko = dpre3[:, :, 2].unbind(0), K[:, :, 2].unbind(0)
        dc = _zeros_if_none(dc_last, cs[0]).clone()
        dh = DH[T - 1]
        bufs = (torch.empty_like(dc), torch.empty_like(dc))
        for t in range(T - 1, -1, -1):
            dc.addcmul_(dh, OD[t])
            torch.mul(Kt[t], dc.unsqueeze(1), out=DP3[t])   # f, g (and o, overwritten next)
            torch.mul(Ko[t], dh, out=DPo[t])
            dh = torch.addmm(DH[t - 1], DP[t], w_hh, out=bufs[t & 1]) if t else DP[t].mm(w_hh)
            dc.mul_(Ft[t])
        dw_hh = dpre.view(T * B, H3).t().mm(_prev(hs).reshape(T * B, H))
        return dpre, dh, dc, dw_hh


# --------------------------------------------------------------------------- gru (cudnn form)

class _GRU(torch.autograd.Function):
    """gru in nn.GRU's form over a window. Inputs: xp (T, B, 3H) = W_ih x + b_ih, gate
    order r, z, n; h0 (B, H); w_hh (3H, H); b_hh (3H,) or None. Output: h (T, B, H)."""

    @staticmethod
    def forward(ctx, xp, h0, w_hh, b_hh):
        T, B, H3 = xp.shape
        H = H3 // 3
        hp = torch.empty_like(xp)                           # (T, B, 3H) W_hh h + b_hh
        rz = xp.new_empty(T, B, 2 * H)                      # activated r, z
        n = xp.new_empty(T, B, H)
        hs = xp.new_empty(T + 1, B, H)
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
            h = torch.sub(Hs[t], N[t], out=Hs[t + 1])       # h = n + z * (h_prev - n)
            h.mul_(Z[t]).add_(N[t])
        ctx.has_bias = b_hh is not None
        ctx.save_for_backward(hp, rz, n, hs, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        hp, rz, n, hs, w_hh = ctx.saved_tensors
        T, B, H3 = hp.shape
        H = H3 // 3
        r, z = rz[:, :, :H], rz[:, :, H:]
        h_prev, hn = _prev(hs), hp[:, :, 2 * H:]
        # dx = dh * A (per gate block), d(W_hh h + b_hh) = dh * A_h.
        A = torch.empty(T, B, 3, H, dtype=hp.dtype, device=hp.device)
        a_n = torch.mul(1 - z, torch.addcmul(torch.ones_like(n), n, n, value=-1), out=A[:, :, 2])  # (1-z)(1-n^2)
        torch.mul(a_n * hn, torch.addcmul(r, r, r, value=-1), out=A[:, :, 0])      # a_n hn r (1 - r)
        torch.mul(h_prev - n, torch.addcmul(z, z, z, value=-1), out=A[:, :, 1])    # (h_prev - n) z (1 - z)
        A_h = A.clone()
        A_h[:, :, 2].mul_(r)                                 # dhn = dpre_n * r
        dx = torch.empty_like(hp)
        dhp = torch.empty_like(hp)
        DX, DHP = dx.view(T, B, 3, H).unbind(0), dhp.view(T, B, 3, H).unbind(0)
        DHPf, At, AHt, DH, Zt = dhp.unbind(0), A.unbind(0), A_h.unbind(0), dhs.unbind(0), z.unbind(0)
        dh = DH[T - 1]
        bufs = (torch.empty_like(hs[0]), torch.empty_like(hs[0]))
        for t in range(T - 1, -1, -1):
            d = dh.unsqueeze(1)
            torch.mul(At[t], d, out=DX[t])
            torch.mul(AHt[t], d, out=DHP[t])
            nxt = torch.addmm(DH[t - 1], DHPf[t], w_hh, out=bufs[t & 1]) if t else DHPf[t].mm(w_hh)
            dh = nxt.addcmul_(dh, Zt[t])                     # + dh * z: h_prev's direct path
        dw_hh = dhp.view(T * B, H3).t().mm(h_prev.reshape(T * B, H))
        db_hh = dhp.sum((0, 1)) if ctx.has_bias else None
        return dx, dh, dw_hh, db_hh


# --------------------------------------------------------------------------- gru (cho form)

class _ChoGRU(torch.autograd.Function):
    """gru in Cho et al.'s form over a window: n = tanh(x_n + W_hn (r * h)). Inputs:
    xp (T, B, 3H) with the bias, gate order r, z, n; h0 (B, H); w_hh (3H, H)."""

    @staticmethod
    def forward(ctx, xp, h0, w_hh):
        T, B, H3 = xp.shape
        H = H3 // 3
        rz = xp.new_empty(T, B, 2 * H)
        n = xp.new_empty(T, B, H)
        rh = xp.new_empty(T, B, H)                          # r * h_prev
        hs = xp.new_empty(T + 1, B, H)
        hs[0] = h0
        w_rz_t, w_n_t = w_hh[:2 * H].t(), w_hh[2 * H:].t()
        RZ, N, RH, Hs = (a.unbind(0) for a in (rz, n, rh, hs))
        Xrz, Xn = xp[:, :, :2 * H].unbind(0), xp[:, :, 2 * H:].unbind(0)
        R, Z = rz[:, :, :H].unbind(0), rz[:, :, H:].unbind(0)
        for t in range(T):
            torch.addmm(Xrz[t], Hs[t], w_rz_t, out=RZ[t]).sigmoid_()
            torch.mul(R[t], Hs[t], out=RH[t])
            torch.addmm(Xn[t], RH[t], w_n_t, out=N[t]).tanh_()
            h = torch.sub(N[t], Hs[t], out=Hs[t + 1])       # h = h_prev + z * (n - h_prev)
            h.mul_(Z[t]).add_(Hs[t])
        ctx.save_for_backward(rz, n, rh, hs, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        rz, n, rh, hs, w_hh = ctx.saved_tensors
        T, B, H2 = rz.shape
        H = H2 // 2
        r, z = rz[:, :, :H], rz[:, :, H:]
        h_prev = _prev(hs)
        w_rz, w_n = w_hh[:2 * H], w_hh[2 * H:]
        a_n = torch.mul(z, torch.addcmul(torch.ones_like(n), n, n, value=-1))   # dpre_n = dh * a_n
        a_z = torch.mul(n - h_prev, torch.addcmul(z, z, z, value=-1))           # dpre_z = dh * a_z
        a_r = torch.mul(h_prev, torch.addcmul(r, r, r, value=-1))               # dpre_r = d(rh) * a_r
        one_z = 1 - z
        dx = torch.empty(T, B, 3 * H, dtype=hs.dtype, device=hs.device)
        DR, DZ, DN = (dx[:, :, k * H:(k + 1) * H].unbind(0) for k in range(3))
        DRZ = dx[:, :, :2 * H].unbind(0)
        AN, AZ, AR, R, OZ, DH = (a.unbind(0) for a in (a_n, a_z, a_r, r, one_z, dhs))
        drh_buf = torch.empty_like(hs[0])
        dh = DH[T - 1]
        bufs = (torch.empty_like(hs[0]), torch.empty_like(hs[0]))
        for t in range(T - 1, -1, -1):
            dpn = torch.mul(dh, AN[t], out=DN[t])
            torch.mul(dh, AZ[t], out=DZ[t])
            drh = torch.mm(dpn, w_n, out=drh_buf)            # (B, H) gradient of r * h_prev
            torch.mul(drh, AR[t], out=DR[t])
            nxt = torch.addmm(DH[t - 1], DRZ[t], w_rz, out=bufs[t & 1]) if t else DRZ[t].mm(w_rz)
            dh = nxt.addcmul_(dh, OZ[t]).addcmul_(drh, R[t])
        flat = dx.view(T * B, 3 * H)
        dw_hh = torch.cat([
            flat[:, :2 * H].t().mm(h_prev.reshape(T * B, H)),
            flat[:, 2 * H:].t().mm(rh.view(T * B, H)),
        ])
        return dx, dh, dw_hh


# --------------------------------------------------------------------------- rnn

class _RNN(torch.autograd.Function):
    """rnn (tanh) over a window. Inputs: xp (T, B, H) with both biases; h0 (B, H); w_hh (H, H)."""

    @staticmethod
    def forward(ctx, xp, h0, w_hh):
        T, B, H = xp.shape
        hs = xp.new_empty(T + 1, B, H)
        hs[0] = h0
        w_t = w_hh.t()
        X, Hs = xp.unbind(0), hs.unbind(0)
        for t in range(T):
            torch.addmm(X[t], Hs[t], w_t, out=Hs[t + 1]).tanh_()
        ctx.save_for_backward(hs, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        hs, w_hh = ctx.saved_tensors
        T1, B, H = hs.shape
        T = T1 - 1
        h = hs[1:]
        a = torch.addcmul(torch.ones_like(h), h, h, value=-1)  # 1 - h^2
        dpre = torch.empty_like(h)
        DP, A, DH = dpre.unbind(0), a.unbind(0), dhs.unbind(0)
        dh = DH[T - 1]
        bufs = (torch.empty_like(hs[0]), torch.empty_like(hs[0]))
        for t in range(T - 1, -1, -1):
            torch.mul(dh, A[t], out=DP[t])
            dh = torch.addmm(DH[t - 1], DP[t], w_hh, out=bufs[t & 1]) if t else DP[t].mm(w_hh)
        dw_hh = dpre.view(T * B, H).t().mm(_prev(hs).reshape(T * B, H))
        return dpre, dh, dw_hh


# --------------------------------------------------------------------------- entry points

def supports(cell) -> bool:
    """Whether ``cell`` (a cells.py cell) has a fused path (every variant and form does)."""
    return type(cell).__name__ in FUSED_VARIANTS


def _peephole_weights(cell) -> Tensor:
    """The peephole weights of gates i, f, o, zeros for a gate without one: (3, H) in the
    diag form, (3H, H) in the full form (cells.py stores only the gates listed, in the order f, i, o)."""
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


def run_layer(cell, x: Tensor, state: tuple | None = None) -> tuple[Tensor, tuple]:
    """Run ``cell`` over x (T, B, input) from ``state`` ((h,) or (h, c), each (B, H); zeros
    when None) with the fused loop. Returns outputs (T, B, H) and the final state,
    exactly as the step-by-step layer does (``supports(cell)`` must be true)."""
    if state is None:
        state = cell.zero_state(x.shape[1], device=x.device, dtype=x.dtype)
    if x.shape[0] == 0:
        return x.new_empty(0, x.shape[1], cell.hidden_size), tuple(state)
    name = type(cell).__name__
    xp = cell.project(x)                                     # (T, B, G*H): one GEMM for all steps
    if name == "LSTMCell":
        hs, c = _LSTM.apply(xp, state[0], state[1], cell.weight_hh)
        return hs, (hs[-1], c)
    if name == "PeepholeLSTMCell":
        hs, c = _PeepholeLSTM.apply(xp, state[0], state[1], cell.weight_hh, _peephole_weights(cell),
                                    cell.form == "full")
        return hs, (hs[-1], c)
    if name == "CoupledLSTMCell":
        hs, c = _CoupledLSTM.apply(xp, state[0], state[1], cell.weight_hh)
        return hs, (hs[-1], c)
    if name == "GRUCell":
        hs = _GRU.apply(xp, state[0], cell.weight_hh, cell.bias_hh)
        return hs, (hs[-1],)
    if name == "ChoGRUCell":
        hs = _ChoGRU.apply(xp, state[0], cell.weight_hh)
        return hs, (hs[-1],)
    if name == "RNNCell":
        hs = _RNN.apply(xp, state[0], cell.weight_hh)
        return hs, (hs[-1],)
    raise ValueError(f"no fused path for {name}")

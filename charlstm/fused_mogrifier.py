"""The torch loop of the mogrifier lstm: its window as one torch.autograd.Function (docs/cells.md,
"Mogrifier"; fused.py holds the shared helpers and the plain lstm's loop, which runs 0 rounds)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused import _block_len, _chunks, _doubled_rows, _lstm, _lstm_factors, _zeros_if_none, torch_loop


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
        n_max = _block_len(T)
        K_buf = gates.new_empty(n_max, B, 4, H)             # dpre_{i,f,g} = dc * K, dpre_o = dh * K_o
        od_buf = gates.new_empty(n_max, B, H)               # o (1 - tanh(c)^2)
        tmp_buf = gates.new_empty(n_max, B, H)
        dc = _zeros_if_none(dc_last, cs[0]).clone()         # carries f_{t+1} * dc_{t+1}
        dh = DH[T - 1]
        for start, end in _chunks(T):
            n = end - start
            K, od = K_buf[:n], od_buf[:n]
            _lstm_factors(gates4[start:end], cs[start:end], tcs[start:end], K, K[:, :, 3], od, tmp_buf[:n])
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


# --------------------------------------------------------------------------- fast path

def _mogrifier(cell, x, state):
    if cell.rounds == 0:                                    # exactly the lstm: its loop, input projection hoisted
        return _lstm(cell, x, state)
    hs, c = _Mogrifier.apply(x, state[0], state[1], cell.weight_ih, cell.weight_hh, cell.input_bias(), cell.rank,
                             *cell.round_weights())
    return hs, (hs[-1], c)


MOGRIFIER = torch_loop(_mogrifier)

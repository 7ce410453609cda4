"""The torch loops of the gru (nn.GRU's form and Cho et al.'s) and the rnn: each over a whole window
as one torch.autograd.Function (see fused.py for the shared helpers, docs/performance.md for how)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .fused import _block_len, _chunks, _input_grads, _prev, _project, torch_loop

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
        n_max = _block_len(T)
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
        n_max = _block_len(T)
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
        a_buf = hs.new_empty(_block_len(T), B, H)
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

def _gru(cell, x, state):
    hs = _GRU.apply(x, state[0], cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    return hs, (hs[-1],)


def _cho_gru(cell, x, state):
    hs = _ChoGRU.apply(x, state[0], cell.weight_ih, cell.weight_hh, cell.bias)
    return hs, (hs[-1],)


def _rnn(cell, x, state):
    hs = _RNN.apply(x, state[0], cell.weight_ih, cell.weight_hh, cell.input_bias())
    return hs, (hs[-1],)

GRU = torch_loop(_gru)
CHO_GRU = torch_loop(_cho_gru)
RNN = torch_loop(_rnn)

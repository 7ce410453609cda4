"""autograd Functions that run one layer over a window with the Triton step kernels: the inputs,
outputs and equations of the torch loops' Functions (fused.py's ``_LSTM``, ``_PeepholeLSTM``,
``_CoupledLSTM``, fused_gru.py's ``_GRU``, ``_ChoGRU``, ``_RNN``). Launches and precision (products
and states in float32 for half inputs): docs/performance.md, "GPU: Triton kernels". Imports triton
(through ``kernels``)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import kernels as K

INTERPRETED = type(K.lstm_fwd).__name__ == "InterpretedFunction"   # TRITON_INTERPRET=1 at import
_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DTYPES = tuple(_TL)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products accumulate in and gates / cell states are kept in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Launch:
    """Grid and compile-time constants of one layer's step kernels (tile sizes, dtypes)."""

    def __init__(self, x: Tensor, B: int, H: int):
        half = x.dtype in (torch.bfloat16, torch.float16)
        self.B, self.H = B, H
        BB = min(64, max(16, triton.next_power_of_2(B)))
        BH = 32 if H >= 512 else 16
        BK = min(64 if half else 32, max(16, triton.next_power_of_2(H)))
        dot = tl.float32 if half and INTERPRETED else _TL[x.dtype]   # the interpreter's bf16 dot is wrong
        # IEEE products for float64, and for float32 unless torch allows TF32; Triton's default for half types
        ieee = x.dtype == torch.float64 or (x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
        self.meta = dict(BB=BB, BH=BH, BK=BK, ACC=_TL[acc_dtype(x.dtype)], DOT=dot,
                         PREC="ieee" if ieee else "tf32", num_warps=4)
        self.grid = (triton.cdiv(B, BB), triton.cdiv(H, BH))

    def __call__(self, kernel, *tensors, **const) -> None:
        kernel[self.grid](*tensors, self.B, self.H, **const, **self.meta)


@contextlib.contextmanager
def _plain(device_type: str):
    """No autocast inside: the dtypes here are chosen explicitly."""
    with torch.autocast(device_type, enabled=False):
        yield


def _project(x: Tensor, w_ih: Tensor, b: Tensor | None) -> Tensor:
    """The input half of every gate for all steps, one product, in the accumulation dtype: (T, B, G*H)."""
    xp = F.linear(x, w_ih).to(acc_dtype(x.dtype))
    return xp if b is None else xp.add_(b.to(xp.dtype))


def _hidden(x: Tensor, h0: Tensor, H: int) -> Tensor:
    """The hidden-state buffer (T + 1, B, H) in x's dtype with h0 in row 0."""
    hs = x.new_empty(x.shape[0] + 1, x.shape[1], H)
    hs[0] = h0
    return hs


def _wgrad(d: Tensor, a: Tensor) -> Tensor:
    """sum over steps and rows of d^T a: (T, B, N), (T, B, K) -> (N, K), one product in a's dtype."""
    return d.reshape(-1, d.shape[-1]).to(a.dtype).t().mm(a.reshape(-1, a.shape[-1]))


def _input_grads(ctx, dpre: Tensor, x: Tensor, w_ih: Tensor, b_dtype):
    """dx (T, B, E), dW_ih and the bias gradient from the pre-activations' gradient (T, B, G*H)."""
    dx = dpre.to(x.dtype).matmul(w_ih) if ctx.needs_input_grad[0] else None
    db = dpre.sum((0, 1)).to(b_dtype) if b_dtype is not None else None
    return dx, _wgrad(dpre, x).to(w_ih.dtype), db


def _grad_or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.contiguous()


def _c_buffer(x: Tensor, c0: Tensor) -> Tensor:
    """Cell states c_{-1} .. c_{T-1} (T + 1, B, H) in the accumulation dtype, c0 in row 0."""
    cs = torch.empty(x.shape[0] + 1, *c0.shape, dtype=acc_dtype(x.dtype), device=x.device)
    cs[0] = c0
    return cs


# --------------------------------------------------------------------------- lstm family

_KINDS = {"lstm": (K.LSTM, 4), "peephole": (K.PEEP, 4), "coupled": (K.COUPLED, 3)}


def _family_forward(ctx, kind, x, h0, c0, w_ih, w_hh, b, p):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    code, G = _KINDS[kind]
    w = w_hh.contiguous()
    pk = w if p is None else p.contiguous()                 # the kernel reads p only for the peephole
    xp = _project(x, w_ih, b)                               # (T, B, G*H)
    hs, cs = _hidden(x, h0, H), _c_buffer(x, c0)
    gates = torch.empty_like(xp)                            # (T, B, G*H) activated
    run = _Launch(x, B, H)
    XP, G_, HS, CS = xp.unbind(0), gates.unbind(0), hs.unbind(0), cs.unbind(0)
    for t in range(T):
        run(K.lstm_fwd, XP[t], HS[t], CS[t], w, pk, G_[t], CS[t + 1], HS[t + 1], G=G, KIND=code)
    ctx.kind, ctx.dtypes = kind, (h0.dtype, c0.dtype, None if b is None else b.dtype)
    ctx.save_for_backward(x, gates, hs, cs, w_ih, w, p)
    return hs[1:], cs[T]


def _family_backward(ctx, dhs, dc_last):
    x, gates, hs, cs, w_ih, w, p = ctx.saved_tensors
    T, B, GH = gates.shape
    H = w.shape[1]
    code, G = _KINDS[ctx.kind]
    dhs = _grad_or_zeros(dhs, hs[1:])
    dpre = torch.empty_like(gates)                          # (T, B, G*H)
    dc = _grad_or_zeros(dc_last, cs[0]).to(cs.dtype).clone()    # (B, H) carried gradient of c
    run = _Launch(x, B, H)
    pk = w if p is None else p
    DP, DH, G_, CS = dpre.unbind(0), dhs.unbind(0), gates.unbind(0), cs.unbind(0)
    for t in range(T - 1, -1, -1):
        run(K.lstm_bwd, DP[min(t + 1, T - 1)], w, pk, DH[t], G_[t], CS[t], CS[t + 1], DP[t], dc,
            G=G, KIND=code, FIRST=t == T - 1)
    h_dt, c_dt, b_dt = ctx.dtypes
    dh0 = dpre[0].mm(w.to(dpre.dtype)).to(h_dt)
    dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, b_dt)
    dp = None
    if p is not None:                                       # i and f saw c_{t-1}, o saw c_t
        d4 = dpre.view(T, B, 4, H)
        dp = torch.stack([(d4[:, :, 0] * cs[:-1]).sum((0, 1)), (d4[:, :, 1] * cs[:-1]).sum((0, 1)),
                          (d4[:, :, 3] * cs[1:]).sum((0, 1))]).to(p.dtype)
    return dx, dh0, dc.to(c_dt), dw_ih, _wgrad(dpre, hs[:-1]).to(w.dtype), db, dp


class TritonLSTM(torch.autograd.Function):
    """lstm over a window: fused._LSTM's contract. x (T, B, E); h0, c0 (B, H); w_ih (4H, E),
    w_hh (4H, H), b (4H,) or None, gates i, f, g, o. Returns h (T, B, H), c_T (B, H)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b):
        ctx.device_type = x.device.type
        with _plain(x.device.type):
            return _family_forward(ctx, "lstm", x, h0, c0, w_ih, w_hh, b, None)

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        with _plain(ctx.device_type):
            return _family_backward(ctx, dhs, dc_last)[:-1]


class TritonCoupledLSTM(torch.autograd.Function):
    """coupled (CIFG) over a window: fused._CoupledLSTM's contract, gates f, g, o (3H rows)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b):
        ctx.device_type = x.device.type
        with _plain(x.device.type):
            return _family_forward(ctx, "coupled", x, h0, c0, w_ih, w_hh, b, None)

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        with _plain(ctx.device_type):
            return _family_backward(ctx, dhs, dc_last)[:-1]


# --------------------------------------------------------------------------- peephole

def _peep_full_forward(ctx, x, h0, c0, w_ih, w_hh, b, u):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    w, u = w_hh.contiguous(), u.contiguous()
    xp = _project(x, w_ih, b)                               # (T, B, 4H)
    hs, cs = _hidden(x, h0, H), _c_buffer(x, c0)
    gates = torch.empty_like(xp)
    run = _Launch(x, B, H)
    XP, G_, HS, CS = xp.unbind(0), gates.unbind(0), hs.unbind(0), cs.unbind(0)
    for t in range(T):
        run(K.peep_full_fwd_a, XP[t], HS[t], CS[t], w, u, G_[t], CS[t + 1])
        run(K.peep_full_fwd_b, CS[t + 1], u, G_[t], HS[t + 1])
    ctx.dtypes = (h0.dtype, c0.dtype, None if b is None else b.dtype)
    ctx.save_for_backward(x, gates, hs, cs, w_ih, w, u)
    return hs[1:], cs[T]


def _peep_full_backward(ctx, dhs, dc_last):
    x, gates, hs, cs, w_ih, w, u = ctx.saved_tensors
    T, B, GH = gates.shape
    H = w.shape[1]
    dhs = _grad_or_zeros(dhs, hs[1:])
    dpre = torch.empty_like(gates)
    dc = _grad_or_zeros(dc_last, cs[0]).to(cs.dtype).clone()
    run = _Launch(x, B, H)
    DP, DH, G_, CS = dpre.unbind(0), dhs.unbind(0), gates.unbind(0), cs.unbind(0)
    for t in range(T - 1, -1, -1):
        nxt = min(t + 1, T - 1)
        run(K.peep_full_bwd_a, DP[nxt], G_[nxt], w, u, DH[t], G_[t], CS[t + 1], DP[t], dc, FIRST=t == T - 1)
        run(K.peep_full_bwd_b, u, G_[t], CS[t], DP[t], dc)
    h_dt, c_dt, b_dt = ctx.dtypes
    dh0 = dpre[0].mm(w.to(dpre.dtype)).to(h_dt)
    dc0 = (dc * gates[0, :, H:2 * H] + dpre[0, :, :2 * H].mm(u[:2 * H].to(dpre.dtype))).to(c_dt)
    dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, b_dt)
    du = torch.cat([_wgrad(dpre[:, :, :2 * H], cs[:-1]), _wgrad(dpre[:, :, 3 * H:], cs[1:])]).to(u.dtype)
    return dx, dh0, dc0, dw_ih, _wgrad(dpre, hs[:-1]).to(w.dtype), db, du, None


class TritonPeepholeLSTM(torch.autograd.Function):
    """peephole lstm over a window: fused._PeepholeLSTM's contract. x (T, B, E); h0, c0 (B, H);
    w_ih (4H, E), w_hh (4H, H), b (4H,) or None, gates i, f, g, o; p the peephole weights of
    i, f, o: (3, H) (diag form) or (3H, H) (full form), zeros for a gate without one; ``full``
    says which. Returns h (T, B, H), c_T (B, H)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b, p, full):
        ctx.device_type = x.device.type
        ctx.full = bool(full)
        with _plain(x.device.type):
            if full:
                return _peep_full_forward(ctx, x, h0, c0, w_ih, w_hh, b, p)
            return _family_forward(ctx, "peephole", x, h0, c0, w_ih, w_hh, b, p)

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        with _plain(ctx.device_type):
            if ctx.full:
                return _peep_full_backward(ctx, dhs, dc_last)
            return _family_backward(ctx, dhs, dc_last) + (None,)


# --------------------------------------------------------------------------- gru (nn.GRU's form)

class TritonGRU(torch.autograd.Function):
    """gru in nn.GRU's form over a window: fused_gru._GRU's contract. x (T, B, E); h0 (B, H);
    w_ih (3H, E), w_hh (3H, H), b_ih and b_hh (3H,) or None, gates r, z, n. Returns h (T, B, H)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh):
        ctx.device_type = x.device.type
        with _plain(x.device.type):
            T, B, _ = x.shape
            H = w_hh.shape[1]
            w = w_hh.contiguous()
            xp = _project(x, w_ih, b_ih)                    # (T, B, 3H) W_ih x + b_ih
            hs = _hidden(x, h0, H)
            gates = torch.empty_like(xp)                    # r, z, n
            hn = xp.new_empty(T, B, H)                      # W_hn h_{t-1} + b_hn
            run = _Launch(x, B, H)
            bk = w if b_hh is None else b_hh.contiguous()
            XP, G_, HN, HS = xp.unbind(0), gates.unbind(0), hn.unbind(0), hs.unbind(0)
            for t in range(T):
                run(K.gru_fwd, XP[t], HS[t], w, bk, G_[t], HN[t], HS[t + 1], HAS_BHH=b_hh is not None)
            ctx.dtypes = (h0.dtype, None if b_ih is None else b_ih.dtype, None if b_hh is None else b_hh.dtype)
            ctx.save_for_backward(x, gates, hn, hs, w_ih, w)
            return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        with _plain(ctx.device_type):
            x, gates, hn, hs, w_ih, w = ctx.saved_tensors
            T, B, _ = gates.shape
            H = w.shape[1]
            dhs = _grad_or_zeros(dhs, hs[1:])
            dxp, dhp = torch.empty_like(gates), torch.empty_like(gates)    # (T, B, 3H) each
            dh = gates.new_empty(B, H)                      # the total gradient of h_t
            run = _Launch(x, B, H)
            DX, DHP, DH, G_, HN, HS = (a.unbind(0) for a in (dxp, dhp, dhs, gates, hn, hs))
            for t in range(T - 1, -1, -1):
                nxt = min(t + 1, T - 1)
                run(K.gru_bwd, DHP[nxt], G_[nxt], w, DH[t], G_[t], HN[t], HS[t], DX[t], DHP[t], dh,
                    FIRST=t == T - 1)
            h_dt, bih_dt, bhh_dt = ctx.dtypes
            dh0 = (dhp[0].mm(w.to(dhp.dtype)) + dh * gates[0, :, H:2 * H]).to(h_dt)
            dx, dw_ih, db_ih = _input_grads(ctx, dxp, x, w_ih, bih_dt)
            db_hh = dhp.sum((0, 1)).to(bhh_dt) if bhh_dt is not None else None
            return dx, dh0, dw_ih, _wgrad(dhp, hs[:-1]).to(w.dtype), db_ih, db_hh


# --------------------------------------------------------------------------- gru (Cho et al.'s form)

class TritonChoGRU(torch.autograd.Function):
    """gru in Cho et al.'s form over a window: fused_gru._ChoGRU's contract. x (T, B, E); h0 (B, H);
    w_ih (3H, E), w_hh (3H, H), b (3H,) or None, gates r, z, n. Returns h (T, B, H)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b):
        ctx.device_type = x.device.type
        with _plain(x.device.type):
            T, B, _ = x.shape
            H = w_hh.shape[1]
            w = w_hh.contiguous()
            xp = _project(x, w_ih, b)                       # (T, B, 3H)
            hs = _hidden(x, h0, H)
            gates = torch.empty_like(xp)                    # r, z, n
            rh = x.new_empty(T, B, H)                       # r * h_{t-1}
            run = _Launch(x, B, H)
            XP, G_, RH, HS = xp.unbind(0), gates.unbind(0), rh.unbind(0), hs.unbind(0)
            for t in range(T):
                run(K.cho_fwd_a, XP[t], HS[t], w, G_[t], RH[t])
                run(K.cho_fwd_b, XP[t], HS[t], w, RH[t], G_[t], HS[t + 1])
            ctx.dtypes = (h0.dtype, None if b is None else b.dtype)
            ctx.save_for_backward(x, gates, rh, hs, w_ih, w)
            return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        with _plain(ctx.device_type):
            x, gates, rh, hs, w_ih, w = ctx.saved_tensors
            T, B, _ = gates.shape
            H = w.shape[1]
            dhs = _grad_or_zeros(dhs, hs[1:])
            dpre = torch.empty_like(gates)                  # (T, B, 3H) r, z, n
            dh, drh = gates.new_empty(B, H), gates.new_empty(B, H)
            run = _Launch(x, B, H)
            DP, DH, G_, HS = dpre.unbind(0), dhs.unbind(0), gates.unbind(0), hs.unbind(0)
            for t in range(T - 1, -1, -1):
                nxt = min(t + 1, T - 1)
                run(K.cho_bwd_a, DP[nxt], G_[nxt], w, DH[t], G_[t], HS[t], DP[t], dh, drh, FIRST=t == T - 1)
                run(K.cho_bwd_b, w, G_[t], HS[t], DP[t], drh)
            h_dt, b_dt = ctx.dtypes
            r0, z0 = gates[0, :, :H], gates[0, :, H:2 * H]
            dh0 = (dpre[0, :, :2 * H].mm(w[:2 * H].to(dpre.dtype)) + dh * (1 - z0) + drh * r0).to(h_dt)
            dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, b_dt)
            dw_hh = torch.cat([_wgrad(dpre[:, :, :2 * H], hs[:-1]), _wgrad(dpre[:, :, 2 * H:], rh)])
            return dx, dh0, dw_ih, dw_hh.to(w.dtype), db


# --------------------------------------------------------------------------- rnn

class TritonRNN(torch.autograd.Function):
    """rnn (tanh) over a window: fused_gru._RNN's contract. x (T, B, E); h0 (B, H); w_ih (H, E),
    w_hh (H, H), b (H,) (b_ih + b_hh) or None. Returns h (T, B, H)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b):
        ctx.device_type = x.device.type
        with _plain(x.device.type):
            T, B, _ = x.shape
            H = w_hh.shape[1]
            w = w_hh.contiguous()
            xp = _project(x, w_ih, b)                       # (T, B, H)
            hs = _hidden(x, h0, H)
            act = torch.empty_like(xp)                      # h_t in the accumulation dtype
            run = _Launch(x, B, H)
            XP, A, HS = xp.unbind(0), act.unbind(0), hs.unbind(0)
            for t in range(T):
                run(K.rnn_fwd, XP[t], HS[t], w, A[t], HS[t + 1])
            ctx.dtypes = (h0.dtype, None if b is None else b.dtype)
            ctx.save_for_backward(x, act, hs, w_ih, w)
            return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        with _plain(ctx.device_type):
            x, act, hs, w_ih, w = ctx.saved_tensors
            T, B, H = act.shape
            dhs = _grad_or_zeros(dhs, hs[1:])
            dpre = torch.empty_like(act)
            run = _Launch(x, B, H)
            DP, DH, A = dpre.unbind(0), dhs.unbind(0), act.unbind(0)
            for t in range(T - 1, -1, -1):
                run(K.rnn_bwd, DP[min(t + 1, T - 1)], w, DH[t], A[t], DP[t], FIRST=t == T - 1)
            h_dt, b_dt = ctx.dtypes
            dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, b_dt)
            return dx, dpre[0].mm(w.to(dpre.dtype)).to(h_dt), dw_ih, _wgrad(dpre, hs[:-1]).to(w.dtype), db

"""Triton kernels for one time step of one recurrent layer, forward and backward: each computes a
tile of BB batch rows by BH hidden units (the recurrent product of their gates and the gate
pointwise); the peephole's full form and the Cho gru take a second launch (docs/performance.md,
"GPU: Triton kernels"). functions.py launches them and says what every buffer holds.

Conventions: a step's gate rows are contiguous (B, G*H) slices in gate order (i, f, g, o / f, g, o /
r, z, n); h-like rows are (B, H). ``ACC`` is the accumulation and pointwise dtype (float32, or
float64 for float64 inputs); ``DOT`` the dtype both operands of ``tl.dot`` are cast to (the
weights'; float32 for half weights under the interpreter, whose bfloat16 dot is wrong)."""

from __future__ import annotations

import triton
import triton.language as tl

LSTM, PEEP, COUPLED = 0, 1, 2     # KIND of the lstm-family kernels, as launches pass it
# The same inside the kernels: compiled Triton reads a module global only when it is a constexpr
# (the interpreter reads any), so the kernels compare KIND with these.
_PEEP, _COUPLED = tl.constexpr(PEEP), tl.constexpr(COUPLED)


# --------------------------------------------------------------------------- helpers

@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _tile(B, H, BB: tl.constexpr, BH: tl.constexpr):
    """This program's batch rows, hidden units and the mask of the (BB, BH) tile."""
    ob = tl.program_id(0) * BB + tl.arange(0, BB)
    oh = tl.program_id(1) * BH + tl.arange(0, BH)
    return ob, oh, (ob[:, None] < B) & (oh[None, :] < H)


@triton.jit
def _ld(ptr, ob, oh, ld, m, ACC: tl.constexpr):
    """A (BB, BH) tile of a row-major matrix with row stride ld, as ACC (0 outside the mask)."""
    return tl.load(ptr + ob[:, None] * ld + oh[None, :], mask=m, other=0.0).to(ACC)


@triton.jit
def _st(ptr, ob, oh, ld, m, v):
    tl.store(ptr + ob[:, None] * ld + oh[None, :], v.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b for tiles a (M, K) and b (K, N). float64 by products and a sum: tl.dot takes no
    float64 when compiled for a GPU (Triton 3.6 on an H200), though the interpreter does."""
    if a.dtype == tl.float64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _mm_nt(a_ptr, lda, w_ptr, ob, oh, B, H, K, G: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
           BK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """A[ob, :K] @ W[g*H + oh, :K]^T for gate blocks g < G (up to 4): four (BB, BH) tiles,
    zeros for g >= G. W is row-major with row stride K; A has row stride lda."""
    acc0 = tl.zeros((BB, BH), dtype=ACC)
    acc1 = tl.zeros((BB, BH), dtype=ACC)
    acc2 = tl.zeros((BB, BH), dtype=ACC)
    acc3 = tl.zeros((BB, BH), dtype=ACC)
    mh = oh[:, None] < H
    for k0 in range(0, K, BK):
        ok = k0 + tl.arange(0, BK)
        mk = ok[None, :] < K
        a = tl.load(a_ptr + ob[:, None] * lda + ok[None, :], mask=(ob[:, None] < B) & mk, other=0.0).to(DOT)
        wp = w_ptr + oh[:, None] * K + ok[None, :]
        acc0 = _dot(a, tl.trans(tl.load(wp, mask=mh & mk, other=0.0).to(DOT)), acc0, PREC)
        if G > 1:
            acc1 = _dot(a, tl.trans(tl.load(wp + H * K, mask=mh & mk, other=0.0).to(DOT)), acc1, PREC)
        if G > 2:
            acc2 = _dot(a, tl.trans(tl.load(wp + 2 * H * K, mask=mh & mk, other=0.0).to(DOT)), acc2, PREC)
        if G > 3:
            acc3 = _dot(a, tl.trans(tl.load(wp + 3 * H * K, mask=mh & mk, other=0.0).to(DOT)), acc3, PREC)
    return acc0, acc1, acc2, acc3


@triton.jit
def _mm_nn(d_ptr, ldd, w_ptr, ldw, ob, oh, B, H, N, BB: tl.constexpr, BH: tl.constexpr,
           BK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """D[ob, :N] @ W[:N, oh]: a (BB, BH) tile. D has row stride ldd, W row stride ldw."""
    acc = tl.zeros((BB, BH), dtype=ACC)
    for k0 in range(0, N, BK):
        ok = k0 + tl.arange(0, BK)
        d = tl.load(d_ptr + ob[:, None] * ldd + ok[None, :], mask=(ob[:, None] < B) & (ok[None, :] < N),
                    other=0.0).to(DOT)
        w = tl.load(w_ptr + ok[:, None] * ldw + oh[None, :], mask=(ok[:, None] < N) & (oh[None, :] < H),
                    other=0.0).to(DOT)
        acc = _dot(d, w, acc, PREC)
    return acc


# --------------------------------------------------------------------------- lstm, peephole (diag), coupled

@triton.jit
def lstm_fwd(xp, h_prev, c_prev, w, p, gates, c_out, h_out, B, H, G: tl.constexpr, KIND: tl.constexpr,
             BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
             PREC: tl.constexpr):
    """One step of lstm (i, f, g, o), peephole diag (p: (3, H) for i, f, o) or coupled (f, g, o).
    xp: the input half (B, G*H); gates: the activated gates (B, G*H); c_out, h_out (B, H)."""
    ob, oh, m = _tile(B, H, BB, BH)
    a0, a1, a2, a3 = _mm_nt(h_prev, H, w, ob, oh, B, H, H, G, BB, BH, BK, ACC, DOT, PREC)
    GH = G * H
    cp = _ld(c_prev, ob, oh, H, m, ACC)
    if KIND == _COUPLED:
        f = tl.sigmoid(a0 + _ld(xp, ob, oh, GH, m, ACC))
        g = _tanh(a1 + _ld(xp + H, ob, oh, GH, m, ACC))
        o_pre = a2 + _ld(xp + 2 * H, ob, oh, GH, m, ACC)
        c = f * cp + (1.0 - f) * g
        _st(gates, ob, oh, GH, m, f)
        _st(gates + H, ob, oh, GH, m, g)
    else:
        i_pre = a0 + _ld(xp, ob, oh, GH, m, ACC)
        f_pre = a1 + _ld(xp + H, ob, oh, GH, m, ACC)
        o_pre = a3 + _ld(xp + 3 * H, ob, oh, GH, m, ACC)
        if KIND == _PEEP:
            mh = oh < H
            i_pre += tl.load(p + oh, mask=mh, other=0.0).to(ACC)[None, :] * cp
            f_pre += tl.load(p + H + oh, mask=mh, other=0.0).to(ACC)[None, :] * cp
        i = tl.sigmoid(i_pre)
        f = tl.sigmoid(f_pre)
        g = _tanh(a2 + _ld(xp + 2 * H, ob, oh, GH, m, ACC))
        c = f * cp + i * g
        if KIND == _PEEP:
            o_pre += tl.load(p + 2 * H + oh, mask=oh < H, other=0.0).to(ACC)[None, :] * c
        _st(gates, ob, oh, GH, m, i)
        _st(gates + H, ob, oh, GH, m, f)
        _st(gates + 2 * H, ob, oh, GH, m, g)
    o = tl.sigmoid(o_pre)
    _st(gates + (G - 1) * H, ob, oh, GH, m, o)
    _st(c_out, ob, oh, H, m, c)
    _st(h_out, ob, oh, H, m, o * _tanh(c))


@triton.jit
def lstm_bwd(dpre_next, w, p, dh_in, gates, c_prev, c_new, dpre, dc, B, H, G: tl.constexpr,
             KIND: tl.constexpr, FIRST: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
             ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Backward of step t. dh_in: the gradient of h_t from above (B, H); dpre_next: step t+1's
    pre-activation gradients (B, G*H), unused when FIRST (t = T-1); dc: in, the gradient reaching
    c_t from step t+1; out, the gradient reaching c_{t-1}. Writes dpre (B, G*H) of step t."""
    ob, oh, m = _tile(B, H, BB, BH)
    GH = G * H
    dh = _ld(dh_in, ob, oh, H, m, ACC)
    if not FIRST:
        dh += _mm_nn(dpre_next, GH, w, H, ob, oh, B, H, GH, BB, BH, BK, ACC, DOT, PREC)
    cp = _ld(c_prev, ob, oh, H, m, ACC)
    tc = _tanh(_ld(c_new, ob, oh, H, m, ACC))
    o = _ld(gates + (G - 1) * H, ob, oh, GH, m, ACC)
    d_o = dh * tc * o * (1.0 - o)
    d_c = _ld(dc, ob, oh, H, m, ACC) + dh * o * (1.0 - tc * tc)
    if KIND == _COUPLED:
        f = _ld(gates, ob, oh, GH, m, ACC)
        g = _ld(gates + H, ob, oh, GH, m, ACC)
        _st(dpre, ob, oh, GH, m, d_c * (cp - g) * f * (1.0 - f))
        _st(dpre + H, ob, oh, GH, m, d_c * (1.0 - f) * (1.0 - g * g))
        carry = d_c * f
    else:
        mh = oh < H
        if KIND == _PEEP:
            d_c += d_o * tl.load(p + 2 * H + oh, mask=mh, other=0.0).to(ACC)[None, :]
        i = _ld(gates, ob, oh, GH, m, ACC)
        f = _ld(gates + H, ob, oh, GH, m, ACC)
        g = _ld(gates + 2 * H, ob, oh, GH, m, ACC)
        d_i = d_c * g * i * (1.0 - i)
        d_f = d_c * cp * f * (1.0 - f)
        _st(dpre, ob, oh, GH, m, d_i)
        _st(dpre + H, ob, oh, GH, m, d_f)
        _st(dpre + 2 * H, ob, oh, GH, m, d_c * i * (1.0 - g * g))
        carry = d_c * f
        if KIND == _PEEP:
            carry += d_i * tl.load(p + oh, mask=mh, other=0.0).to(ACC)[None, :]
            carry += d_f * tl.load(p + H + oh, mask=mh, other=0.0).to(ACC)[None, :]
    _st(dpre + (G - 1) * H, ob, oh, GH, m, d_o)
    _st(dc, ob, oh, H, m, carry)


# --------------------------------------------------------------------------- peephole (full form): two phases

@triton.jit
def peep_full_fwd_a(xp, h_prev, c_prev, w, u, gates, c_out, B, H, BB: tl.constexpr, BH: tl.constexpr,
                    BK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """i, f (which see U_{i,f} c_{t-1}), g and c_t; o's pre-activation without U_o c_t into o's slot.
    u: (3H, H), blocks i, f, o."""
    ob, oh, m = _tile(B, H, BB, BH)
    a0, a1, a2, a3 = _mm_nt(h_prev, H, w, ob, oh, B, H, H, 4, BB, BH, BK, ACC, DOT, PREC)
    u0, u1, _u2, _u3 = _mm_nt(c_prev, H, u, ob, oh, B, H, H, 2, BB, BH, BK, ACC, DOT, PREC)
    GH = 4 * H
    i = tl.sigmoid(a0 + u0 + _ld(xp, ob, oh, GH, m, ACC))
    f = tl.sigmoid(a1 + u1 + _ld(xp + H, ob, oh, GH, m, ACC))
    g = _tanh(a2 + _ld(xp + 2 * H, ob, oh, GH, m, ACC))
    c = f * _ld(c_prev, ob, oh, H, m, ACC) + i * g
    _st(gates, ob, oh, GH, m, i)
    _st(gates + H, ob, oh, GH, m, f)
    _st(gates + 2 * H, ob, oh, GH, m, g)
    _st(gates + 3 * H, ob, oh, GH, m, a3 + _ld(xp + 3 * H, ob, oh, GH, m, ACC))
    _st(c_out, ob, oh, H, m, c)


@triton.jit
def peep_full_fwd_b(c_new, u, gates, h_out, B, H, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """o = sigmoid(pre_o + U_o c_t), h_t = o * tanh(c_t)."""
    ob, oh, m = _tile(B, H, BB, BH)
    uo, _a, _b, _c = _mm_nt(c_new, H, u + 2 * H * H, ob, oh, B, H, H, 1, BB, BH, BK, ACC, DOT, PREC)
    o = tl.sigmoid(uo + _ld(gates + 3 * H, ob, oh, 4 * H, m, ACC))
    _st(gates + 3 * H, ob, oh, 4 * H, m, o)
    _st(h_out, ob, oh, H, m, o * _tanh(_ld(c_new, ob, oh, H, m, ACC)))


@triton.jit
def peep_full_bwd_a(dpre_next, gates_next, w, u, dh_in, gates, c_new, dpre, dc, B, H, FIRST: tl.constexpr,
                    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                    DOT: tl.constexpr, PREC: tl.constexpr):
    """dh_t, o's gradient, and c_t's gradient except the part through U_o. dc: in, dc_{t+1}
    (the gradient reaching c_T when FIRST); out, that partial dc_t."""
    ob, oh, m = _tile(B, H, BB, BH)
    GH = 4 * H
    dh = _ld(dh_in, ob, oh, H, m, ACC)
    carry = _ld(dc, ob, oh, H, m, ACC)
    if not FIRST:
        dh += _mm_nn(dpre_next, GH, w, H, ob, oh, B, H, GH, BB, BH, BK, ACC, DOT, PREC)
        carry = carry * _ld(gates_next + H, ob, oh, GH, m, ACC)
        carry += _mm_nn(dpre_next, GH, u, H, ob, oh, B, H, 2 * H, BB, BH, BK, ACC, DOT, PREC)
    tc = _tanh(_ld(c_new, ob, oh, H, m, ACC))
    o = _ld(gates + 3 * H, ob, oh, GH, m, ACC)
    _st(dpre + 3 * H, ob, oh, GH, m, dh * tc * o * (1.0 - o))
    _st(dc, ob, oh, H, m, carry + dh * o * (1.0 - tc * tc))


@triton.jit
def peep_full_bwd_b(u, gates, c_prev, dpre, dc, B, H, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
                    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """dc_t += d(pre_o) @ U_o; then the gradients of i, f, g. dc: out, dc_t."""
    ob, oh, m = _tile(B, H, BB, BH)
    GH = 4 * H
    d_c = _ld(dc, ob, oh, H, m, ACC)
    d_c += _mm_nn(dpre + 3 * H, GH, u + 2 * H * H, H, ob, oh, B, H, H, BB, BH, BK, ACC, DOT, PREC)
    i = _ld(gates, ob, oh, GH, m, ACC)
    f = _ld(gates + H, ob, oh, GH, m, ACC)
    g = _ld(gates + 2 * H, ob, oh, GH, m, ACC)
    _st(dpre, ob, oh, GH, m, d_c * g * i * (1.0 - i))
    _st(dpre + H, ob, oh, GH, m, d_c * _ld(c_prev, ob, oh, H, m, ACC) * f * (1.0 - f))
    _st(dpre + 2 * H, ob, oh, GH, m, d_c * i * (1.0 - g * g))
    _st(dc, ob, oh, H, m, d_c)


# --------------------------------------------------------------------------- gru (nn.GRU's form)

@triton.jit
def gru_fwd(xp, h_prev, w, b_hh, gates, hn, h_out, B, H, HAS_BHH: tl.constexpr, BB: tl.constexpr,
            BH: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """r, z, n and h_t; hn = W_hn h_{t-1} + b_hn (B, H) is kept for the backward."""
    ob, oh, m = _tile(B, H, BB, BH)
    a0, a1, a2, _a3 = _mm_nt(h_prev, H, w, ob, oh, B, H, H, 3, BB, BH, BK, ACC, DOT, PREC)
    if HAS_BHH:
        mh = oh < H
        a0 += tl.load(b_hh + oh, mask=mh, other=0.0).to(ACC)[None, :]
        a1 += tl.load(b_hh + H + oh, mask=mh, other=0.0).to(ACC)[None, :]
        a2 += tl.load(b_hh + 2 * H + oh, mask=mh, other=0.0).to(ACC)[None, :]
    GH = 3 * H
    r = tl.sigmoid(a0 + _ld(xp, ob, oh, GH, m, ACC))
    z = tl.sigmoid(a1 + _ld(xp + H, ob, oh, GH, m, ACC))
    n = _tanh(_ld(xp + 2 * H, ob, oh, GH, m, ACC) + r * a2)
    _st(gates, ob, oh, GH, m, r)
    _st(gates + H, ob, oh, GH, m, z)
    _st(gates + 2 * H, ob, oh, GH, m, n)
    _st(hn, ob, oh, H, m, a2)
    _st(h_out, ob, oh, H, m, (1.0 - z) * n + z * _ld(h_prev, ob, oh, H, m, ACC))


@triton.jit
def gru_bwd(dhp_next, gates_next, w, dh_in, gates, hn, h_prev, dx, dhp, dh, B, H, FIRST: tl.constexpr,
            BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
            PREC: tl.constexpr):
    """Backward of step t: dx, the gradient of W_ih x + b_ih, and dhp, of W_hh h + b_hh (B, 3H).
    dh: in, dh_{t+1}; out, dh_t (the total gradient of h_t)."""
    ob, oh, m = _tile(B, H, BB, BH)
    GH = 3 * H
    d_h = _ld(dh_in, ob, oh, H, m, ACC)
    if not FIRST:
        d_h += _mm_nn(dhp_next, GH, w, H, ob, oh, B, H, GH, BB, BH, BK, ACC, DOT, PREC)
        d_h += _ld(dh, ob, oh, H, m, ACC) * _ld(gates_next + H, ob, oh, GH, m, ACC)
    r = _ld(gates, ob, oh, GH, m, ACC)
    z = _ld(gates + H, ob, oh, GH, m, ACC)
    n = _ld(gates + 2 * H, ob, oh, GH, m, ACC)
    d_n = d_h * (1.0 - z) * (1.0 - n * n)
    d_r = d_n * _ld(hn, ob, oh, H, m, ACC) * r * (1.0 - r)
    d_z = d_h * (_ld(h_prev, ob, oh, H, m, ACC) - n) * z * (1.0 - z)
    _st(dx, ob, oh, GH, m, d_r)
    _st(dx + H, ob, oh, GH, m, d_z)
    _st(dx + 2 * H, ob, oh, GH, m, d_n)
    _st(dhp, ob, oh, GH, m, d_r)
    _st(dhp + H, ob, oh, GH, m, d_z)
    _st(dhp + 2 * H, ob, oh, GH, m, d_n * r)
    _st(dh, ob, oh, H, m, d_h)


# --------------------------------------------------------------------------- gru (Cho et al.'s form): two phases

@triton.jit
def cho_fwd_a(xp, h_prev, w, gates, rh, B, H, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
              ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """r, z and r * h_{t-1} (rh, B x H, in the layer's dtype: the operand of W_n)."""
    ob, oh, m = _tile(B, H, BB, BH)
    a0, a1, _a2, _a3 = _mm_nt(h_prev, H, w, ob, oh, B, H, H, 2, BB, BH, BK, ACC, DOT, PREC)
    GH = 3 * H
    r = tl.sigmoid(a0 + _ld(xp, ob, oh, GH, m, ACC))
    z = tl.sigmoid(a1 + _ld(xp + H, ob, oh, GH, m, ACC))
    _st(gates, ob, oh, GH, m, r)
    _st(gates + H, ob, oh, GH, m, z)
    _st(rh, ob, oh, H, m, r * _ld(h_prev, ob, oh, H, m, ACC))


@triton.jit
def cho_fwd_b(xp, h_prev, w, rh, gates, h_out, B, H, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
              ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """n = tanh(x_n + W_n (r * h_{t-1})) and h_t = (1 - z) h_{t-1} + z n."""
    ob, oh, m = _tile(B, H, BB, BH)
    a2, _a, _b, _c = _mm_nt(rh, H, w + 2 * H * H, ob, oh, B, H, H, 1, BB, BH, BK, ACC, DOT, PREC)
    GH = 3 * H
    n = _tanh(a2 + _ld(xp + 2 * H, ob, oh, GH, m, ACC))
    z = _ld(gates + H, ob, oh, GH, m, ACC)
    _st(gates + 2 * H, ob, oh, GH, m, n)
    _st(h_out, ob, oh, H, m, (1.0 - z) * _ld(h_prev, ob, oh, H, m, ACC) + z * n)


@triton.jit
def cho_bwd_a(dpre_next, gates_next, w, dh_in, gates, h_prev, dpre, dh, drh, B, H, FIRST: tl.constexpr,
              BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
              PREC: tl.constexpr):
    """dh_t (from above, through W_rz and directly from step t+1), then the gradients of z and n.
    dh: in, dh_{t+1}; out, dh_t. drh: the gradient of r_{t+1} * h_t from step t+1."""
    ob, oh, m = _tile(B, H, BB, BH)
    GH = 3 * H
    d_h = _ld(dh_in, ob, oh, H, m, ACC)
    if not FIRST:
        d_h += _mm_nn(dpre_next, GH, w, H, ob, oh, B, H, 2 * H, BB, BH, BK, ACC, DOT, PREC)
        d_h += _ld(dh, ob, oh, H, m, ACC) * (1.0 - _ld(gates_next + H, ob, oh, GH, m, ACC))
        d_h += _ld(drh, ob, oh, H, m, ACC) * _ld(gates_next, ob, oh, GH, m, ACC)
    z = _ld(gates + H, ob, oh, GH, m, ACC)
    n = _ld(gates + 2 * H, ob, oh, GH, m, ACC)
    _st(dpre + H, ob, oh, GH, m, d_h * (n - _ld(h_prev, ob, oh, H, m, ACC)) * z * (1.0 - z))
    _st(dpre + 2 * H, ob, oh, GH, m, d_h * z * (1.0 - n * n))
    _st(dh, ob, oh, H, m, d_h)


@triton.jit
def cho_bwd_b(w, gates, h_prev, dpre, drh, B, H, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
              ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """drh = d(pre_n) @ W_n, the gradient of r * h_{t-1}; then r's gradient."""
    ob, oh, m = _tile(B, H, BB, BH)
    GH = 3 * H
    d_rh = _mm_nn(dpre + 2 * H, GH, w + 2 * H * H, H, ob, oh, B, H, H, BB, BH, BK, ACC, DOT, PREC)
    r = _ld(gates, ob, oh, GH, m, ACC)
    _st(dpre, ob, oh, GH, m, d_rh * _ld(h_prev, ob, oh, H, m, ACC) * r * (1.0 - r))
    _st(drh, ob, oh, H, m, d_rh)


# --------------------------------------------------------------------------- rnn

@triton.jit
def rnn_fwd(xp, h_prev, w, act, h_out, B, H, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
            ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """h_t = tanh(xp + W_hh h_{t-1}); act keeps h_t in ACC for the backward."""
    ob, oh, m = _tile(B, H, BB, BH)
    a0, _a, _b, _c = _mm_nt(h_prev, H, w, ob, oh, B, H, H, 1, BB, BH, BK, ACC, DOT, PREC)
    h = _tanh(a0 + _ld(xp, ob, oh, H, m, ACC))
    _st(act, ob, oh, H, m, h)
    _st(h_out, ob, oh, H, m, h)


@triton.jit
def rnn_bwd(dpre_next, w, dh_in, act, dpre, B, H, FIRST: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
            BK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    ob, oh, m = _tile(B, H, BB, BH)
    d_h = _ld(dh_in, ob, oh, H, m, ACC)
    if not FIRST:
        d_h += _mm_nn(dpre_next, H, w, H, ob, oh, B, H, H, BB, BH, BK, ACC, DOT, PREC)
    h = _ld(act, ob, oh, H, m, ACC)
    _st(dpre, ob, oh, H, m, d_h * (1.0 - h * h))

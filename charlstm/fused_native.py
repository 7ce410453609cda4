"""The custom cells' windows with both time loops in C (csrc/train_loops.c): the inputs, outputs
and equations of fused.py's torch loops, for float32 layers on the CPU; the products over the whole
window stay in torch."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cells import Cell
from .fused import FastPath, _input_grads, _prev, _project, _zeros_if_none, autocast_on, peephole_weights
from .native import loops
from .native.abi import Kernel

NATIVE = {"on": True}     # tests and benchmarks switch the native loops off to compare


def _native_window(x: Tensor | None, ids: Tensor | None, table: Tensor | None, w_ih: Tensor, b: Tensor | None,
                   h0: Tensor) -> tuple[Tensor, Tensor]:
    """What every native loop starts from: the input half of the gates for all steps (T, B, G*H)
    and the hidden states (T + 1, B, H) with h0 in row 0. The input half is one product over
    the T*B inputs x (T, B, E); for a first layer given token ids (T, B) and the embedding table
    (V, E) instead (x None), the rows of the table's own projection (V, G*H), a product V rows
    long, gathered by id."""
    if ids is None:
        gates = _project(x, w_ih, b)
    else:
        proj = table.mm(w_ih.t()) if b is None else torch.addmm(b, table, w_ih.t())    # (V, G*H)
        gates = proj.index_select(0, ids.reshape(-1)).view(*ids.shape, -1)
    T, B, _ = gates.shape
    hs = gates.new_empty(T + 1, B, h0.shape[-1])            # h_{-1} .. h_{T-1}
    hs[0] = h0
    return gates, hs


def _window_input_grads(ctx, dpre: Tensor, x: Tensor | None, ids: Tensor | None, table: Tensor | None,
                        w_ih: Tensor, has_bias: bool):
    """Gradients of `_native_window`'s input half from those of the pre-activations dpre
    (T, B, G*H): dx, dtable, dW_ih and the bias. With token ids the T*B rows of dpre are first
    summed per id (V, G*H), and the products are V rows long instead of T*B."""
    if ids is None:
        dx, dw_ih, db = _input_grads(ctx, dpre, x, w_ih, has_bias)
        return dx, None, dw_ih, db
    flat = dpre.view(-1, dpre.shape[-1])
    dproj = flat.new_zeros(table.shape[0], flat.shape[1]).index_add_(0, ids.reshape(-1), flat)   # (V, G*H)
    dtable = dproj.mm(w_ih) if ctx.needs_input_grad[2] else None
    return None, dtable, dproj.t().mm(table), dproj.sum(0) if has_bias else None


class _NativeLSTMFamily(torch.autograd.Function):
    """lstm, peephole (both forms) or coupled over a window with both time loops in C
    (csrc/train_loops.c through native/loops.py): the inputs, outputs and equations of
    `_LSTM`, `_PeepholeLSTM` (p (3, H) diag or (3H, H) full) and `_CoupledLSTM`; the products
    over the whole window stay here."""

    @staticmethod
    def forward(ctx, x, ids, table, h0, c0, w_ih, w_hh, b, p, kernel):
        gates, hs = _native_window(x, ids, table, w_ih, b, h0)   # gates (T, B, G*H), activated in place
        cs = torch.empty_like(hs)                           # c_{-1} .. c_{T-1}
        tcs = torch.empty_like(hs[1:])                      # tanh(c_t)
        cs[0] = c0
        loops.recurrent_forward(kernel, gates, w_hh, hs, cs, tcs, peep=p)
        ctx.kernel, ctx.has_bias = kernel, b is not None
        ctx.save_for_backward(x, ids, table, gates, hs, cs, tcs, w_ih, w_hh, p)
        return hs[1:], cs[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc_last):
        x, ids, table, gates, hs, cs, tcs, w_ih, w_hh, p = ctx.saved_tensors
        T, B, GH = gates.shape
        H = w_hh.shape[1]
        dpre = torch.empty_like(gates)                      # (T, B, G*H) gradient of the pre-activations
        dh = gates.new_zeros(B, H)
        dc = _zeros_if_none(dc_last, cs[0]).contiguous().clone()
        loops.recurrent_backward(ctx.kernel, gates, w_hh, hs, cs, tcs, _zeros_if_none(dhs, tcs).contiguous(),
                                  dpre, dh, dc, peep=p)
        dw_hh = dpre.view(T * B, GH).t().mm(_prev(hs).reshape(T * B, H))   # one GEMM over all steps
        dx, dtable, dw_ih, db = _window_input_grads(ctx, dpre, x, ids, table, w_ih, ctx.has_bias)
        dp = None
        if ctx.kernel.kind == "peephole":                          # i and f saw c_{t-1}, o saw c_t
            d4 = dpre.view(T, B, 4, H)
            dp = torch.stack([(d4[:, :, 0] * _prev(cs)).sum((0, 1)), (d4[:, :, 1] * _prev(cs)).sum((0, 1)),
                              (d4[:, :, 3] * cs[1:]).sum((0, 1))])
        elif ctx.kernel.kind == "peephole_full":                   # the same as products: (3H, H)
            flat = dpre.view(T * B, GH)
            dp = torch.cat([flat[:, :2 * H].t().mm(_prev(cs).reshape(T * B, H)),
                            flat[:, 3 * H:].t().mm(cs[1:].reshape(T * B, H))])
        return dx, None, dtable, dh, dc, dw_ih, dw_hh, db, dp, None


class _NativeGRU(torch.autograd.Function):
    """gru in nn.GRU's form over a window with both time loops in C: the inputs, outputs and
    equations of `_GRU`."""

    @staticmethod
    def forward(ctx, x, ids, table, h0, w_ih, w_hh, b_ih, b_hh, kernel):
        gates, hs = _native_window(x, ids, table, w_ih, b_ih, h0)   # gates: W_ih x + b_ih, then r, z, n
        hn = torch.empty_like(hs[1:])                       # W_hn h_{t-1} + b_hn
        loops.recurrent_forward(kernel, gates, w_hh, hs, None, hn, b_hh=b_hh)
        ctx.kernel, ctx.has_bias = kernel, (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, ids, table, gates, hs, hn, w_ih, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        x, ids, table, gates, hs, hn, w_ih, w_hh = ctx.saved_tensors
        T, B, H3 = gates.shape
        H = H3 // 3
        dx = torch.empty_like(gates)                        # (T, B, 3H) gradient of W_ih x + b_ih
        dhp = torch.empty_like(gates)                       # (T, B, 3H) gradient of W_hh h + b_hh
        dh = gates.new_zeros(B, H)
        scratch = gates.new_empty(B, H)
        loops.recurrent_backward(ctx.kernel, gates, w_hh, hs, None, hn, _zeros_if_none(dhs, hn).contiguous(),
                                  dx, dh, scratch, dph=dhp)
        dw_hh = dhp.view(T * B, H3).t().mm(_prev(hs).reshape(T * B, H))
        db_hh = dhp.sum((0, 1)) if ctx.has_bias[1] else None
        dxin, dtable, dw_ih, db_ih = _window_input_grads(ctx, dx, x, ids, table, w_ih, ctx.has_bias[0])
        return dxin, None, dtable, dh, dw_ih, dw_hh, db_ih, db_hh, None


class _NativeChoGRU(torch.autograd.Function):
    """gru in Cho et al.'s form over a window with both time loops in C: the inputs, outputs and
    equations of `_ChoGRU`."""

    @staticmethod
    def forward(ctx, x, ids, table, h0, w_ih, w_hh, b, kernel):
        gates, hs = _native_window(x, ids, table, w_ih, b, h0)   # gates: W x + b, then r, z, n
        rh = torch.empty_like(hs[1:])                       # r * h_prev
        loops.recurrent_forward(kernel, gates, w_hh, hs, None, None, rh=rh)
        ctx.kernel, ctx.has_bias = kernel, b is not None
        ctx.save_for_backward(x, ids, table, gates, hs, rh, w_ih, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        x, ids, table, gates, hs, rh, w_ih, w_hh = ctx.saved_tensors
        T, B, H3 = gates.shape
        H = H3 // 3
        dpre = torch.empty_like(gates)                      # (T, B, 3H) gradient of the pre-activations r, z, n
        dh = gates.new_zeros(B, H)
        loops.recurrent_backward(ctx.kernel, gates, w_hh, hs, None, None, _zeros_if_none(dhs, rh).contiguous(),
                                  dpre, dh, gates.new_empty(B, H))
        flat = dpre.view(T * B, H3)
        dw_hh = torch.cat([flat[:, :2 * H].t().mm(_prev(hs).reshape(T * B, H)),   # U_rz saw h_prev
                           flat[:, 2 * H:].t().mm(rh.view(T * B, H))])             # U_n saw r * h_prev
        dx, dtable, dw_ih, db = _window_input_grads(ctx, dpre, x, ids, table, w_ih, ctx.has_bias)
        return dx, None, dtable, dh, dw_ih, dw_hh, db, None


class _NativeRNN(torch.autograd.Function):
    """rnn (tanh) over a window with both time loops in C: the inputs, outputs and equations of `_RNN`."""

    @staticmethod
    def forward(ctx, x, ids, table, h0, w_ih, w_hh, b, kernel):
        gates, hs = _native_window(x, ids, table, w_ih, b, h0)   # gates: W_ih x + b, then h_t
        loops.recurrent_forward(kernel, gates, w_hh, hs, None, None)
        ctx.kernel, ctx.has_bias = kernel, b is not None
        ctx.save_for_backward(x, ids, table, gates, hs, w_ih, w_hh)
        return hs[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        x, ids, table, gates, hs, w_ih, w_hh = ctx.saved_tensors
        T, B, H = gates.shape
        dpre = torch.empty_like(gates)                      # (T, B, H) gradient of the pre-activations
        dh = gates.new_zeros(B, H)
        loops.recurrent_backward(ctx.kernel, gates, w_hh, hs, None, None, _zeros_if_none(dhs, gates).contiguous(),
                                  dpre, dh, None)
        dw_hh = dpre.view(T * B, H).t().mm(_prev(hs).reshape(T * B, H))
        dx, dtable, dw_ih, db = _window_input_grads(ctx, dpre, x, ids, table, w_ih, ctx.has_bias)
        return dx, None, dtable, dh, dw_ih, dw_hh, db, None


# --------------------------------------------------------------------------- fast paths

def _unavailable(cell: Cell, x: Tensor) -> str | None:
    if not NATIVE["on"]:
        return "the native loops are switched off"
    if autocast_on(x):
        return "autocast is on (the step-by-step layer runs mixed precision)"
    return loops.unavailable(x, cell.weight_hh)


def _path(apply) -> FastPath:
    """The FastPath of ``apply(cell, x, ids, table, state)``, which takes the inputs x (T, B, E) or
    a first layer's token ids and embedding table (x None)."""
    return FastPath("native loop", lambda cell, x, state: apply(cell, x, None, None, state), _unavailable,
                    run_tokens=lambda cell, tokens, state: apply(cell, None, tokens.ids, tokens.table, state))


def lstm_family(kernel: Kernel, *, peepholes: bool = False) -> FastPath:
    """The C loops of the lstm, coupled or peephole kernel (either form)."""
    def apply(cell, x, ids, table, state):
        p = peephole_weights(cell) if peepholes else None
        hs, c = _NativeLSTMFamily.apply(x, ids, table, state[0], state[1], cell.weight_ih, cell.weight_hh,
                                        cell.input_bias(), p, kernel)
        return hs, (hs[-1], c)
    return _path(apply)


def gru(kernel: Kernel) -> FastPath:
    """The C loops of the gru in nn.GRU's form."""
    def apply(cell, x, ids, table, state):
        hs = _NativeGRU.apply(x, ids, table, state[0], cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh,
                              kernel)
        return hs, (hs[-1],)
    return _path(apply)


def cho_gru(kernel: Kernel) -> FastPath:
    """The C loops of the gru in Cho et al.'s form."""
    def apply(cell, x, ids, table, state):
        hs = _NativeChoGRU.apply(x, ids, table, state[0], cell.weight_ih, cell.weight_hh, cell.bias, kernel)
        return hs, (hs[-1],)
    return _path(apply)


def rnn(kernel: Kernel) -> FastPath:
    """The C loops of the tanh rnn."""
    def apply(cell, x, ids, table, state):
        hs = _NativeRNN.apply(x, ids, table, state[0], cell.weight_ih, cell.weight_hh, cell.input_bias(), kernel)
        return hs, (hs[-1],)
    return _path(apply)

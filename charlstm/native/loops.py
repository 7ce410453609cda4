"""A layer's forward and backward time loops in C (csrc/train_loops.c), for fused_native.py."""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from .abi import Kernel, Seq
from .build import library
from .pack import backward_panels, panel_major, ptr

WIDTH = 32     # the loops take H in multiples of this


def unavailable(x: Tensor, w_hh: Tensor) -> Optional[str]:
    """Why the C loops cannot run a layer over input x with recurrent weights w_hh (None: they can)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or w_hh.dtype != torch.float32:
        return "the native loops run float32 on the CPU"
    if w_hh.shape[1] % WIDTH:
        return f"the native loops need a hidden size that is a multiple of {WIDTH} (this is {w_hh.shape[1]})"
    lib, why = library()
    return None if lib is not None else why


def recurrent_forward(kernel: Kernel, gates: Tensor, w_hh: Tensor, hs: Tensor, cs: Optional[Tensor],
                      tcs: Optional[Tensor], b_hh: Optional[Tensor] = None, peep: Optional[Tensor] = None,
                      rh: Optional[Tensor] = None) -> None:
    """The forward time loop of a layer (see csrc/train_loops.c): gates (T, B, G*H) holds
    W x_t + b and receives the activated gates (torch's order); hs, cs (T + 1, B, H) hold h0, c0
    in row 0 and receive the rest (cs None for the grus and the rnn); tcs (T, B, H) receives
    tanh(c_t), for the gru U_n h + b_hn (None for the rnn and the cho gru). b_hh: the gru's
    recurrent bias; peep: the peephole weights (3, H); rh (T, B, H): receives the cho gru's
    r * h_{t-1}. Every tensor contiguous float32."""
    T, B, GH = gates.shape
    H = GH // len(kernel.slots)
    u_t = w_hh.detach().t()                                                   # (H, G*H)
    wf2 = None
    if kernel.kind == "gru_cho":      # two products per step: U_rz h, then U_n (r h)
        wf, wf2 = panel_major(u_t[:, :2 * H], H), panel_major(u_t[:, 2 * H:], H)
    else:
        wf = panel_major(u_t, H, kernel.slots)
    bh = None if b_hh is None else b_hh.detach().contiguous()                 # kept alive through the call
    pp = None if peep is None else peep.detach().contiguous()
    seq = Seq(kind=kernel.code, T=T, B=B, H=H, threads=torch.get_num_threads(), gates=ptr(gates),
              wf=ptr(wf), wf2=ptr(wf2), bh=ptr(bh), peep=ptr(pp), hs=ptr(hs), cs=ptr(cs), tcs=ptr(tcs), rh=ptr(rh))
    library()[0].charlstm_rnn_forward(ctypes.byref(seq))


def recurrent_backward(kernel: Kernel, gates: Tensor, w_hh: Tensor, hs: Tensor, cs: Optional[Tensor],
                       tcs: Optional[Tensor], dhs: Tensor, dpre: Tensor, dh: Tensor, dc: Optional[Tensor],
                       dph: Optional[Tensor] = None, peep: Optional[Tensor] = None) -> None:
    """The backward time loop of a layer, from what the forward left in gates, hs, cs and
    tcs and the gradients dhs (T, B, H) arriving at each output: dpre (T, B, G*H) receives the
    gradients of the pre-activations W x_t + b (and dph those of U h + b_hh, gru); dh (B, H),
    zeros on entry, receives the gradient of h0; dc (B, H), the gradient of c_T on entry,
    receives that of c0 (scratch for the grus, None for the rnn). Every tensor contiguous float32."""
    T, B, GH = gates.shape
    H = GH // len(kernel.slots)
    u = w_hh.detach()
    wb2 = drh = None
    if kernel.kind == "gru_cho":
        wb, wb2 = backward_panels(u[:2 * H]), backward_panels(u[2 * H:])
        drh = gates.new_empty(B, H)
    else:
        wb = backward_panels(u)
    pp = None if peep is None else peep.detach().contiguous()
    seq = Seq(kind=kernel.code, T=T, B=B, H=H, threads=torch.get_num_threads(), gates=ptr(gates),
              wb=ptr(wb), wb2=ptr(wb2), peep=ptr(pp), hs=ptr(hs), cs=ptr(cs), tcs=ptr(tcs), dhs=ptr(dhs),
              dpre=ptr(dpre), dph=ptr(dph), dh=ptr(dh), dc=ptr(dc), drh=ptr(drh))
    library()[0].charlstm_rnn_backward(ctypes.byref(seq))

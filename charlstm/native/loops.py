"""A layer's forward and backward time loops in C (csrc/train_loops.c), for fused_native.py.

Every tensor is checked before C sees it (type, device, layout and shape, from the kernel and the
gates' shape): a CharlstmError, never a wrong read."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ..errors import CharlstmError
from ..runtime import threads_for
from .abi import ERRORS, KINDS, LOOP_SLOTS, Kernel, Seq
from .build import library
from .pack import backward_panels, panel_major, ptr

WIDTH = 8      # the loops take H in multiples of this
LSTMS = ("lstm", "peephole", "peephole_full", "coupled")


def unavailable(x: Tensor, w_hh: Tensor) -> str | None:
    """Why the C loops cannot run a layer over input x with recurrent weights w_hh (None: they can)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or w_hh.dtype != torch.float32:
        return "the native loops run float32 on the CPU"
    return unavailable_for(w_hh.shape[1])


def unavailable_for(hidden: int) -> str | None:
    """Why the C loops cannot run float32 CPU layers of this hidden size (None: they can; the first
    call of a process may compile the library)."""
    if hidden % WIDTH:
        return f"the native loops need a hidden size that is a multiple of {WIDTH} (this is {hidden})"
    lib, why = library()
    return None if lib is not None else why


def _fail(message: str):
    raise CharlstmError(f"native loops: {message}")


def _is(t, name: str, shape: tuple, *, copied: bool = False) -> None:
    """t must be a float32 CPU tensor of this shape, contiguous unless the caller copies it."""
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a tensor (got {type(t).__name__})")
    if t.dtype != torch.float32 or t.device.type != "cpu":
        _fail(f"{name} must be float32 on the CPU (got {t.dtype} on {t.device})")
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {tuple(shape)} (got {tuple(t.shape)})")
    if not copied and not t.is_contiguous():
        _fail(f"{name} must be contiguous")


def _either(t, name: str, wanted: bool, shape: tuple, **kw) -> None:
    """t is checked where the kind uses it, and must be None where it does not."""
    if wanted:
        _is(t, name, shape, **kw)
    elif t is not None:
        _fail(f"{name} must be None for this cell kind")


def _sizes(kernel: Kernel, gates: Tensor) -> tuple[int, int, int, int]:
    """T, B, H and G from the kernel and the gates (T, B, G*H), both checked."""
    if not isinstance(kernel, Kernel) or kernel.kind not in KINDS or tuple(kernel.slots) != LOOP_SLOTS[kernel.kind]:
        _fail(f"unknown kernel {kernel!r}")
    if not isinstance(gates, Tensor) or gates.dim() != 3:
        _fail(f"gates must be a (T, B, G*H) tensor (got {getattr(gates, 'shape', type(gates).__name__)})")
    T, B, GH = gates.shape
    G = kernel.gates
    if GH % G or (GH // G) % WIDTH or GH == 0 or B < 1:
        _fail(f"gates (T, B, {G}*H) need B >= 1 and H a multiple of {WIDTH} (got {tuple(gates.shape)})")
    _is(gates, "gates", (T, B, GH))
    return T, B, GH // G, G


def _check_common(kind, T, B, H, G, w_hh, hs, cs, tcs, peep) -> None:
    _is(w_hh, "w_hh", (G * H, H), copied=True)
    _is(hs, "hs", (T + 1, B, H))
    _either(cs, "cs", kind in LSTMS, (T + 1, B, H))
    _either(tcs, "tcs", kind in LSTMS or kind == "gru", (T, B, H))
    _either(peep, "peep", kind in ("peephole", "peephole_full"), (3, H) if kind == "peephole" else (3 * H, H),
            copied=True)


def _run(name: str, seq: Seq) -> None:
    lib, why = library()
    if lib is None:
        _fail(f"unavailable: {why}")
    code = getattr(lib, name)(ctypes.byref(seq))
    if code:
        _fail(f"the C loop refused its arguments ({ERRORS.get(code, code)})")


def recurrent_forward(kernel: Kernel, gates: Tensor, w_hh: Tensor, hs: Tensor, cs: Tensor | None,
                      tcs: Tensor | None, b_hh: Tensor | None = None, peep: Tensor | None = None,
                      rh: Tensor | None = None) -> None:
    """The forward time loop of a layer (see csrc/train_loops.c): gates (T, B, G*H) holds
    W x_t + b and receives the activated gates (torch's order); hs, cs (T + 1, B, H) hold h0, c0
    in row 0 and receive the rest (cs None for the grus and the rnn); tcs (T, B, H) receives
    tanh(c_t), for the gru U_n h + b_hn (None for the rnn and the cho gru). b_hh: the gru's
    recurrent bias or None; peep: the peephole weights, (3, H) diag or (3H, H) full (i, f, o);
    rh (T, B, H): receives the cho gru's r * h_{t-1}. Every tensor float32 on the CPU, the
    buffers contiguous; CharlstmError otherwise."""
    T, B, H, G = _sizes(kernel, gates)
    kind = kernel.kind
    _check_common(kind, T, B, H, G, w_hh, hs, cs, tcs, peep)
    if b_hh is not None:
        _either(b_hh, "b_hh", kind == "gru", (3 * H,), copied=True)
    _either(rh, "rh", kind == "gru_cho", (T, B, H))
    u_t = w_hh.detach().t()                                                   # (H, G*H)
    wf2 = pf = po = None
    units = 16 if kind == "rnn" and H % 16 == 0 else 8      # the rnn: two vectors a pass where it can
    if kind == "gru_cho":            # two products per step: U_rz h, then U_n (r h)
        wf, wf2 = panel_major(u_t[:, :2 * H], H), panel_major(u_t[:, 2 * H:], H)
    elif units == 16:
        wf = u_t.reshape(H, H // 16, 16).transpose(0, 1).contiguous()           # (H/16, H, 16)
    else:
        wf = panel_major(u_t, H, kernel.slots)
    if kind == "peephole_full":      # P_if c_{t-1} with the gates, then P_o c_t
        p_t = peep.detach().t()                                               # (H, 3H)
        pf, po = panel_major(p_t[:, :2 * H], H), panel_major(p_t[:, 2 * H:], H)
    bh = None if b_hh is None else b_hh.detach().contiguous()                 # kept alive through the call
    pp = None if peep is None or kind != "peephole" else peep.detach().contiguous()
    seq = Seq(kind=kernel.code, T=T, B=B, H=H, threads=threads_for(2 * B * G * H * H), units=units, gates=ptr(gates),
              wf=ptr(wf), wf2=ptr(wf2), bh=ptr(bh), peep=ptr(pp), hs=ptr(hs), cs=ptr(cs), tcs=ptr(tcs), rh=ptr(rh),
              pf=ptr(pf), po=ptr(po))
    _run("charlstm_rnn_forward", seq)


def recurrent_backward(kernel: Kernel, gates: Tensor, w_hh: Tensor, hs: Tensor, cs: Tensor | None,
                       tcs: Tensor | None, dhs: Tensor, dpre: Tensor, dh: Tensor, dc: Tensor | None,
                       dph: Tensor | None = None, peep: Tensor | None = None) -> None:
    """The backward time loop of a layer, from what the forward left in gates, hs, cs and
    tcs and the gradients dhs (T, B, H) arriving at each output: dpre (T, B, G*H) receives the
    gradients of the pre-activations W x_t + b (and dph those of U h + b_hh, gru); dh (B, H)
    receives the gradient of h0; dc (B, H), the gradient of c_T on entry, receives that of c0
    (scratch for the grus, None for the rnn). Checked as recurrent_forward's."""
    T, B, H, G = _sizes(kernel, gates)
    kind = kernel.kind
    _check_common(kind, T, B, H, G, w_hh, hs, cs, tcs, peep)
    _is(dhs, "dhs", (T, B, H))
    _is(dpre, "dpre", (T, B, G * H))
    _is(dh, "dh", (B, H))
    _either(dc, "dc", kind != "rnn", (B, H))
    _either(dph, "dph", kind == "gru", (T, B, 3 * H))
    u = w_hh.detach()
    wb2 = drh = pbf = pbo = None
    if kind == "gru_cho":
        wb, wb2 = backward_panels(u[:2 * H]), backward_panels(u[2 * H:])
        drh = gates.new_empty(B, H)
    else:
        wb = backward_panels(u)
    if kind == "peephole_full":
        p = peep.detach()
        pbf, pbo = backward_panels(p[:2 * H]), backward_panels(p[2 * H:])
    pp = None if peep is None or kind != "peephole" else peep.detach().contiguous()
    seq = Seq(kind=kernel.code, T=T, B=B, H=H, threads=threads_for(2 * B * G * H * H), units=8, gates=ptr(gates),
              wb=ptr(wb), wb2=ptr(wb2), peep=ptr(pp), hs=ptr(hs), cs=ptr(cs), tcs=ptr(tcs), dhs=ptr(dhs),
              dpre=ptr(dpre), dph=ptr(dph), dh=ptr(dh), dc=ptr(dc), drh=ptr(drh), pbf=ptr(pbf), pbo=ptr(pbo))
    _run("charlstm_rnn_backward", seq)

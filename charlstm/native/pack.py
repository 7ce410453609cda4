"""Weights laid out as the kernels read them: gate blocks grouped in panels of 8 (or 32) units, in
float32, float16 or int8 with a scale per row (csrc/charlstm.h's Mat)."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .abi import Mat


def panels(w: Tensor, H: int, slots: tuple | None = None) -> Tensor:
    """The G gate blocks (each H columns) of w (..., G*H), in `slots` order if given, grouped in
    panels of 8 units: (..., H/8, 8G)."""
    lead, G = w.shape[:-1], w.shape[-1] // H
    blocks = w.reshape(*lead, G, H // 8, 8)
    if slots is not None:
        blocks = blocks[..., list(slots), :, :]
    return blocks.transpose(-3, -2).reshape(*lead, H // 8, 8 * G)


def panel_major(w: Tensor, H: int, slots: tuple | None = None) -> Tensor:
    """A weight matrix (K, G*H) as the kernels read it: panel after panel, (H/8, K, 8G)."""
    return panels(w, H, slots).transpose(0, 1).contiguous()


def backward_panels(u: Tensor) -> Tensor:
    """U (K, H) in panels of 32 output units, panel after panel: (H//32, K, 32) flattened, then the
    last H % 32 units (a multiple of 8) as one narrower panel (K, H % 32)."""
    K, H = u.shape
    full = H // 32 * 32
    parts = [u[:, :full].reshape(K, H // 32, 32).permute(1, 0, 2).reshape(-1)]
    if full < H:
        parts.append(u[:, full:].reshape(-1))
    return torch.cat(parts).contiguous()


def int8_rows(w: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Rounding to int8 with one scale per row: the rows are the slices along every dimension but
    ``dim`` (the one summed over in a product). q (int8) and s (float32, ``dim`` kept as 1) with
    w ~ q * s, |q| <= 127; s is max |row| / 127 (1 for a row of zeros)."""
    s = w.abs().amax(dim=dim, keepdim=True) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(w / s).clamp_(-127, 127).to(torch.int8), s.float()


def int8_rounded(w: Tensor, dim: int = -1) -> Tensor:
    """w as the int8 step sees it: rounded to int8 with a scale per row (see int8_rows), in w's type."""
    q, s = int8_rows(w, dim)
    return (q.float() * s).to(w.dtype)


def paired(panels_: Tensor) -> Tensor:
    """Panels (P, K, W) of int8 with their rows in pairs, (P, K/2, W, 2): the layout of the int8
    product (csrc/panels.c), which multiplies two rows of a column by two inputs at once. K is even."""
    P, K, W = panels_.shape
    return panels_.reshape(P, K // 2, 2, W).transpose(-1, -2).contiguous()


class Packed:
    """Weight matrices (K, G*H) in the step's panels and one type (fp32, fp16 or int8 with a scale per
    column, that is per row of torch's (out, in) matrix), kept alive with their C `Mat`s."""

    def __init__(self, precision: str):
        self.precision = precision
        self.keep: list[Tensor] = []

    def mat(self, w: Tensor | None, H: int) -> Mat:
        """The Mat of w (K, G*H) in panels of 8 units (H/8, K, 8G); an empty Mat for None."""
        if w is None:
            return Mat()
        G = w.shape[1] // H
        if self.precision == "int8":
            q, s = int8_rows(w, dim=0)                                  # one scale per column of w
            data, scale = paired(panel_major(q, H)), panels(s, H).reshape(H // 8, 8 * G).contiguous()   # (H/8, 8G)
        else:
            data = panel_major(w, H).to(torch.float16 if self.precision == "fp16" else torch.float32)
            scale = None
        self.keep += [data] + ([scale] if scale is not None else [])
        return Mat(data.data_ptr(), None if scale is None else scale.data_ptr())

    def columns(self, w: Tensor) -> Mat:
        """The Mat of w (K, N), N a multiple of 32, in panels of 32 columns (N/32, K, 32) (the head)."""
        K, N = w.shape
        if self.precision == "int8":
            q, s = int8_rows(w, dim=0)
            data, scale = paired(q.view(K, N // 32, 32).transpose(0, 1)), s.reshape(N).contiguous()
        else:
            wt = torch.float16 if self.precision == "fp16" else torch.float32
            data, scale = w.view(K, N // 32, 32).transpose(0, 1).contiguous().to(wt), None
        self.keep += [data] + ([scale] if scale is not None else [])
        return Mat(data.data_ptr(), None if scale is None else scale.data_ptr())

    def mats(self, ws: list, H: int) -> ctypes.Array:
        """A C array of Mats, one per layer (empty where an entry is None)."""
        return (Mat * len(ws))(*[self.mat(w, H) for w in ws])


def pointers(tensors: list) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for None)."""
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()

"""Weights laid out as the kernels read them: gate blocks grouped in panels of 8 (or 32) units."""

from __future__ import annotations

import ctypes
from typing import Optional

from torch import Tensor


def panels(w: Tensor, H: int, slots: Optional[tuple] = None) -> Tensor:
    """The G gate blocks (each H columns) of w (..., G*H), in `slots` order if given, grouped in
    panels of 8 units: (..., H/8, 8G)."""
    lead, G = w.shape[:-1], w.shape[-1] // H
    blocks = w.reshape(*lead, G, H // 8, 8)
    if slots is not None:
        blocks = blocks[..., list(slots), :, :]
    return blocks.transpose(-3, -2).reshape(*lead, H // 8, 8 * G)


def panel_major(w: Tensor, H: int, slots: Optional[tuple] = None) -> Tensor:
    """A weight matrix (K, G*H) as the kernels read it: panel after panel, (H/8, K, 8G)."""
    return panels(w, H, slots).transpose(0, 1).contiguous()


def backward_panels(u: Tensor) -> Tensor:
    """U (K, H) in panels of 32 output units: (H/32, K, 32)."""
    K, H = u.shape
    return u.reshape(K, H // 32, 32).permute(1, 0, 2).contiguous()


def pointers(tensors: list) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for None)."""
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()

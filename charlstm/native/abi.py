"""The C side's structs and cell kinds as ctypes sees them (csrc/sample_step.c, csrc/train_loops.c)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

# csrc/simd.h's enum of cell kinds
KINDS = {"lstm": 0, "peephole": 1, "coupled": 2, "gru": 3, "rnn": 4, "gru_cho": 5}


@dataclass(frozen=True)
class Kernel:
    """What the training loops need to run a cell: its kind and its panel slots."""

    kind: str                  # a key of KINDS
    slots: tuple[int, ...]     # which of the cell's gate blocks goes to each slot of a panel (sigmoid gates first)

    @property
    def code(self) -> int:
        return KINDS[self.kind]


class Net(ctypes.Structure):
    """The C struct `Net` (csrc/sample_step.c): a model for the sampling step."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "L", "H", "V", "B", "half", "threads")),
                ("table", ctypes.c_void_p), ("w", ctypes.c_void_p), ("wh", ctypes.c_void_p), ("b", ctypes.c_void_p),
                ("bh", ctypes.c_void_p), ("peep", ctypes.c_void_p),
                *((name, ctypes.c_void_p) for name in ("table2", "w2", "wh2", "b2", "aux")),
                ("head_w", ctypes.c_void_p), ("head_b", ctypes.c_void_p),
                ("z", ctypes.c_void_p), ("c", ctypes.c_void_p), ("logits", ctypes.c_void_p),
                ("hnew", ctypes.c_void_p)]


class Seq(ctypes.Structure):
    """The C struct `Seq` (csrc/train_loops.c): one layer's window for the training loops."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "T", "B", "H", "threads")),
                *((name, ctypes.c_void_p) for name in ("gates", "wf", "wb", "bh", "peep", "hs", "cs", "tcs", "dhs",
                                                        "dpre", "dph", "dh", "dc", "wf2", "wb2", "rh", "drh"))]


def declare(lib: ctypes.CDLL) -> None:
    """Give the library's entry points their argument types."""
    lib.charlstm_step.argtypes = [ctypes.POINTER(Net), ctypes.c_void_p]
    lib.charlstm_step.restype = None
    lib.charlstm_generate.argtypes = [ctypes.POINTER(Net), ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                      ctypes.c_void_p]
    lib.charlstm_generate.restype = None
    for name in ("charlstm_rnn_forward", "charlstm_rnn_backward"):
        getattr(lib, name).argtypes = [ctypes.POINTER(Seq)]
        getattr(lib, name).restype = None

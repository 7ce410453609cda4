"""The C side's structs, cell kinds and weight types as ctypes sees them (csrc/charlstm.h), and the
check that a loaded library agrees with them (csrc/abi.c): a library that does not is never called."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

VERSION = 2                # CHARLSTM_ABI of csrc/charlstm.h

# csrc/charlstm.h's enum of cell kinds, in order
KINDS = {"lstm": 0, "peephole": 1, "coupled": 2, "gru": 3, "rnn": 4, "gru_cho": 5, "peephole_full": 6}
# its enum of weight types (the sampling step's --precision)
PRECISIONS = {"fp32": 0, "fp16": 1, "int8": 2}
GATES = {"lstm": 4, "peephole": 4, "coupled": 3, "gru": 3, "rnn": 1, "gru_cho": 3, "peephole_full": 4}
# Which of the cell's gate blocks sits in each slot of a training loop's panel: the sigmoid gates first.
LOOP_SLOTS = {"lstm": (0, 1, 3, 2), "peephole": (0, 1, 3, 2), "peephole_full": (0, 1, 3, 2), "coupled": (0, 2, 1),
              "gru": (0, 1, 2), "gru_cho": (0, 1, 2), "rnn": (0,)}


@dataclass(frozen=True)
class Kernel:
    """What the training loops need to run a cell: its kind and its panel slots."""

    kind: str                  # a key of KINDS
    slots: tuple[int, ...]     # which of the cell's gate blocks goes to each slot of a panel (sigmoid gates first)

    @property
    def code(self) -> int:
        return KINDS[self.kind]

    @property
    def gates(self) -> int:
        return len(self.slots)

    @classmethod
    def of(cls, kind: str) -> Kernel:
        """The kernel of a kind, with the slots the C loops expect."""
        return cls(kind, LOOP_SLOTS[kind])


class Mat(ctypes.Structure):
    """The C struct `Mat`: a weight matrix in panels and, for int8, its column scales."""

    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p)]


class Net(ctypes.Structure):
    """The C struct `Net` (csrc/charlstm.h): a model for the sampling step."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "L", "H", "V", "B", "precision", "threads",
                                                       "reserved")),
                *((name, ctypes.c_void_p) for name in ("table", "table2", "w", "wh", "w2", "wh2", "pif", "po",
                                                        "b", "bh", "b2", "peep")),
                ("head", Mat), ("head_b", ctypes.c_void_p),
                *((name, ctypes.c_void_p) for name in ("aux", "z", "c", "logits", "hnew"))]


class Seq(ctypes.Structure):
    """The C struct `Seq` (csrc/charlstm.h): one layer's window for the training loops."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "T", "B", "H", "threads", "units")),
                *((name, ctypes.c_void_p) for name in ("gates", "wf", "wb", "bh", "peep", "hs", "cs", "tcs", "dhs",
                                                        "dpre", "dph", "dh", "dc", "wf2", "wb2", "rh", "drh",
                                                        "pf", "po", "pbf", "pbo"))]


STRUCTS = (Mat, Net, Seq)             # in the order of abi.c's charlstm_field
ENTRY_POINTS = ("charlstm_step", "charlstm_generate", "charlstm_rnn_forward", "charlstm_rnn_backward")
ERRORS = {1: "a bad cell kind or weight type", 2: "bad sizes", 3: "a missing array", 4: "a character id out of range"}


def _names(lib: ctypes.CDLL, fn_name: str) -> list[str]:
    fn = getattr(lib, fn_name)
    fn.argtypes, fn.restype = [ctypes.c_int32], ctypes.c_char_p
    out = []
    while (name := fn(len(out))) is not None and len(out) < 64:
        out.append(name.decode())
    return out


def _fields(lib: ctypes.CDLL, which: int) -> list[tuple[str | None, int]]:
    """(name, offset) of every field of struct `which` as C lays it out, then (None, its size)."""
    fn = lib.charlstm_field
    fn.argtypes, fn.restype = [ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64)], ctypes.c_char_p
    out, offset = [], ctypes.c_int64()
    for i in range(256):
        name = fn(which, i, ctypes.byref(offset))
        out.append((None if name is None else name.decode(), offset.value))
        if name is None:
            break
    return out


def c_slots(lib: ctypes.CDLL, table: int, kind: str) -> tuple[int, ...]:
    """The C side's slot table of a kind: table 0 the training loops', 1 the sampling step's."""
    fn = lib.charlstm_slot
    fn.argtypes, fn.restype = [ctypes.c_int32] * 3, ctypes.c_int32
    return tuple(b for s in range(8) if (b := fn(table, KINDS[kind], s)) >= 0)


def mismatch(lib: ctypes.CDLL) -> str | None:
    """What the library disagrees with this module about (None: nothing). Reads only abi.c's constant
    tables, never a kernel."""
    try:
        lib.charlstm_abi_version.restype = ctypes.c_int32
        version = lib.charlstm_abi_version()
        if version != VERSION:
            return f"ABI version {version}, charlstm expects {VERSION}"
        for names, expected in ((_names(lib, "charlstm_kind_name"), list(KINDS)),
                                (_names(lib, "charlstm_precision_name"), list(PRECISIONS))):
            if names != expected:
                return f"names {names}, charlstm expects {expected}"
        for which, struct in enumerate(STRUCTS):
            ours = ([(name, getattr(struct, name).offset) for name, _ in struct._fields_]
                    + [(None, ctypes.sizeof(struct))])
            if _fields(lib, which) != ours:
                return f"struct {struct.__name__} laid out as {_fields(lib, which)}, charlstm expects {ours}"
        for kind, slots in LOOP_SLOTS.items():
            if c_slots(lib, 0, kind) != slots:
                return f"the training loops' slots of {kind} are {c_slots(lib, 0, kind)}, charlstm expects {slots}"
        for name in ENTRY_POINTS:
            getattr(lib, name)
    except AttributeError as e:
        return f"a missing symbol ({e})"
    return None


def declare(lib: ctypes.CDLL) -> None:
    """Give the library's entry points their argument types."""
    lib.charlstm_step.argtypes = [ctypes.POINTER(Net), ctypes.c_void_p]
    lib.charlstm_generate.argtypes = [ctypes.POINTER(Net), ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                      ctypes.c_void_p]
    for name in ("charlstm_rnn_forward", "charlstm_rnn_backward"):
        getattr(lib, name).argtypes = [ctypes.POINTER(Seq)]
    for name in ENTRY_POINTS:
        getattr(lib, name).restype = ctypes.c_int

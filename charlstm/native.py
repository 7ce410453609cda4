"""Native kernels: C in ``csrc/``, compiled on first use and called through ctypes.

Two things run faster in C than as a chain of torch operations, because torch
pays a few microseconds to start every operation:

- **sampling** (``csrc/sample_step.c``, :class:`NativeStep`; every variant but the
  peephole's full form): one stream reads every weight once
  per character, so generating text is bound by how fast the weights stream from
  cache plus what each operation costs (docs/sampling.md).
  The C step does a whole chunk of characters (every layer, the head and the
  Gumbel-max choice) in one call, and can keep the weights as float16;
- **the time loops of training** (``csrc/train_loops.c``, :func:`recurrent_forward`,
  :func:`recurrent_backward`, called by fused.py) for the lstm, peephole (diag),
  coupled, gru (both forms) and rnn layers: each step's pointwise work happens in
  registers right after its recurrent product (docs/performance.md).

Both are optional speed-ups, never requirements: they run where the machine is
x86-64 with AVX2, FMA and F16C, a C compiler (``$CC``, else ``cc``) is on the
PATH, and the model or layer is float32 on the CPU with a suitable H (a multiple
of 8 for sampling, of 32 for training) and form; sampling also needs plain
temperature or greedy choice (top-k and top-p use the torch step). Anything else, or
``CHARLSTM_NO_NATIVE=1``, takes the torch code, which computes the same thing.
The library is compiled once per version of the sources into
``$XDG_CACHE_HOME/charlstm`` (default ``~/.cache/charlstm``), written
atomically; compiling takes about two seconds.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .errors import UsageError

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("sample_step.c", "train_loops.c")             # compiled into one library with the headers beside them
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared"]
OPENMP = "-fopenmp"     # threads share out each step; without OpenMP the library is built single-threaded
PRECISIONS = ("fp32", "fp16")
KINDS = {"lstm": 0, "peephole": 1, "coupled": 2, "gru": 3, "rnn": 4, "gru_cho": 5}   # csrc/simd.h's enum

_LIB: dict = {}


class _Net(ctypes.Structure):
    """The C struct `Net` (see csrc/sample_step.c)."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "L", "H", "V", "B", "half", "threads")),
                ("table", ctypes.c_void_p), ("w", ctypes.c_void_p), ("wh", ctypes.c_void_p), ("b", ctypes.c_void_p),
                ("bh", ctypes.c_void_p), ("peep", ctypes.c_void_p),
                *((name, ctypes.c_void_p) for name in ("table2", "w2", "wh2", "b2", "aux")),
                ("head_w", ctypes.c_void_p), ("head_b", ctypes.c_void_p),
                ("z", ctypes.c_void_p), ("c", ctypes.c_void_p), ("logits", ctypes.c_void_p),
                ("hnew", ctypes.c_void_p)]


class _Seq(ctypes.Structure):
    """The C struct `Seq` (see csrc/train_loops.c)."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "T", "B", "H", "threads")),
                *((name, ctypes.c_void_p) for name in ("gates", "wf", "wb", "bh", "peep", "hs", "cs", "tcs", "dhs",
                                                        "dpre", "dph", "dh", "dc", "wf2", "wb2", "rh", "drh"))]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "charlstm"


def _build(cc: str, flags: list[str]) -> tuple[Optional[Path], str]:
    """Compile the sources with these flags into the cache (once per version of the sources and flags):
    its path, or None and why."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    target = _cache_dir() / f"charlstm-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target, "cached"
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        done = subprocess.run([cc, *flags, "-o", tmp, *(str(CSRC / name) for name in SOURCES)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            os.unlink(tmp)
            return None, f"compiling {', '.join(SOURCES)} failed: {done.stderr.strip()[:300]}"
        os.replace(tmp, target)          # atomic: a concurrent run sees no file or the whole file
    except (OSError, subprocess.SubprocessError) as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return None, f"cannot compile into {target.parent}: {e}"
    return target, "compiled"


def _compile() -> tuple[Optional[ctypes.CDLL], str]:
    """The compiled library, or None and why not."""
    if os.environ.get("CHARLSTM_NO_NATIVE", "") not in ("", "0"):
        return None, "turned off by CHARLSTM_NO_NATIVE"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None, "no C compiler (set $CC or install cc)"
    target, why, threaded = None, "", False
    for flags in ([*FLAGS, OPENMP], FLAGS):
        target, why = _build(cc, flags)
        if target is not None:
            threaded = OPENMP in flags
            break
    if target is None:
        return None, why
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"cannot load {target}: {e}"
    lib.charlstm_step.argtypes = [ctypes.POINTER(_Net), ctypes.c_void_p]
    lib.charlstm_step.restype = None
    lib.charlstm_generate.argtypes = [ctypes.POINTER(_Net), ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                      ctypes.c_void_p]
    lib.charlstm_generate.restype = None
    for name in ("charlstm_rnn_forward", "charlstm_rnn_backward"):
        getattr(lib, name).argtypes = [ctypes.POINTER(_Seq)]
        getattr(lib, name).restype = None
    return lib, "ready" + ("" if threaded else " (built without OpenMP: one thread)")


def library() -> tuple[Optional[ctypes.CDLL], str]:
    """The native library (compiled on first use) and a word on it: 'ready' (and how it was built)
    or why it is unavailable."""
    if "lib" not in _LIB:
        _LIB["lib"], _LIB["why"] = _compile()
    return _LIB["lib"], _LIB["why"]


def unsupported(model) -> Optional[str]:
    """Why the native step cannot run this model (None: it can)."""
    cfg = model.cfg
    w = model.head.weight
    if cfg.variant == "peephole" and cfg.peephole_form == "full":
        return "the native step has no peephole lstm in the full form"
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return "the native step runs float32 models on the CPU"
    if cfg.hidden % 8:
        return f"the native step needs a hidden size that is a multiple of 8 (this is {cfg.hidden})"
    return None


def _panels(w: Tensor, H: int, slots: Optional[list] = None) -> Tensor:
    """The G gate blocks (each H columns) of w (..., G*H), in `slots` order if given, grouped in
    panels of 8 units: (..., H/8, 8G)."""
    lead, G = w.shape[:-1], w.shape[-1] // H
    blocks = w.reshape(*lead, G, H // 8, 8)
    if slots is not None:
        blocks = blocks[..., slots, :, :]
    return blocks.transpose(-3, -2).reshape(*lead, H // 8, 8 * G)


def _panel_major(w: Tensor, H: int, slots: Optional[list] = None) -> Tensor:
    """A weight matrix (K, G*H) as the kernels read it: panel after panel, (H/8, K, 8G)."""
    return _panels(w, H, slots).transpose(0, 1).contiguous()


def _pointers(tensors: list) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


class NativeStep:
    """The sampling step of ``csrc/sample_step.c``, built from a :class:`FastStep`'s tensors (its
    gate order: lstm i, f, o, g; peephole i, f, g, o; coupled f, o, g; the grus r, z, n).

    Same interface as the torch steppers (``load_state``, ``get_state``,
    ``advance``, ``generate``). With ``precision='fp16'`` the weight matrices
    are rounded to float16 (the table of layer 0, the biases and the peepholes stay float32).
    """

    native = True

    def __init__(self, model, precision: str = "fp32"):
        from .sample import FastStep

        if precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        why = unsupported(model)
        if why:
            raise UsageError(why)
        lib, word = library()
        if lib is None:
            raise UsageError(f"the native step is unavailable: {word}")
        self.lib, self.precision = lib, precision
        self.name = f"native step ({precision})"
        fast = FastStep(model, script=False)               # weights in the fast step's layout and gate order
        self.kind, H, L = fast.kind, fast.H, fast.L
        self.H, self.L, self.V, self.has_c = H, L, fast.head_w.shape[1], fast.has_c
        gru = self.kind == "gru"
        wt = torch.float16 if precision == "fp16" else torch.float32

        def panel_major(w: Tensor) -> Tensor:                # (K, G*H) -> (H/8, K, 8G), in the weights' type
            return _panel_major(w, H).to(wt)

        layers = fast.layers
        self.table = _panels(fast.table, H).contiguous()                           # (V, H/8, 8G)
        self.table2, self.weights2, self.recurrent2, self.biases2 = None, [], [], []
        if self.kind == "gru_cho":   # r, z apart from n (U_n multiplies r * h): two products a layer
            rz, nb = slice(0, 2 * H), slice(2 * H, 3 * H)
            self.table, self.table2 = (_panels(fast.table[:, c], H).contiguous() for c in (rz, nb))
            self.weights = [None] + [panel_major(layers[k][0][:, rz]) for k in range(1, L)]
            self.weights2 = [None] + [panel_major(layers[k][0][:, nb]) for k in range(1, L)]
            self.recurrent = [panel_major(layers[k][2]) for k in range(L)]          # U_rz^T (H, 2H)
            self.recurrent2 = [panel_major(layers[k][4]) for k in range(L)]         # U_n^T (H, H)
            self.recurrent_biases = []
            self.biases2 = [None] + [_panels(layers[k][1][nb], H).contiguous() for k in range(1, L)]
        elif gru:    # input and recurrent weights apart; layer 0's input part is the table
            self.weights = [None] + [panel_major(layers[k][0]) for k in range(1, L)]
            self.recurrent = [panel_major(layers[k][2]) for k in range(L)]
            self.recurrent_biases = [_panels(layers[k][3], H).contiguous() for k in range(L)]
        else:        # layer 0: U; above: the stacked [W; U]
            self.weights = [panel_major(layers[0][2])] + [panel_major(layers[k][0]) for k in range(1, L)]
            self.recurrent, self.recurrent_biases = [], []
        cut = slice(0, 2 * H) if self.kind == "gru_cho" else slice(None)
        self.biases = [None] + [_panels(layers[k][1][cut], H).contiguous() for k in range(1, L)]
        self.peepholes = []
        if self.kind == "peephole":  # (3, H) p_i, p_f, p_o per layer, zeros for a gate without one
            self.peepholes = [torch.stack([t if t.numel() else torch.zeros(H) for t in layers[k][4:7]]).contiguous()
                              for k in range(L)]
        Vp = -(-self.V // 32) * 32
        head_w = torch.zeros(H, Vp)
        head_w[:, :self.V] = fast.head_w
        self.head_w = head_w.view(H, Vp // 32, 32).transpose(0, 1).contiguous().to(wt)   # (Vp/32, H, 32)
        self.head_b = torch.zeros(Vp)
        self.head_b[:self.V] = fast.head_b
        self._ptrs = {name: _pointers(getattr(self, name)) if getattr(self, name) else None
                      for name in ("weights", "recurrent", "biases", "recurrent_biases", "peepholes",
                                   "weights2", "recurrent2", "biases2")}
        self.z = torch.empty(0)

    # ------------------------------------------------------------------ state
    def load_state(self, state) -> None:
        """Continue from a model State (h (L, B, H), c (L, B, H) or None)."""
        L, B, H = state.h.shape
        self.B = B
        self.z = state.h.float().permute(1, 0, 2).reshape(B, L * H).contiguous()   # (B, L*H)
        self.c = (state.c.float().contiguous().clone() if self.has_c                # (L, B, H)
                  else torch.zeros(L, B, H))
        self.logits = torch.zeros(B, self.V)
        self.hnew = torch.empty(B, H)
        self.aux = torch.empty(2, B, H)                                            # the cho gru's scratch
        ptr = {name: (ctypes.addressof(a) if a is not None else None) for name, a in self._ptrs.items()}
        self.net = _Net(kind=KINDS[self.kind], L=self.L, H=self.H, V=self.V, B=B,
                        half=int(self.precision == "fp16"), table=self.table.data_ptr(), w=ptr["weights"],
                        wh=ptr["recurrent"], b=ptr["biases"], bh=ptr["recurrent_biases"], peep=ptr["peepholes"],
                        table2=None if self.table2 is None else self.table2.data_ptr(), w2=ptr["weights2"],
                        wh2=ptr["recurrent2"], b2=ptr["biases2"], aux=self.aux.data_ptr(),
                        head_w=self.head_w.data_ptr(), head_b=self.head_b.data_ptr(), z=self.z.data_ptr(),
                        c=self.c.data_ptr(), logits=self.logits.data_ptr(), hnew=self.hnew.data_ptr())

    def get_state(self):
        """The current state as a model State."""
        from .model import State

        B = self.z.shape[0]
        h = self.z.view(B, self.L, self.H).transpose(0, 1).contiguous()
        return State(h, self.c.clone() if self.has_c else None)

    # ------------------------------------------------------------------ steps
    def advance(self, x: Tensor) -> Tensor:
        """Feed characters x (B,) and return the logits (B, V) of the next ones."""
        x = x.to(torch.int64).contiguous()
        self.net.threads = torch.get_num_threads()
        self.lib.charlstm_step(ctypes.byref(self.net), x.data_ptr())
        return self.logits.clone()

    def generate(self, logits: Tensor, n: int, opts, generator) -> tuple[Tensor, Tensor]:
        """n characters per stream from the pending logits (B, V): ids (n, B) and the logits after them.
        Temperature and greedy only (top-k and top-p take the torch step)."""
        from .sample import gumbel_noise

        if opts.top_k or opts.top_p < 1.0:
            raise UsageError("the native step samples with temperature or greedily; top-k and top-p use the torch step")
        self.logits.copy_(logits)
        ids = torch.empty(n, self.B, dtype=torch.int64)
        noise = None if opts.greedy else gumbel_noise(n, self.B, self.V, generator, self.logits.device).contiguous()
        self.net.threads = torch.get_num_threads()
        self.lib.charlstm_generate(ctypes.byref(self.net), n, None if noise is None else noise.data_ptr(),
                                   1.0 / opts.temperature, ids.data_ptr())
        return ids, self.logits.clone()


# --------------------------------------------------------------------------- training: a layer's time loops

# Which of torch's gate blocks goes to each slot of a panel (csrc/train_loops.c's slot_block):
# the sigmoid gates first (lstm and peephole i, f, o, g; coupled f, o, g).
SLOTS = {"lstm": [0, 1, 3, 2], "peephole": [0, 1, 3, 2], "coupled": [0, 2, 1], "gru": [0, 1, 2], "rnn": [0],
         "gru_cho": [0, 1, 2]}


def trains(x: Tensor, w_hh: Tensor) -> bool:
    """Whether the native loops can run a layer over input x with recurrent weights w_hh:
    float32 on the CPU, H a multiple of 32, the library available (else fused.py's torch loops)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w_hh.dtype == torch.float32
            and w_hh.shape[1] % 32 == 0 and library()[0] is not None)


def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def _backward_panels(u: Tensor) -> Tensor:
    """U (K, H) in panels of 32 output units: (H/32, K, 32)."""
    K, H = u.shape
    return u.reshape(K, H // 32, 32).permute(1, 0, 2).contiguous()


def recurrent_forward(kind: str, gates: Tensor, w_hh: Tensor, hs: Tensor, cs: Optional[Tensor], tcs: Optional[Tensor],
                      b_hh: Optional[Tensor] = None, peep: Optional[Tensor] = None,
                      rh: Optional[Tensor] = None) -> None:
    """The forward time loop of a `kind` layer (see csrc/train_loops.c): gates (T, B, G*H) holds
    W x_t + b and receives the activated gates (torch's order); hs, cs (T + 1, B, H) hold h0, c0
    in row 0 and receive the rest (cs None for the grus and the rnn); tcs (T, B, H) receives
    tanh(c_t), for the gru U_n h + b_hn (None for the rnn and the cho gru). b_hh: the gru's
    recurrent bias; peep: the peephole weights (3, H); rh (T, B, H): receives the cho gru's
    r * h_{t-1}. Every tensor contiguous float32."""
    T, B, GH = gates.shape
    G = len(SLOTS[kind])
    H = GH // G
    u_t = w_hh.detach().t()                                                   # (H, G*H)
    wf2 = None
    if kind == "gru_cho":      # two products per step: U_rz h, then U_n (r h)
        wf, wf2 = _panel_major(u_t[:, :2 * H], H), _panel_major(u_t[:, 2 * H:], H)
    else:
        wf = _panel_major(u_t, H, SLOTS[kind])
    bh = None if b_hh is None else b_hh.detach().contiguous()                 # kept alive through the call
    pp = None if peep is None else peep.detach().contiguous()
    seq = _Seq(kind=KINDS[kind], T=T, B=B, H=H, threads=torch.get_num_threads(), gates=_ptr(gates),
               wf=_ptr(wf), wf2=_ptr(wf2), bh=_ptr(bh), peep=_ptr(pp), hs=_ptr(hs), cs=_ptr(cs), tcs=_ptr(tcs),
               rh=_ptr(rh))
    library()[0].charlstm_rnn_forward(ctypes.byref(seq))


def recurrent_backward(kind: str, gates: Tensor, w_hh: Tensor, hs: Tensor, cs: Optional[Tensor],
                       tcs: Optional[Tensor], dhs: Tensor, dpre: Tensor, dh: Tensor, dc: Optional[Tensor],
                       dph: Optional[Tensor] = None, peep: Optional[Tensor] = None) -> None:
    """The backward time loop of a `kind` layer, from what the forward left in gates, hs, cs and
    tcs and the gradients dhs (T, B, H) arriving at each output: dpre (T, B, G*H) receives the
    gradients of the pre-activations W x_t + b (and dph those of U h + b_hh, gru); dh (B, H),
    zeros on entry, receives the gradient of h0; dc (B, H), the gradient of c_T on entry,
    receives that of c0 (scratch for the grus, None for the rnn). Every tensor contiguous float32."""
    T, B, GH = gates.shape
    H = GH // len(SLOTS[kind])
    u = w_hh.detach()
    wb2 = drh = None
    if kind == "gru_cho":
        wb, wb2 = _backward_panels(u[:2 * H]), _backward_panels(u[2 * H:])
        drh = gates.new_empty(B, H)
    else:
        wb = _backward_panels(u)
    pp = None if peep is None else peep.detach().contiguous()
    seq = _Seq(kind=KINDS[kind], T=T, B=B, H=H, threads=torch.get_num_threads(), gates=_ptr(gates),
               wb=_ptr(wb), wb2=_ptr(wb2), peep=_ptr(pp), hs=_ptr(hs), cs=_ptr(cs), tcs=_ptr(tcs), dhs=_ptr(dhs),
               dpre=_ptr(dpre), dph=_ptr(dph), dh=_ptr(dh), dc=_ptr(dc), drh=_ptr(drh))
    library()[0].charlstm_rnn_backward(ctypes.byref(seq))

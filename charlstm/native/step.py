"""The sampling step in C (csrc/sample_step.c): a chunk of characters per call, every layer, the
head and the Gumbel-max choice, with float32 or float16 weights (docs/sampling.md)."""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from ..errors import UsageError
from ..model import State
from ..stepweights import StepWeights, step_weights
from .abi import KINDS, Net
from .build import library
from .pack import panel_major, panels, pointers

PRECISIONS = ("fp32", "fp16")
WIDTH = 8      # the step takes H in multiples of this


def unsupported(model) -> Optional[str]:
    """Why the native step cannot run this model (None: it can)."""
    w = model.head.weight
    if model.spec.step not in KINDS or (model.cfg.variant == "peephole" and model.cfg.peephole_form == "full"):
        return f"the native step has no {model.spec.name} cell"
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return "the native step runs float32 models on the CPU"
    if model.cfg.hidden % WIDTH:
        return f"the native step needs a hidden size that is a multiple of {WIDTH} (this is {model.cfg.hidden})"
    return None


class _Packed:
    """A model's step weights in the C step's panels: fp32, or fp16 weight matrices."""

    def __init__(self, sw: StepWeights, precision: str):
        H, L, layers = sw.H, sw.L, sw.layers
        wt = torch.float16 if precision == "fp16" else torch.float32

        def major(w: Tensor) -> Tensor:                      # (K, G*H) -> (H/8, K, 8G), in the weights' type
            return panel_major(w, H).to(wt)

        self.table, self.table2 = panels(sw.table, H).contiguous(), None                # (V, H/8, 8G)
        self.weights2, self.recurrent2, self.biases2, self.recurrent_biases = [], [], [], []
        if sw.kind == "gru_cho":   # r, z apart from n (U_n multiplies r * h): two products a layer
            rz, nb = slice(0, 2 * H), slice(2 * H, 3 * H)
            self.table, self.table2 = (panels(sw.table[:, c], H).contiguous() for c in (rz, nb))
            self.weights = [None] + [major(layers[k][0][:, rz]) for k in range(1, L)]
            self.weights2 = [None] + [major(layers[k][0][:, nb]) for k in range(1, L)]
            self.recurrent = [major(layers[k][2]) for k in range(L)]                 # U_rz^T (H, 2H)
            self.recurrent2 = [major(layers[k][4]) for k in range(L)]                # U_n^T (H, H)
            self.biases2 = [None] + [panels(layers[k][1][nb], H).contiguous() for k in range(1, L)]
        elif sw.kind == "gru":     # input and recurrent weights apart; layer 0's input part is the table
            self.weights = [None] + [major(layers[k][0]) for k in range(1, L)]
            self.recurrent = [major(layers[k][2]) for k in range(L)]
            self.recurrent_biases = [panels(layers[k][3], H).contiguous() for k in range(L)]
        else:                      # layer 0: U; above: the stacked [W; U]
            self.weights = [major(layers[0][2])] + [major(layers[k][0]) for k in range(1, L)]
            self.recurrent = []
        cut = slice(0, 2 * H) if sw.kind == "gru_cho" else slice(None)
        self.biases = [None] + [panels(layers[k][1][cut], H).contiguous() for k in range(1, L)]
        self.peepholes = []
        if sw.kind == "peephole":  # (3, H) p_i, p_f, p_o per layer, zeros for a gate without one
            self.peepholes = [torch.stack([t if t.numel() else torch.zeros(H) for t in layers[k][4:7]]).contiguous()
                              for k in range(L)]
        V = sw.head_w.shape[1]
        Vp = -(-V // 32) * 32
        head_w = torch.zeros(H, Vp)
        head_w[:, :V] = sw.head_w
        self.head_w = head_w.view(H, Vp // 32, 32).transpose(0, 1).contiguous().to(wt)   # (Vp/32, H, 32)
        self.head_b = torch.zeros(Vp)
        self.head_b[:V] = sw.head_b
        self.arrays = {name: pointers(getattr(self, name)) if getattr(self, name) else None
                       for name in ("weights", "recurrent", "biases", "recurrent_biases", "peepholes",
                                    "weights2", "recurrent2", "biases2")}


class NativeStep:
    """The C sampling step, with the torch steppers' interface (``load_state``, ``get_state``,
    ``advance``, ``generate``). With ``precision='fp16'`` the weight matrices are rounded to
    float16 (the table of layer 0, the biases and the peepholes stay float32)."""

    native = True

    def __init__(self, model, precision: str = "fp32"):
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
        sw = step_weights(model)
        self.kind, self.H, self.L, self.V, self.has_c = sw.kind, sw.H, sw.L, sw.head_w.shape[1], sw.has_c
        self.packed = _Packed(sw, precision)
        self.z = torch.empty(0)

    def load_state(self, state: State) -> None:
        """Continue from a model State (h (L, B, H), c (L, B, H) or None)."""
        L, B, H = state.h.shape
        self.B = B
        self.z = state.h.float().permute(1, 0, 2).reshape(B, L * H).contiguous()   # (B, L*H)
        self.c = (state.c.float().contiguous().clone() if self.has_c                # (L, B, H)
                  else torch.zeros(L, B, H))
        self.logits = torch.zeros(B, self.V)
        self.hnew = torch.empty(B, H)
        self.aux = torch.empty(2, B, H)                                            # the cho gru's scratch
        p = self.packed
        ptr = {name: (ctypes.addressof(a) if a is not None else None) for name, a in p.arrays.items()}
        self.net = Net(kind=KINDS[self.kind], L=self.L, H=self.H, V=self.V, B=B,
                       half=int(self.precision == "fp16"), table=p.table.data_ptr(), w=ptr["weights"],
                       wh=ptr["recurrent"], b=ptr["biases"], bh=ptr["recurrent_biases"], peep=ptr["peepholes"],
                       table2=None if p.table2 is None else p.table2.data_ptr(), w2=ptr["weights2"],
                       wh2=ptr["recurrent2"], b2=ptr["biases2"], aux=self.aux.data_ptr(),
                       head_w=p.head_w.data_ptr(), head_b=p.head_b.data_ptr(), z=self.z.data_ptr(),
                       c=self.c.data_ptr(), logits=self.logits.data_ptr(), hnew=self.hnew.data_ptr())

    def get_state(self) -> State:
        """The current state as a model State."""
        B = self.z.shape[0]
        h = self.z.view(B, self.L, self.H).transpose(0, 1).contiguous()
        return State(h, self.c.clone() if self.has_c else None)

    def advance(self, x: Tensor) -> Tensor:
        """Feed characters x (B,) and return the logits (B, V) of the next ones."""
        x = x.to(torch.int64).contiguous()
        self.net.threads = torch.get_num_threads()
        self.lib.charlstm_step(ctypes.byref(self.net), x.data_ptr())
        return self.logits.clone()

    def generate(self, logits: Tensor, n: int, opts, noise: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """n characters per stream from the pending logits (B, V) and the chunk's noise (n, B, V) (None:
        greedy): ids (n, B) and the logits after them. Temperature and greedy only."""
        if opts.top_k or opts.top_p < 1.0:
            raise UsageError("the native step samples with temperature or greedily; top-k and top-p use the torch step")
        self.logits.copy_(logits)
        ids = torch.empty(n, self.B, dtype=torch.int64)
        noise = None if noise is None else noise.float().contiguous()
        self.net.threads = torch.get_num_threads()
        self.lib.charlstm_generate(ctypes.byref(self.net), n, None if noise is None else noise.data_ptr(),
                                   1.0 / opts.temperature, ids.data_ptr())
        return ids, self.logits.clone()

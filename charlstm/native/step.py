"""The sampling step in C (csrc/sample_step.c): a chunk of characters per call, every layer, the
head and the Gumbel-max choice, with float32, float16 or int8 weights (docs/sampling.md). Every
tensor and id is checked here before it reaches C (CharlstmError otherwise)."""

from __future__ import annotations

import ctypes
import dataclasses

import torch
from torch import Tensor

from ..errors import CharlstmError, UsageError
from ..model import State
from ..runtime import threads_for
from ..stepweights import StepWeights, step_weights
from .abi import ERRORS, GATES, KINDS, PRECISIONS, Net
from .build import library
from .pack import Packed, panels, pointers

WIDTH = 8      # the step takes H in multiples of this; other sizes are padded with units that stay zero


def unsupported(model) -> str | None:
    """Why the native step cannot run this model (None: it can)."""
    w = model.head.weight
    if model.spec.step not in KINDS:
        return f"the native step has no {model.spec.name} cell"
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return "the native step runs float32 models on the CPU"
    return None


def _pad(t: Tensor, H: int, Hp: int, dims: tuple[int, ...]) -> Tensor:
    """t with every block of H along each of ``dims`` widened to Hp by zeros."""
    if t.numel() == 0 or H == Hp:
        return t
    for d in dims:
        d = d % t.dim()
        blocks = t.unflatten(d, (t.shape[d] // H, H))
        out = blocks.new_zeros(*blocks.shape[:d + 1], Hp, *blocks.shape[d + 2:])
        out.narrow(d + 1, 0, H).copy_(blocks)
        t = out.flatten(d, d + 1)
    return t


def padded(sw: StepWeights, Hp: int) -> StepWeights:
    """The step weights of the same model with Hp >= H units a layer: the added units have zero weights
    and biases everywhere, so their h and c stay zero and the logits are unchanged."""
    H = sw.H
    layers = [[_pad(t, H, Hp, tuple(range(t.dim()))) for t in layer] for layer in sw.layers]
    return dataclasses.replace(sw, H=Hp, table=_pad(sw.table, H, Hp, (1,)), layers=layers,
                               head_w=_pad(sw.head_w, H, Hp, (0,)))


def _kind(sw: StepWeights) -> str:
    """The C kind: the step's, with the peephole's full form (matrices) told apart."""
    if sw.kind == "peephole" and any(t.dim() == 2 for layer in sw.layers for t in layer[4:7]):
        return "peephole_full"
    return sw.kind


class _Packed:
    """A model's step weights in the C step's panels and the chosen type, and the Net fields that
    point at them (kept alive here)."""

    def __init__(self, sw: StepWeights, kind: str, precision: str):
        H, L, lay = sw.H, sw.L, sw.layers
        self.pk = Packed(precision)
        self.table, self.table2 = panels(sw.table, H).contiguous(), None                 # (V, H/8, 8G)
        self.f: dict = dict(w=None, wh=None, w2=None, wh2=None, pif=None, po=None, bh=None, b2=None, peep=None)
        self.keep: list = []
        if kind == "gru_cho":
            self._cho_gru(sw)
        elif kind == "gru":
            self._gru(sw)
        else:                      # layer 0: U; above: the stacked [W; U]
            self.f["w"] = self.pk.mats([lay[0][2]] + [lay[k][0] for k in range(1, L)], H)
        cut = slice(0, 2 * H) if kind == "gru_cho" else slice(None)
        self.b = self._kept([None] + [panels(lay[k][1][cut], H).contiguous() for k in range(1, L)])
        if kind == "peephole":     # (3, H) p_i, p_f, p_o per layer, zeros for a gate without one
            diag = [torch.stack([t if t.numel() else torch.zeros(H) for t in lay[k][4:7]]) for k in range(L)]
            self.f["peep"] = self._kept([p.contiguous() for p in diag])
        if kind == "peephole_full":  # P_if^T (H, 2H) and P_o^T (H, H), zeros for a gate without one
            full = [[t if t.numel() else torch.zeros(H, H) for t in lay[k][4:7]] for k in range(L)]
            self.f["pif"] = self.pk.mats([torch.cat(p[:2], 1) for p in full], H)
            self.f["po"] = self.pk.mats([p[2] for p in full], H)
        self._head(sw)

    def _kept(self, tensors: list) -> ctypes.Array:
        """The C array of pointers to ``tensors`` (None: a null pointer), the tensors kept alive."""
        self.keep.append(tensors)
        return pointers(tensors)

    def _cho_gru(self, sw: StepWeights) -> None:
        """r, z apart from n (U_n multiplies r * h): two products a layer, two tables."""
        H, L, lay, pk = sw.H, sw.L, sw.layers, self.pk
        rz, nb = slice(0, 2 * H), slice(2 * H, 3 * H)
        self.table, self.table2 = (panels(sw.table[:, c], H).contiguous() for c in (rz, nb))
        self.f["w"] = pk.mats([None] + [lay[k][0][:, rz] for k in range(1, L)], H)
        self.f["w2"] = pk.mats([None] + [lay[k][0][:, nb] for k in range(1, L)], H)
        self.f["wh"] = pk.mats([lay[k][2] for k in range(L)], H)                  # U_rz^T (H, 2H)
        self.f["wh2"] = pk.mats([lay[k][4] for k in range(L)], H)                 # U_n^T (H, H)
        self.f["b2"] = self._kept([None] + [panels(lay[k][1][nb], H).contiguous() for k in range(1, L)])

    def _gru(self, sw: StepWeights) -> None:
        """Input and recurrent weights apart; layer 0's input part is the table."""
        H, L, lay, pk = sw.H, sw.L, sw.layers, self.pk
        self.f["w"] = pk.mats([None] + [lay[k][0] for k in range(1, L)], H)
        self.f["wh"] = pk.mats([lay[k][2] for k in range(L)], H)
        if lay[0][3].numel():
            self.f["bh"] = self._kept([panels(lay[k][3], H).contiguous() for k in range(L)])

    def _head(self, sw: StepWeights) -> None:
        """The head's weights in columns of 32 and its bias, V padded to a multiple of 32 with zeros."""
        H, V = sw.H, sw.head_w.shape[1]
        Vp = -(-V // 32) * 32
        head_w = torch.zeros(H, Vp)
        head_w[:, :V] = sw.head_w
        self.head = self.pk.columns(head_w)                                              # (Vp/32, H, 32)
        self.head_b = torch.zeros(Vp)
        self.head_b[:V] = sw.head_b


def _check(t: Tensor, name: str, shape: tuple, dtypes: tuple) -> None:
    """CharlstmError unless t is a CPU tensor of this shape and one of these types."""
    if not isinstance(t, Tensor):
        raise CharlstmError(f"native step: {name} must be a tensor (got {type(t).__name__})")
    if t.device.type != "cpu" or t.dtype not in dtypes or tuple(t.shape) != shape:
        raise CharlstmError(f"native step: {name} must be a CPU tensor of shape {shape} and type "
                            f"{' or '.join(str(d).replace('torch.', '') for d in dtypes)} "
                            f"(got {tuple(t.shape)}, {str(t.dtype).replace('torch.', '')} on {t.device})")


FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class NativeStep:
    """The C sampling step, with the torch steppers' interface (``load_state``, ``get_state``,
    ``advance``, ``generate``). ``precision='fp16'`` rounds the weight matrices to float16,
    ``'int8'`` to int8 with a scale per row (the table of layer 0, the biases and the diagonal
    peepholes stay float32; all arithmetic is float32)."""

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
        self.kind, self.H, self.L, self.V, self.has_c = _kind(sw), sw.H, sw.L, sw.head_w.shape[1], sw.has_c
        self.Hp = -(-sw.H // WIDTH) * WIDTH                       # the units the kernels run
        self.packed = _Packed(padded(sw, self.Hp), self.kind, precision)
        self.B = 0

    def load_state(self, state: State) -> None:
        """Continue from a model State (h (L, B, H), c (L, B, H) or None)."""
        h = state.h
        if not isinstance(h, Tensor) or h.dim() != 3 or h.shape[0] != self.L or h.shape[2] != self.H or h.shape[1] < 1:
            raise CharlstmError(f"native step: the state's h must be ({self.L}, B, {self.H}) with B >= 1 "
                                f"(got {tuple(getattr(h, 'shape', ()))})")
        L, B, H, Hp = self.L, h.shape[1], self.H, self.Hp
        _check(h, "the state's h", (L, B, H), FLOATS)
        if self.has_c:
            _check(state.c, "the state's c", (L, B, H), FLOATS)
        self.B = B
        z = torch.zeros(B, L, Hp)
        z[:, :, :H] = h.permute(1, 0, 2)
        self.z = z.view(B, L * Hp)                                                        # (B, L*Hp)
        self.c = torch.zeros(L, B, Hp)                                                    # (L, B, Hp)
        if self.has_c:
            self.c[:, :, :H] = state.c
        self.logits = torch.zeros(B, self.V)
        self.hnew = torch.empty(B, Hp)
        self.aux = torch.empty(2, B, Hp)
        p = self.packed
        f = {k: None if v is None else ctypes.addressof(v) for k, v in p.f.items()}
        self.net = Net(kind=KINDS[self.kind], L=L, H=Hp, V=self.V, B=B, precision=PRECISIONS[self.precision],
                       threads=1, table=p.table.data_ptr(), table2=None if p.table2 is None else p.table2.data_ptr(),
                       b=ctypes.addressof(p.b), head=p.head, head_b=p.head_b.data_ptr(), aux=self.aux.data_ptr(),
                       z=self.z.data_ptr(), c=self.c.data_ptr(), logits=self.logits.data_ptr(),
                       hnew=self.hnew.data_ptr(), **f)

    def get_state(self) -> State:
        """The current state as a model State."""
        h = self.z.view(self.B, self.L, self.Hp)[:, :, :self.H].transpose(0, 1).contiguous()
        return State(h, self.c[:, :, :self.H].contiguous() if self.has_c else None)

    def _loaded(self) -> None:
        if self.B == 0:
            raise CharlstmError("native step: load_state first")

    def _call(self, fn, *args) -> None:
        self.net.threads = threads_for(2 * self.B * self.Hp * (2 * self.L * GATES[self.kind] * self.Hp + self.V))
        code = fn(ctypes.byref(self.net), *args)
        if code:
            raise CharlstmError(f"native step: the C step refused its arguments ({ERRORS.get(code, code)})")

    def advance(self, x: Tensor) -> Tensor:
        """Feed characters x (B,) and return the logits (B, V) of the next ones."""
        self._loaded()
        _check(x, "the characters", (self.B,), INTEGERS)
        if int(x.min()) < 0 or int(x.max()) >= self.V:
            raise CharlstmError(f"native step: character ids must be in [0, {self.V}) "
                                f"(got {int(x.min())} .. {int(x.max())})")
        x = x.to(torch.int64).contiguous()
        self._call(self.lib.charlstm_step, x.data_ptr())
        return self.logits.clone()

    def generate(self, logits: Tensor, n: int, opts, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """n characters per stream from the pending logits (B, V) and the chunk's noise (n, B, V) (None:
        greedy): ids (n, B) and the logits after them. Temperature and greedy only."""
        self._loaded()
        if opts.top_k or opts.top_p < 1.0:
            raise UsageError("the native step samples with temperature or greedily; top-k and top-p use the torch step")
        if not isinstance(n, int) or n < 0:
            raise CharlstmError(f"native step: n must be an integer >= 0 (got {n!r})")
        if not opts.greedy and not opts.temperature > 0:
            raise CharlstmError(f"native step: the temperature must be > 0 (got {opts.temperature})")
        _check(logits, "the logits", (self.B, self.V), FLOATS)
        if noise is not None:
            _check(noise, "the noise", (n, self.B, self.V), FLOATS)
            noise = noise.float().contiguous()
        self.logits.copy_(logits)
        ids = torch.empty(n, self.B, dtype=torch.int64)
        inv_t = 1.0 if opts.greedy else 1.0 / opts.temperature
        self._call(self.lib.charlstm_generate, n, None if noise is None else noise.data_ptr(), inv_t, ids.data_ptr())
        return ids, self.logits.clone()

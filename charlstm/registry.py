"""The cell registry: one entry per variant and form holding everything that varies by cell.

Adding a cell is its class in cells.py plus one entry in CELLS (docs/cells.md shows the steps).
The fast paths and kernels are optional: a cell without them runs step by step and samples
through model.forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import fused, fused_gru, fused_mogrifier, fused_native, gpu
from .cells import Cell, ChoGRUCell, CoupledLSTMCell, GRUCell, LSTMCell, MogrifierLSTMCell, PeepholeLSTMCell, RNNCell
from .fused import FastPath
from .gpu import graphs
from .native.abi import Kernel


def _no_options(cfg) -> dict:
    return {}


def _peephole_options(cfg) -> dict:
    return {"form": cfg.peephole_form, "peepholes": cfg.peepholes}


def _mogrifier_options(cfg) -> dict:
    return {"rounds": cfg.mogrify_rounds, "rank": cfg.mogrify_rank}


@dataclass(frozen=True)
class CellSpec:
    """What charlstm knows about one cell: its equations, layout, initialisation and kernels."""

    name: str                              # the cell's one name: 'lstm', 'peephole:full', 'gru:cho', ...
    variant: str                           # ModelConfig.variant
    cell: type[Cell]                       # the equations (cells.py)
    gates: tuple[str, ...]                 # the gate blocks of weight_ih / weight_hh, in row order
    recorded: tuple[str, ...]              # what `visualize` records and shows, in display order
    form: str | None = None             # the variant's form, where it has several ...
    form_field: str | None = None       # ... and the ModelConfig field that chooses it
    options: Callable[[object], dict] = _no_options   # the cell's keyword arguments from a ModelConfig
    forget_gate: str | None = None      # the gate whose bias --forget-bias sets
    chrono: tuple[tuple[str, int], ...] = ()   # chrono initialisation: (gate, sign), bias = sign * log(u)
    cudnn: type[nn.Module] | None = None    # the torch.nn module that computes the same function
    fast_paths: tuple[FastPath, ...] = ()  # window runners, tried in order (none: step by step)
    kernel: Kernel | None = None        # the native training loops' kind and panel slots
    step: str | None = None             # the sampling steps' kind (steppers.FastStep, native.step)
    saturating: tuple[str, ...] | None = None   # recorded gates in (0, 1) (default: recorded but the state)

    @property
    def has_cell_state(self) -> bool:
        """Whether the cell carries C beside h (the LSTM family)."""
        return "c" in self.cell.state_names

    @property
    def gate_quantities(self) -> tuple[str, ...]:
        """The recorded quantities that are gates in (0, 1), whose saturation visualize measures."""
        if self.saturating is not None:
            return self.saturating
        return tuple(q for q in self.recorded if q not in self.cell.state_names)

    def block(self, gate: str) -> int:
        """The index of a gate's block in the weight rows."""
        return self.gates.index(gate)

    def make_cell(self, cfg, input_size: int) -> Cell:
        """The cell of one layer with ``input_size`` inputs."""
        return self.cell(input_size, cfg.hidden, cfg.bias, **self.options(cfg))

    def weights(self, cfg) -> int:
        """The weight-matrix entries of a stack of these cells (the basis of bench's FLOP count):
        every 2-D parameter of every layer; no biases or per-unit vectors, embedding or head."""
        with torch.device("meta"):
            cells = [self.make_cell(cfg, cfg.embed if k == 0 else cfg.hidden) for k in range(cfg.layers)]
        return sum(p.numel() for c in cells for p in c.parameters() if p.dim() == 2)


def fast_paths(torch_loop: FastPath, *, native: FastPath | None = None,
               triton: str | None = None) -> tuple[FastPath, ...]:
    """A cell's window runners in the order a layer tries them: the Triton kernels of kind ``triton``
    (CUDA, CHARLSTM_TRITON=1), the C loops ``native`` (CPU float32), the torch loop; each GPU path
    first as a CUDA graph (CHARLSTM_CUDA_GRAPHS=1)."""
    paths: list[FastPath] = []
    if triton is not None:
        paths += [graphs.graphed(gpu.triton_loop(triton)), gpu.triton_loop(triton)]
    if native is not None:
        paths.append(native)
    return (*paths, graphs.graphed(torch_loop), torch_loop)


_LSTM_KERNEL = Kernel.of("lstm")                 # slots i, f, o | g (native/abi.py, checked against the C side)
_PEEPHOLE_KERNEL = Kernel.of("peephole")
_PEEPHOLE_FULL_KERNEL = Kernel.of("peephole_full")
_COUPLED_KERNEL = Kernel.of("coupled")           # f, o | g
_GRU_KERNEL = Kernel.of("gru")
_CHO_KERNEL = Kernel.of("gru_cho")
_RNN_KERNEL = Kernel.of("rnn")
_LSTM_CHRONO = (("f", 1), ("i", -1))

CELLS: tuple[CellSpec, ...] = (
    CellSpec("rnn", "rnn", RNNCell, gates=("h",), recorded=("h",), cudnn=nn.RNN,
             fast_paths=fast_paths(fused_gru.RNN, native=fused_native.rnn(_RNN_KERNEL), triton="rnn"),
             kernel=_RNN_KERNEL, step="rnn"),
    CellSpec("lstm", "lstm", LSTMCell, gates=("i", "f", "g", "o"), recorded=("h", "c", "f", "i", "o"),
             forget_gate="f", chrono=_LSTM_CHRONO, cudnn=nn.LSTM,
             fast_paths=fast_paths(fused.LSTM, native=fused_native.lstm_family(_LSTM_KERNEL), triton="lstm"),
             kernel=_LSTM_KERNEL, step="lstm"),
    CellSpec("peephole:diag", "peephole", PeepholeLSTMCell, gates=("i", "f", "g", "o"),
             recorded=("h", "c", "f", "i", "o"), form="diag", form_field="peephole_form",
             options=_peephole_options, forget_gate="f", chrono=_LSTM_CHRONO,
             fast_paths=fast_paths(fused.PEEPHOLE, native=fused_native.lstm_family(_PEEPHOLE_KERNEL, peepholes=True),
                                   triton="peephole"),
             kernel=_PEEPHOLE_KERNEL, step="peephole"),
    CellSpec("peephole:full", "peephole", PeepholeLSTMCell, gates=("i", "f", "g", "o"),
             recorded=("h", "c", "f", "i", "o"), form="full", form_field="peephole_form",
             options=_peephole_options, forget_gate="f", chrono=_LSTM_CHRONO,
             fast_paths=fast_paths(fused.PEEPHOLE,
                                   native=fused_native.lstm_family(_PEEPHOLE_FULL_KERNEL, peepholes=True),
                                   triton="peephole_full"),
             kernel=_PEEPHOLE_FULL_KERNEL, step="peephole"),
    CellSpec("coupled", "coupled", CoupledLSTMCell, gates=("f", "g", "o"), recorded=("h", "c", "f", "i", "o"),
             forget_gate="f", chrono=(("f", 1),),
             fast_paths=fast_paths(fused.COUPLED, native=fused_native.lstm_family(_COUPLED_KERNEL), triton="coupled"),
             kernel=_COUPLED_KERNEL, step="coupled"),
    CellSpec("gru:cudnn", "gru", GRUCell, gates=("r", "z", "n"), recorded=("h", "z", "r"), form="cudnn",
             form_field="gru_form", chrono=(("z", 1),), cudnn=nn.GRU,      # z keeps the old state
             fast_paths=fast_paths(fused_gru.GRU, native=fused_native.gru(_GRU_KERNEL), triton="gru"),
             kernel=_GRU_KERNEL, step="gru"),
    CellSpec("gru:cho", "gru", ChoGRUCell, gates=("r", "z", "n"), recorded=("h", "z", "r"), form="cho",
             form_field="gru_form", chrono=(("z", -1),),                   # 1 - z keeps the old state
             fast_paths=fast_paths(fused_gru.CHO_GRU, native=fused_native.cho_gru(_CHO_KERNEL), triton="gru_cho"),
             kernel=_CHO_KERNEL, step="gru_cho"),
    CellSpec("mogrifier", "mogrifier", MogrifierLSTMCell, gates=("i", "f", "g", "o"),
             recorded=("h", "c", "f", "i", "o", "x_mod", "h_mod"), saturating=("f", "i", "o"),
             options=_mogrifier_options, forget_gate="f", chrono=_LSTM_CHRONO,
             fast_paths=fast_paths(fused_mogrifier.MOGRIFIER)),                 # samples through model.forward
)

VARIANTS: tuple[str, ...] = tuple(dict.fromkeys(s.variant for s in CELLS))


def forms(variant: str) -> tuple[str, ...]:
    """The forms a variant comes in (empty where it has one)."""
    return tuple(s.form for s in CELLS if s.variant == variant and s.form is not None)


def spec_for(cfg) -> CellSpec:
    """The entry of a ModelConfig's variant and form."""
    for spec in CELLS:
        if spec.variant == cfg.variant and (spec.form_field is None or getattr(cfg, spec.form_field) == spec.form):
            return spec
    raise ValueError(f"no cell {cfg.variant!r} in the registry")


def spec_named(name: str) -> CellSpec:
    """The entry called ``name`` ('gru:cho'), or the only entry of a variant ('lstm'). KeyError otherwise."""
    matches = [s for s in CELLS if s.name == name] or [s for s in CELLS if s.variant == name]
    if len(matches) != 1:
        raise KeyError(name)
    return matches[0]


def recorded(variant: str) -> tuple[str, ...]:
    """What visualize records for a variant (the same for each of its forms), in display order."""
    return next(s.recorded for s in CELLS if s.variant == variant)


def gate_quantities(variant: str) -> tuple[str, ...]:
    """The recorded gates of a variant (in (0, 1): their saturation is measured)."""
    return next(s.gate_quantities for s in CELLS if s.variant == variant)


def reorder_blocks(t: Tensor, order: tuple[int, ...], H: int) -> Tensor:
    """t (G*H, ...) with its gate blocks (rows) in ``order``."""
    return torch.cat([t[k * H:(k + 1) * H] for k in order], 0)

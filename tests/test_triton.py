"""The Triton kernels of charlstm.gpu against the step-by-step layer and fused.py, and gradcheck.

Without a CUDA device the kernels run under Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set here before triton is first imported), so they are
checked on every machine where triton and numpy are installed; with one, the
same tests run the compiled kernels on CUDA. Small shapes (T 4, B 3, H 12: H
and B off the tile sizes so that the masks are exercised).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"     # read when the kernels are decorated (first import)
    _SET_HERE = True
else:
    _SET_HERE = False

from charlstm import cells, fused, fused_gru, gpu  # noqa: E402
from charlstm.gpu import graphs  # noqa: E402
from charlstm.layers import Recurrent  # noqa: E402

_READY = gpu.available()                     # imports triton (interpreted without CUDA) if installed
if _SET_HERE:
    os.environ.pop("TRITON_INTERPRET")       # set again while this module's tests run (fixture below)
needs_triton = pytest.mark.skipif(not _READY, reason=f"Triton kernels unavailable: {gpu.why_unavailable()}")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DEV = "cuda" if CUDA else "cpu"
T, B, E, H = 4, 3, 5, 12


@pytest.fixture(autouse=True, scope="module")
def _interpreter_switch():
    """Triton's interpreter reads TRITON_INTERPRET at launches too; other test modules never see it."""
    if _SET_HERE:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _SET_HERE:
        os.environ.pop("TRITON_INTERPRET", None)


def make_cell(kind: str, *, bias: bool = True, peepholes: str = "fio") -> cells.Cell:
    """The cells.py cell that gpu.KINDS' ``kind`` runs."""
    if kind.startswith("peephole"):
        form = "full" if kind == "peephole_full" else "diag"
        return cells.PeepholeLSTMCell(E, H, bias, form=form, peepholes=peepholes)
    cls = {"lstm": cells.LSTMCell, "coupled": cells.CoupledLSTMCell, "gru": cells.GRUCell,
           "gru_cho": cells.ChoGRUCell, "rnn": cells.RNNCell}[kind]
    return cls(E, H, bias)


def _inputs(cell, dtype, seed=0):
    """x (T, B, E) and a random non-zero state, all requiring grad, and random output weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, E, generator=gen, dtype=dtype).to(DEV).requires_grad_()
    state = tuple(torch.randn(B, H, generator=gen, dtype=dtype).to(DEV).requires_grad_() for _ in cell.state_names)
    w_out = torch.randn(T, B, H, generator=gen, dtype=dtype).to(DEV)
    w_state = [torch.randn(B, H, generator=gen, dtype=dtype).to(DEV) for _ in cell.state_names]
    return x, state, w_out, w_state


def _run(layer_fn, cell, x, state, w_out, w_state):
    """Outputs, final state and the gradients of a weighted sum of both w.r.t. x, state, parameters."""
    hs, final = layer_fn(x, state)
    loss = (hs.float() * w_out).sum() + sum((f.float() * w).sum() for f, w in zip(final, w_state))
    grads = torch.autograd.grad(loss, [x, *state, *cell.parameters()])
    return hs, final, grads


def _step_by_step(cell):
    layer = Recurrent(cell)
    layer.use_fused = False
    return layer


def _check_against_step_by_step(kind, cell, dtype, **tol):
    """The registry's Triton path of ``kind`` (gpu.triton_loop) against the step-by-step layer."""
    cell = cell.to(DEV, dtype)
    x, state, w_out, w_state = _inputs(cell, dtype)
    path = gpu.triton_loop(kind)
    hs, final, grads = _run(lambda x, s: path.run(cell, x, s), cell, x, state, w_out, w_state)
    hs_ref, final_ref, grads_ref = _run(_step_by_step(cell), cell, x, state, w_out, w_state)
    torch.testing.assert_close(hs, hs_ref, **tol)
    for a, b in zip(final, final_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
    names = ["x"] + [f"state[{k}]" for k in range(len(state))] + [n for n, _ in cell.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"gradient of {name}: {m}", **tol)


# --------------------------------------------------------------------------- parity

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", gpu.KINDS)
def test_matches_the_step_by_step_layer(kind, dtype):
    torch.manual_seed(1)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    _check_against_step_by_step(kind, make_cell(kind), dtype, **tol)


@needs_triton
@pytest.mark.parametrize("kind,options", [
    ("lstm", dict(bias=False)), ("gru", dict(bias=False)), ("gru_cho", dict(bias=False)),
    ("rnn", dict(bias=False)), ("peephole", dict(peepholes="f")), ("peephole_full", dict(peepholes="io")),
    ("coupled", dict(bias=False)),
])
def test_without_biases_and_with_some_peepholes(kind, options):
    torch.manual_seed(2)
    _check_against_step_by_step(kind, make_cell(kind, **options), torch.float64)


@needs_triton
@pytest.mark.parametrize("kind", gpu.KINDS)
def test_bf16_under_autocast_follows_the_float32_layer(kind):
    """bf16 inputs and weights with float32 accumulation and cell state: outputs and gradients
    within bf16's precision of the float32 step-by-step layer; gradients in the parameters' dtype."""
    torch.manual_seed(3)
    cell = make_cell(kind).to(DEV)
    x, state, w_out, w_state = _inputs(cell, torch.float32)

    def triton_bf16(x, s):
        with torch.autocast(DEV, dtype=torch.bfloat16):
            return gpu.run_cell(kind, cell, x, s)

    hs, final, grads = _run(triton_bf16, cell, x, state, w_out, w_state)
    hs_ref, final_ref, grads_ref = _run(_step_by_step(cell), cell, x, state, w_out, w_state)
    assert hs.dtype == torch.bfloat16 and final[-1].dtype == (torch.float32 if len(final) == 2 else torch.bfloat16)
    torch.testing.assert_close(hs.float(), hs_ref, rtol=0, atol=3e-2)
    torch.testing.assert_close(final[-1].float(), final_ref[-1], rtol=0, atol=3e-2)
    for a, b in zip(grads, grads_ref, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=3e-2 * b.abs().max().item())


def _fused_args(kind, cell):
    """The torch loop's Function (fused.py, fused_gru.py) for ``kind`` and the arguments after x and the
    state, as the torch loop passes them."""
    bias = cell.input_bias()
    if kind in ("peephole", "peephole_full"):
        return fused._PeepholeLSTM, (cell.weight_ih, cell.weight_hh, bias, fused.peephole_weights(cell),
                                     kind == "peephole_full")
    if kind == "gru":
        return fused_gru._GRU, (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    table = {"lstm": fused._LSTM, "coupled": fused._CoupledLSTM, "gru_cho": fused_gru._ChoGRU, "rnn": fused_gru._RNN}
    return table[kind], (cell.weight_ih, cell.weight_hh, bias)


_TRITON = {"lstm": "TritonLSTM", "peephole": "TritonPeepholeLSTM", "peephole_full": "TritonPeepholeLSTM",
           "coupled": "TritonCoupledLSTM", "gru": "TritonGRU", "gru_cho": "TritonChoGRU", "rnn": "TritonRNN"}


@needs_triton
@pytest.mark.parametrize("kind", gpu.KINDS)
def test_functions_take_fused_py_arguments_and_agree(kind):
    """Each Triton Function is a drop-in for fused.py's: the same apply() arguments, the same results."""
    torch.manual_seed(4)
    cell = make_cell(kind).to(DEV, torch.float64)
    x, state, w_out, w_state = _inputs(cell, torch.float64)
    fused_fn, rest = _fused_args(kind, cell)
    triton_fn = getattr(gpu.load(), _TRITON[kind])

    def run(fn):
        out = fn.apply(x, *state, *rest)
        out = out if isinstance(out, tuple) else (out,)
        loss = (out[0] * w_out).sum() + (out[1] * w_state[1]).sum() if len(out) == 2 else (out[0] * w_out).sum()
        return out, torch.autograd.grad(loss, [x, *state, *cell.parameters()])

    (out, grads), (out_ref, grads_ref) = run(triton_fn), run(fused_fn)
    for a, b in zip(out + grads, out_ref + grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@needs_triton
@pytest.mark.parametrize("kind", ["lstm", "peephole_full", "gru", "gru_cho"])
def test_several_tiles_of_batch_rows_and_units(kind, monkeypatch):
    """B 66 and H 40: two tiles of batch rows by three of units, and products over several blocks
    (tile offsets, masks at both ends; the two-launch steps read every tile of the first launch)."""
    here = sys.modules[__name__]
    for name, value in (("T", 2), ("B", 66), ("H", 40)):
        monkeypatch.setattr(here, name, value)
    torch.manual_seed(7)
    _check_against_step_by_step(kind, make_cell(kind), torch.float64)


@needs_triton
def test_windows_of_one_and_zero_steps():
    cell = make_cell("lstm").to(DEV, torch.float64)
    x = torch.randn(1, B, E, dtype=torch.float64, device=DEV)
    hs, (h, c) = gpu.run_cell("lstm", cell, x)
    hs_ref, (h_ref, c_ref) = _step_by_step(cell)(x)
    torch.testing.assert_close(hs, hs_ref)
    torch.testing.assert_close(c, c_ref)
    empty, state = gpu.run_cell("lstm", cell, x[:0])
    assert empty.shape == (0, B, H) and all(s.abs().sum() == 0 for s in state)


# --------------------------------------------------------------------------- gradcheck

def _gradcheck_inputs(kind, cell, steps=3, batch=2):
    """(function, inputs) for gradcheck: every tensor input of the Triton Function, float64."""
    fn = getattr(gpu.load(), _TRITON[kind])
    _, rest = _fused_args(kind, cell)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(steps, batch, cell.input_size, generator=gen, dtype=torch.float64).to(DEV)
    state = [torch.randn(batch, cell.hidden_size, generator=gen, dtype=torch.float64).to(DEV)
             for _ in cell.state_names]
    tensors = [t.detach().clone().requires_grad_() for t in (x, *state, *rest) if isinstance(t, torch.Tensor)]
    flags = [r for r in rest if not isinstance(r, torch.Tensor)]
    return (lambda *a: fn.apply(*a, *flags)), tensors


@needs_triton
@pytest.mark.parametrize("kind", gpu.KINDS)
def test_gradcheck_float64(kind):
    """Every input's gradient against finite differences (gradcheck's fast mode: random
    projections of the Jacobian, so that the interpreter's slow launches fit the time)."""
    cell = make_cell(kind).to(DEV, torch.float64)
    fn, inputs = _gradcheck_inputs(kind, cell)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@needs_triton
def test_full_gradcheck_and_a_planted_error():
    """The whole Jacobian at a tiny size (rnn, H 3): it passes, and with dW_hh off by 1% it fails."""
    rnn = gpu.load().TritonRNN

    class Planted(torch.autograd.Function):
        forward = rnn.forward

        @staticmethod
        def backward(ctx, dhs):
            dx, dh0, dw_ih, dw_hh, db = rnn.backward(ctx, dhs)
            return dx, dh0, dw_ih, dw_hh * 1.01, db

    cell = cells.RNNCell(2, 3).to(DEV, torch.float64)
    _, inputs = _gradcheck_inputs("rnn", cell, steps=2)
    assert torch.autograd.gradcheck(rnn.apply, inputs)
    assert not torch.autograd.gradcheck(Planted.apply, inputs, raise_exception=False)


# --------------------------------------------------------------------------- availability, graphs

@needs_triton
def test_kernels_read_no_module_global_that_compiled_triton_refuses():
    """Compiled Triton reads a module global inside a kernel only when it is a tl.constexpr, a kernel
    or a module; the interpreter these tests run under reads any, so check the kernels' names here
    (a plain int COUPLED failed every lstm kernel on the first real GPU, an H200, 2026-11-29)."""
    import types

    import triton.language as tl

    from charlstm.gpu import kernels
    jitted = {name: obj for name, obj in vars(kernels).items() if hasattr(obj, "fn") and callable(obj.fn)}
    assert {"lstm_fwd", "_mm_nt"} <= set(jitted)
    bad = []
    for name, kernel in jitted.items():
        for used in kernel.fn.__code__.co_names:
            value = vars(kernels).get(used)
            if used in vars(kernels) and not (used in jitted or isinstance(value, (types.ModuleType, tl.constexpr))):
                bad.append(f"{name} reads {used} = {value!r}")
    assert not bad, bad


def test_reasons_when_triton_is_missing(monkeypatch):
    monkeypatch.setattr(gpu, "_loaded", {})
    monkeypatch.setattr(gpu.importlib.util, "find_spec", lambda name: None)
    assert not gpu.available() and "pip install 'charlstm[gpu]'" in gpu.why_unavailable()
    with pytest.raises(RuntimeError, match="triton is not installed"):
        gpu.run_layer("lstm", torch.zeros(2, 1, 3), None, torch.zeros(8, 3), torch.zeros(8, 2))


@needs_triton
def test_a_cpu_tensor_needs_the_interpreter(monkeypatch):
    assert "dtype" in gpu.why_unavailable(torch.zeros(1, dtype=torch.int64, device=DEV))
    monkeypatch.setattr(gpu.load(), "INTERPRETED", False)
    assert "run on CUDA" in gpu.why_unavailable(torch.zeros(1))
    with pytest.raises(ValueError, match="unknown kind"):
        gpu.run_layer("mogrifier", torch.zeros(2, 1, 3), None, torch.zeros(8, 3), torch.zeros(8, 2))


def test_the_switch_is_off_unless_set(monkeypatch):
    monkeypatch.delenv(gpu.ENV, raising=False)
    assert not gpu.enabled()
    monkeypatch.setenv(gpu.ENV, "1")
    assert gpu.enabled()


def test_cuda_graphs_choose_the_plain_path_on_the_cpu():
    layer = _step_by_step(make_cell("lstm"))
    x = torch.randn(T, B, E)
    assert not graphs.capturable(x)
    hs, state = graphs.run_graphed(layer, x, layer.cell.zero_state(B))
    hs2, state2 = graphs.run_cell_graphed(layer.cell, fused.LSTM.run, x, layer.cell.zero_state(B))
    hs_ref, state_ref = layer(x)
    torch.testing.assert_close(hs, hs_ref)
    torch.testing.assert_close(hs2, hs_ref)
    assert not graphs.cached()


@needs_cuda
@pytest.mark.parametrize("path", ["fused", "triton"])
def test_cuda_graph_replays_match_the_plain_layer_over_two_windows(path):
    """Two windows with the state carried (detached) and the parameters updated in between:
    outputs, state and parameter gradients of the replayed graph match the plain layer's."""
    if path == "triton" and not _READY:
        pytest.skip(f"Triton kernels unavailable: {gpu.why_unavailable()}")
    torch.manual_seed(6)
    graphs.clear()
    cell = make_cell("lstm").cuda()
    run = gpu.triton_loop("lstm").run if path == "triton" else fused.LSTM.run
    layer = graphs.Window(cell, run)
    state = state_ref = cell.zero_state(B, device="cuda")
    for _window in range(2):
        x = torch.randn(T, B, E, device="cuda", requires_grad=True)
        hs, state = graphs.run_cell_graphed(cell, run, x, state)
        g = torch.autograd.grad(hs.square().sum(), [x, *cell.parameters()])
        hs_ref, state_ref = layer(x, state_ref)
        g_ref = torch.autograd.grad(hs_ref.square().sum(), [x, *cell.parameters()])
        torch.testing.assert_close(hs, hs_ref)
        for a, b in zip(g + state, g_ref + state_ref, strict=True):
            torch.testing.assert_close(a, b)
        state, state_ref = tuple(s.detach() for s in state), tuple(s.detach() for s in state_ref)
        with torch.no_grad():
            cell.weight_hh.mul_(0.9)
    assert graphs.cached() == 1


def test_the_registry_lists_the_triton_path_first_and_it_runs_only_when_switched_on(monkeypatch):
    """Every cell with kernels has its Triton path (and its CUDA-graph wrapper) before the others; it
    stands aside unless CHARLSTM_TRITON=1, saying so."""
    from charlstm.registry import CELLS

    monkeypatch.delenv(gpu.ENV, raising=False)
    x = torch.zeros(2, 1, 3)
    for spec in CELLS:
        names = [p.name for p in spec.fast_paths]
        if "triton" not in names:
            continue
        assert names[:2] == ["triton (CUDA graph)", "triton"], (spec.name, names)
        assert "CHARLSTM_TRITON=1" in spec.fast_paths[1].unavailable(None, x)


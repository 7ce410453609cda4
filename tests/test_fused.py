"""The fast paths (charlstm/fused.py, fused_native.py) compute exactly what the step-by-step cells compute.

For every variant and form: outputs, final states and gradients (input, initial
state, every parameter) against the basic layer of ``layers.py`` (itself checked
against the equations in test_cells.py) and, where a torch module exists,
directly against ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` loaded with the same
weights; ``gradcheck`` in float64 at tiny sizes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, IDS, case_spec, make_cells
from torch import nn

from charlstm import fused, fused_native, runtime
from charlstm.cells import GRUCell, LSTMCell, RNNCell
from charlstm.fused import Tokens
from charlstm.layers import Recurrent
from charlstm.native import loops as native_loops
from charlstm.native.build import library
from charlstm.registry import spec_named


def basic_layer(cell) -> Recurrent:
    """The step-by-step layer of layers.py, never the fused path (which Recurrent takes by default)."""
    layer = Recurrent(cell)
    layer.use_fused = False
    return layer


def fast_layer(cell, spec) -> Recurrent:
    """The layer as a model runs it: the first of the registry's fast paths that can run the input."""
    return Recurrent(cell, spec.fast_paths)


def run_stack(cells, x, states, *, use_fused, spec=None):
    """The layers one after the other: through the registry entry's fast paths or step by step."""
    finals = []
    for cell, state in zip(cells, states):
        x, state = fast_layer(cell, spec)(x, state) if use_fused else basic_layer(cell)(x, state)
        finals.append(tuple(state))
    return x, finals


def random_states(cells, B, dtype):
    return [tuple(torch.randn(B, c.hidden_size, dtype=dtype, requires_grad=True) for _ in c.state_names)
            for c in cells]


def count_native_calls(monkeypatch) -> dict:
    """Count the calls of the native forward and backward loops."""
    calls = {"forward": 0, "backward": 0}
    for name, key in (("recurrent_forward", "forward"), ("recurrent_backward", "backward")):
        real = getattr(native_loops, name)

        def spy(*args, _real=real, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(native_loops, name, spy)
    return calls


def weighted_sum(out, finals, seed=1):
    """A scalar depending on every output and every final state tensor, with random weights."""
    gen = torch.Generator().manual_seed(seed)
    total = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    for state in finals:
        for s in state:
            total = total + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return total


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_cell_has_a_fused_path(case):
    """Every registry entry has a torch loop, and it runs float64 (where the C loops cannot)."""
    _, variant, extra = case
    spec = case_spec(variant, extra)
    (cell,) = make_cells(variant, extra, L=1)
    path, reasons = fast_layer(cell, spec).fast_path(torch.randn(2, 1, 3, dtype=torch.float64))
    assert path is not None and path.name == "torch loop", reasons


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_matches_the_step_by_step_layer(case, dtype, monkeypatch):
    """Outputs, final states and gradients of a 2-layer stack, fused against basic
    (backward factors in blocks of 3 steps, so that T=7 crosses block boundaries)."""
    monkeypatch.setattr(fused, "CHUNK", 3)
    _, variant, extra = case
    cells = make_cells(variant, extra, dtype=dtype)
    T, B = 7, 3
    x = torch.randn(T, B, 3, dtype=dtype, requires_grad=True)
    states = random_states(cells, B, dtype)

    out, finals = run_stack(cells, x, states, use_fused=True, spec=case_spec(variant, extra))
    ref_out, ref_finals = run_stack(cells, x, states, use_fused=False)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(finals, ref_finals):
        torch.testing.assert_close(got, want)

    inputs = [x] + [s for st in states for s in st] + [p for c in cells for p in c.parameters()]
    grads = torch.autograd.grad(weighted_sum(out, finals), inputs)
    ref_grads = torch.autograd.grad(weighted_sum(ref_out, ref_finals), inputs)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **tol)


# (custom cell class, torch module, cell kwargs)
TORCH_TWINS = [
    ("lstm", LSTMCell, nn.LSTM, {}),
    ("gru:cudnn", GRUCell, nn.GRU, {}),
    ("rnn", RNNCell, nn.RNN, {"nonlinearity": "tanh"}),
]


@pytest.mark.parametrize("H", [6, 32, 40], ids=["torch-loops", "native-loops", "native-loops-narrow-panel"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("twin", TORCH_TWINS, ids=[t[0] for t in TORCH_TWINS])
def test_fused_matches_torch_modules(twin, bias, H, monkeypatch):
    """2 layers, float32, T=20, B=4: the fused layers loaded with nn.LSTM/GRU/RNN's weights give
    its outputs, final states and weight/input/state gradients. At H=32 and 40 (a last backward
    panel of 8 units) the layers run their loops in C where the native library is available
    (counted), at H=6 in torch."""
    calls = count_native_calls(monkeypatch)
    _, cell_cls, module_cls, kwargs = twin
    torch.manual_seed(0)
    E, L, T, B = 5, 2, 20, 4
    ref = module_cls(E, H, num_layers=L, bias=bias, **kwargs)
    cells = [cell_cls(E if k == 0 else H, H, bias=bias) for k in range(L)]
    with torch.no_grad():
        for k, cell in enumerate(cells):
            for name, p in cell.named_parameters():
                p.copy_(getattr(ref, f"{name}_l{k}"))
    x = torch.randn(T, B, E, requires_grad=True)
    h0 = torch.randn(L, B, H, requires_grad=True)
    c0 = torch.randn(L, B, H, requires_grad=True)
    lstm = module_cls is nn.LSTM
    ref_out, ref_hn = ref(x, (h0, c0) if lstm else h0)
    states = [(h0[k], c0[k]) if lstm else (h0[k],) for k in range(L)]
    out, finals = run_stack(cells, x, states, use_fused=True, spec=spec_named(twin[0]))
    torch.testing.assert_close(out, ref_out)
    if lstm:
        torch.testing.assert_close(torch.stack([f[0] for f in finals]), ref_hn[0])
        torch.testing.assert_close(torch.stack([f[1] for f in finals]), ref_hn[1])
        ref_finals = [ref_hn]
    else:
        torch.testing.assert_close(torch.stack([f[0] for f in finals]), ref_hn)
        ref_finals = [(ref_hn,)]
    finals_stacked = [tuple(torch.stack([f[j] for f in finals]) for j in range(len(finals[0])))]
    inputs = [x, h0] + ([c0] if lstm else [])
    got = torch.autograd.grad(weighted_sum(out, finals_stacked), inputs + [p for c in cells for p in c.parameters()])
    want = torch.autograd.grad(weighted_sum(ref_out, ref_finals),
                               inputs + [getattr(ref, f"{n}_l{k}") for k, c in enumerate(cells)
                                         for n, _ in c.named_parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    in_c = H % 8 == 0 and library()[0] is not None
    assert calls == ({"forward": 2, "backward": 2} if in_c else {"forward": 0, "backward": 0})


# every variant and form, one or two gate subsets of each peephole form
GRADCHECK = [c for c in CASES if c[0] not in ("lstm-nobias", "peephole-diag-f", "peephole-diag-none",
                                              "peephole-full-o", "coupled-nobias", "gru-cho-nobias")]


@pytest.mark.parametrize("case", GRADCHECK, ids=[c[0] for c in GRADCHECK])
def test_gradcheck_fused(case, monkeypatch):
    """torch.autograd.gradcheck in float64 through one fused layer, w.r.t. input, initial
    state and every parameter (E=2, H=3, T=4, B=2, backward factors in blocks of 3 steps)."""
    monkeypatch.setattr(fused, "CHUNK", 3)
    _, variant, extra = case
    (cell,) = make_cells(variant, extra, E=2, H=3, L=1)
    layer = fast_layer(cell, case_spec(variant, extra))
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in cell.parameters()]
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    state = random_states([cell], 2, torch.float64)[0]
    n_state = len(state)

    def fn(x, *rest):
        p = dict(zip(names, rest[n_state:]))
        out, final = _run_with(layer, p, x, rest[:n_state])
        return (out,) + tuple(final)

    assert torch.autograd.gradcheck(fn, (x, *state, *params))


def _run_with(layer, params, x, state):
    """The layer's fast path with the cell's parameters replaced by ``params`` (for gradcheck)."""
    cell = layer.cell
    saved = {n: getattr(cell, n) for n in params}
    try:
        for n, p in params.items():
            cell._parameters[n] = p
        path, reasons = layer.fast_path(x)
        assert path is not None, reasons
        return path.run(cell, x, tuple(state))
    finally:
        for n, p in saved.items():
            cell._parameters[n] = p


@pytest.mark.parametrize("H", [4, 32], ids=["torch-loops", "native-loops"])
@pytest.mark.parametrize("case", [CASES[1], CASES[7], CASES[12]], ids=["lstm", "peephole-full", "gru"])
def test_edge_windows_and_inference(case, H):
    """T=1, no initial state (zeros), an empty window, and inference mode give the basic layer's results."""
    _, variant, extra = case
    (cell,) = make_cells(variant, extra, H=H, L=1, dtype=torch.float32)
    layer = fast_layer(cell, case_spec(variant, extra))
    x = torch.randn(1, 2, 3)
    out, state = layer(x, None)
    ref_out, ref_state = basic_layer(cell)(x, None)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tuple(state), tuple(ref_state))

    empty, same = layer(x[:0], tuple(state))
    assert empty.shape == (0, 2, H) and all(a is b for a, b in zip(same, state))

    x = torch.randn(5, 2, 3)
    with torch.inference_mode():
        out, state = layer(x, None)
        ref_out, ref_state = basic_layer(cell)(x, None)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tuple(state), tuple(ref_state))


def test_truncated_bptt_windows_carry_state():
    """Two windows with the state carried and detached between them equal one long window's outputs."""
    (cell,) = make_cells("lstm", {}, L=1, dtype=torch.float64)
    layer = fast_layer(cell, spec_named("lstm"))
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    whole, _ = layer(x, None)
    first, state = layer(x[:6], None)
    second, _ = layer(x[6:], tuple(s.detach() for s in state))
    torch.testing.assert_close(torch.cat([first, second]), whole)


def test_autocast_is_left_to_the_step_by_step_layer():
    (cell,) = make_cells("lstm", {}, L=1, dtype=torch.float32)
    layer = fast_layer(cell, spec_named("lstm"))
    x = torch.randn(3, 2, 3)
    assert layer.fast_path(x)[0] is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        path, reasons = layer.fast_path(x)
        assert path is None and any(r.startswith("torch loop: autocast") for r in reasons), reasons


# --------------------------------------------------------------------------- the native loops (C)
#
# Every variant and form runs its time loops in C (charlstm/csrc/train_loops.c) for float32 CPU
# layers with H a multiple of 8: the same checks, at sizes that take that path
# (test_fused_matches_torch_modules above runs nn.LSTM, nn.GRU and nn.RNN against them too).

NATIVE_LIB, NATIVE_WHY = library()
needs_native = pytest.mark.skipif(NATIVE_LIB is None, reason=f"the native loops are unavailable here: {NATIVE_WHY}")
NATIVE_CASES = CASES


def assert_native_matches(variant, extra, got, want, first, states, cells) -> None:
    """Outputs, final states and the gradients w.r.t. ``first`` (the input or the embedding
    table), the initial states and every parameter of a float32 stack run in C, against the
    step-by-step layers' (got and want: (out, finals))."""
    # the vanilla rnn with these large weights is chaotic: rounding grows ten times faster; the full
    # peephole's H x H matrices of weights up to 0.6 make its pre-activations large too
    tol = 1e-4 if variant == "rnn" or extra.get("peephole_form") == "full" else 1e-5
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    inputs = first + [s for st in states for s in st] + [p for c in cells for p in c.parameters()]
    grads = torch.autograd.grad(weighted_sum(*got), inputs)
    ref_grads = torch.autograd.grad(weighted_sum(*want), inputs)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=10 * tol, atol=10 * tol)


@needs_native
@pytest.mark.parametrize("H, B", [(32, 1), (32, 5), (64, 33), (40, 3), (24, 2)])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
def test_native_loops_match_the_step_by_step_layer(case, H, B, monkeypatch):
    """Outputs, final states and every gradient of a 2-layer float32 stack whose layers run in C,
    against the basic layer; one stream, pairs and one left over, more streams than a group of 32;
    H=40 and 24 end in a backward panel narrower than 32 units."""
    calls = count_native_calls(monkeypatch)
    _, variant, extra = case
    cells = make_cells(variant, extra, E=6, H=H, dtype=torch.float32)
    T = 7
    x = torch.randn(T, B, 6, requires_grad=True)
    states = random_states(cells, B, torch.float32)
    out, finals = run_stack(cells, x, states, use_fused=True, spec=case_spec(variant, extra))
    ref_out, ref_finals = run_stack(cells, x, states, use_fused=False)
    assert_native_matches(variant, extra, (out, finals), (ref_out, ref_finals), [x], states, cells)
    assert calls == {"forward": 2, "backward": 2}                        # both layers, both loops, in C


@needs_native
@pytest.mark.parametrize("case", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
def test_native_first_layer_gathers_from_the_projected_table(case, monkeypatch):
    """A first layer given token ids and the embedding table (layers.Tokens, as CharModel runs
    the custom cells) gathers its input half from the table's projection and returns the
    table's gradient directly: outputs, final states and every gradient (the table's
    included) as the step-by-step layers on the embedded input; nothing calls embedding."""
    calls = count_native_calls(monkeypatch)
    _, variant, extra = case
    cells = make_cells(variant, extra, E=6, H=32, dtype=torch.float32)
    T, B, V = 9, 5, 7
    ids = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(3))
    table = torch.randn(V, 6, requires_grad=True)
    states = random_states(cells, B, torch.float32)
    embedded = []
    monkeypatch.setattr(Tokens, "embedded", lambda self: embedded.append(1) or torch.nn.functional.embedding(
        self.ids, self.table))
    out, finals = run_stack(cells, Tokens(ids, table), states, use_fused=True, spec=case_spec(variant, extra))
    assert not embedded and calls["forward"] == 2
    ref_out, ref_finals = run_stack(cells, torch.nn.functional.embedding(ids, table), states, use_fused=False)
    assert_native_matches(variant, extra, (out, finals), (ref_out, ref_finals), [table], states, cells)


def test_tokens_are_embedded_for_a_path_that_cannot_gather(monkeypatch):
    """Where no fast path takes token ids (float64: the torch loops; use_fused off: the step-by-step
    layer), the layer embeds them and runs as on the embedded input."""
    cells = make_cells("lstm", {}, E=3, H=4, dtype=torch.float64)
    ids = torch.randint(0, 5, (4, 2))
    table = torch.randn(5, 3, dtype=torch.float64)
    states = random_states(cells, 2, torch.float64)
    x = torch.nn.functional.embedding(ids, table)
    for use_fused in (True, False):
        out, finals = run_stack(cells, Tokens(ids, table), states, use_fused=use_fused, spec=spec_named("lstm"))
        ref_out, ref_finals = run_stack(cells, x, states, use_fused=use_fused, spec=spec_named("lstm"))
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(finals, ref_finals, rtol=0, atol=0)


def _loop_buffers(kind: str, T: int, B: int, H: int, gen):
    """Random inputs of one window of the C loops of a kind: the forward's and the backward's arguments."""
    G = {"lstm": 4, "peephole_full": 4, "gru": 3, "rnn": 1}[kind]
    pre, w_hh = torch.randn(T, B, G * H, generator=gen), torch.randn(G * H, H, generator=gen) * 0.2
    h0, c0 = torch.randn(B, H, generator=gen), torch.randn(B, H, generator=gen)
    dhs = torch.randn(T, B, H, generator=gen)
    hs = torch.empty(T + 1, B, H)
    hs[0] = h0
    lstm = kind in ("lstm", "peephole_full")
    tcs = torch.empty(T, B, H) if kind != "rnn" else None
    cs = torch.empty(T + 1, B, H) if lstm else None
    if cs is not None:
        cs[0] = c0
    peep = torch.randn(3 * H, H, generator=gen) * 0.1 if kind == "peephole_full" else None
    dpre, dh = torch.empty_like(pre), torch.zeros(B, H)
    dc = c0.clone() if kind != "rnn" else None
    dph = torch.empty_like(pre) if kind == "gru" else None
    forward = dict(gates=pre, w_hh=w_hh, hs=hs, cs=cs, tcs=tcs, peep=peep)
    backward = dict(forward, dhs=dhs, dpre=dpre, dh=dh, dc=dc, dph=dph)
    return forward, backward


@needs_native
@pytest.mark.parametrize("kind", ["lstm", "gru:cudnn", "rnn", "peephole:full"])
def test_native_loops_give_the_same_bits_on_any_number_of_threads(kind, monkeypatch):
    """The C loops share each step's panels among threads without changing any sum's order."""
    monkeypatch.setattr(runtime, "GRAIN", 1)                 # every thread asked for, however small the step
    T, B, H = 9, 33, 64
    kernel = spec_named(kind).kernel
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            forward, backward = _loop_buffers(kernel.kind, T, B, H, torch.Generator().manual_seed(0))
            native_loops.recurrent_forward(kernel, **forward)
            native_loops.recurrent_backward(kernel, **backward)
            results.append([t for t in backward.values() if t is not None])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_the_torch_loops_run_where_the_native_ones_cannot(monkeypatch):
    """float64, H not a multiple of 8, or the loops switched off: fused.py's own loops, and the reason."""
    calls = count_native_calls(monkeypatch)
    for variant, extra, H, dtype in (("lstm", {}, 32, torch.float64), ("lstm", {}, 20, torch.float32),
                                     ("peephole", {"peephole_form": "full"}, 12, torch.float32)):
        cells = make_cells(variant, extra, H=H, dtype=dtype)
        x = torch.randn(3, 2, 3, dtype=dtype)
        path, reasons = fast_layer(cells[0], case_spec(variant, extra)).fast_path(x)
        native = [r for r in reasons if r.startswith("native loop: ")]
        assert path.name == "torch loop" and len(native) == 1, reasons
        assert ("float32" in native[0]) if dtype == torch.float64 else (f"multiple of 8 (this is {H})" in native[0])
        out, _ = run_stack(cells, x, random_states(cells, 2, dtype), use_fused=True, spec=case_spec(variant, extra))
        out.sum().backward()
    monkeypatch.setitem(fused_native.NATIVE, "on", False)
    cells = make_cells("lstm", {}, H=32, dtype=torch.float32)
    run_stack(cells, torch.randn(3, 2, 3), random_states(cells, 2, torch.float32), use_fused=True,
              spec=spec_named("lstm"))
    assert calls == {"forward": 0, "backward": 0}


@needs_native
@pytest.mark.filterwarnings("ignore:Input #")           # float32 on purpose (see the docstring)
@pytest.mark.parametrize("name", ["lstm", "peephole:diag", "peephole:full", "coupled", "gru:cudnn", "gru:cho", "rnn"])
@pytest.mark.parametrize("tokens", [False, True], ids=["inputs", "token-ids"])
def test_gradcheck_native_loops(name, tokens):
    """torch.autograd.gradcheck through the C loops, w.r.t. input, initial state and every weight.
    The loops are float32 only, so the finite differences are float32's: eps 1e-2 and tolerances
    to match (the float64 gradchecks above check the same equations on the torch loops, and the
    tests above tie the two together to 1e-4). With ``tokens`` the layer takes token ids and the
    embedding table (a first layer, layers.Tokens), and the gradient is the table's."""
    kernel = spec_named(name).kernel
    kind = kernel.kind
    torch.manual_seed(0)
    T, B, E, H, V = 3, 2, 4, 32, 5
    G = kernel.gates
    ids = torch.randint(0, V, (T, B))                   # 6 ids of 5: some repeat, so rows of the table add up
    first = torch.randn(V, E, requires_grad=True) if tokens else torch.randn(T, B, E, requires_grad=True)
    h0, c0 = (torch.randn(B, H, requires_grad=True) for _ in range(2))
    w_ih = (torch.randn(G * H, E) * 0.4).requires_grad_()
    w_hh = (torch.randn(G * H, H) * 0.2).requires_grad_()
    b, b2 = ((torch.randn(G * H) * 0.3).requires_grad_() for _ in range(2))
    p = ((torch.randn(3 * H, H) * 0.1) if kind == "peephole_full" else (torch.randn(3, H) * 0.3)).requires_grad_()

    def given(first):                                   # the Functions' (x, ids, table)
        return (None, ids, first) if tokens else (first, None, None)
    simple = {"gru": (fused_native._NativeGRU, (first, h0, w_ih, w_hh, b, b2)),
              "gru_cho": (fused_native._NativeChoGRU, (first, h0, w_ih, w_hh, b)),
              "rnn": (fused_native._NativeRNN, (first, h0, w_ih, w_hh, b))}
    if kind in simple:
        function, inputs = simple[kind]

        def fn(f, *a):
            return function.apply(*given(f), *a, kernel)
    else:
        def fn(f, h0, c0, w_ih, w_hh, b, p):
            hs, c = fused_native._NativeLSTMFamily.apply(*given(f), h0, c0, w_ih, w_hh, b,
                                                         p if kind.startswith("peephole") else None, kernel)
            return hs, c
        inputs = (first, h0, c0, w_ih, w_hh, b, p)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-2, atol=2e-2, rtol=2e-2)

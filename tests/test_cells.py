"""The custom cells against step-by-step references written here from ../shared/EQUATIONS.md,
gradcheck on every variant and form, and the gate activations exposed for the visualizer.

Every reference below reads the equations literally: a gate's weight is the
matrix W_g acting on the concatenation [h_{t-1}, x_t] (built here from the rows
of weight_hh and weight_ih of that gate), one time step after the other, one
layer after the other.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, IDS, case_config, case_spec

from charlstm import fused
from charlstm.cells import ChoGRUCell, CoupledLSTMCell, GRUCell, LSTMCell, PeepholeLSTMCell, RNNCell
from charlstm.layers import Recurrent, RecurrentStack

sig, tanh = torch.sigmoid, torch.tanh


def make_stack(variant, extra, *, E=3, H=4, L=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg, spec = case_config(variant, extra, E=E, H=H, L=L), case_spec(variant, extra)
    stack = RecurrentStack(lambda n: spec.make_cell(cfg, n), E, H, L, fast_paths=spec.fast_paths).to(dtype)
    with torch.no_grad():  # biases and peepholes away from zero so that every term matters
        for p in stack.parameters():
            p.uniform_(-0.6, 0.6)
    return cfg, stack


# --------------------------------------------------------------------------- references
def W(cell, block: int):
    """W_g of EQUATIONS.md for gate block `block`: (H, H + E), acting on [h_{t-1}, x_t]."""
    H = cell.hidden_size
    rows = slice(block * H, (block + 1) * H)
    return torch.cat([cell.weight_hh[rows], cell.weight_ih[rows]], dim=1)


def b(cell, block: int):
    """b_g: the gate's bias (the sum of the two biases of the cuDNN layout); 0 without biases."""
    H = cell.hidden_size
    rows = slice(block * H, (block + 1) * H)
    if getattr(cell, "bias_ih", None) is not None:
        return cell.bias_ih[rows] + cell.bias_hh[rows]
    if getattr(cell, "bias", None) is not None:
        return cell.bias[rows]
    return 0.0


def lin(Wg, v):
    return v @ Wg.T  # W · v for a batch of row vectors v (B, n)


def ref_rnn(cell, x, h):
    return tanh(lin(W(cell, 0), torch.cat([h, x], 1)) + b(cell, 0))


def ref_lstm(cell, x, h, c):
    hx = torch.cat([h, x], 1)
    i = sig(lin(W(cell, 0), hx) + b(cell, 0))
    f = sig(lin(W(cell, 1), hx) + b(cell, 1))
    C_tilde = tanh(lin(W(cell, 2), hx) + b(cell, 2))
    c = f * c + i * C_tilde
    o = sig(lin(W(cell, 3), hx) + b(cell, 3))
    return o * tanh(c), c


def ref_peephole(cell, x, h, c_prev):
    H = cell.hidden_size

    def P(gate, c):  # P_g(C): p_g * C (diag) or U_g · C (full); nothing for a gate without peephole
        if gate not in cell.peepholes:
            return 0.0
        k = cell.peepholes.index(gate)
        w = cell.weight_ch[k * H:(k + 1) * H]
        return w * c if cell.form == "diag" else lin(w, c)

    hx = torch.cat([h, x], 1)
    f = sig(lin(W(cell, 1), hx) + P("f", c_prev) + b(cell, 1))
    i = sig(lin(W(cell, 0), hx) + P("i", c_prev) + b(cell, 0))
    C_tilde = tanh(lin(W(cell, 2), hx) + b(cell, 2))
    c = f * c_prev + i * C_tilde
    o = sig(lin(W(cell, 3), hx) + P("o", c) + b(cell, 3))
    return o * tanh(c), c


def ref_coupled(cell, x, h, c):
    hx = torch.cat([h, x], 1)  # blocks: f, C~, o
    f = sig(lin(W(cell, 0), hx) + b(cell, 0))
    C_tilde = tanh(lin(W(cell, 1), hx) + b(cell, 1))
    o = sig(lin(W(cell, 2), hx) + b(cell, 2))
    c = f * c + (1 - f) * C_tilde
    return o * tanh(c), c


def ref_gru_cho(cell, x, h):
    hx = torch.cat([h, x], 1)  # blocks: r, z, n
    z = sig(lin(W(cell, 1), hx) + b(cell, 1))
    r = sig(lin(W(cell, 0), hx) + b(cell, 0))
    h_tilde = tanh(lin(W(cell, 2), torch.cat([r * h, x], 1)) + b(cell, 2))
    return (1 - z) * h + z * h_tilde


def ref_gru_cudnn(cell, x, h):
    H = cell.hidden_size
    Wi = [cell.weight_ih[k * H:(k + 1) * H] for k in range(3)]  # W_ir, W_iz, W_in
    Wh = [cell.weight_hh[k * H:(k + 1) * H] for k in range(3)]  # W_hr, W_hz, W_hn
    bi = [0.0 if cell.bias_ih is None else cell.bias_ih[k * H:(k + 1) * H] for k in range(3)]
    bh = [0.0 if cell.bias_hh is None else cell.bias_hh[k * H:(k + 1) * H] for k in range(3)]
    r = sig(lin(Wi[0], x) + bi[0] + lin(Wh[0], h) + bh[0])
    z = sig(lin(Wi[1], x) + bi[1] + lin(Wh[1], h) + bh[1])
    n = tanh(lin(Wi[2], x) + bi[2] + r * (lin(Wh[2], h) + bh[2]))
    return (1 - z) * n + z * h


def ref_step(cell, x, state):
    """One step of the reference for the cell's class: (h,) or (h, c) -> new state."""
    if isinstance(cell, RNNCell):
        return (ref_rnn(cell, x, *state),)
    if isinstance(cell, PeepholeLSTMCell):
        return ref_peephole(cell, x, *state)
    if isinstance(cell, LSTMCell):
        return ref_lstm(cell, x, *state)
    if isinstance(cell, CoupledLSTMCell):
        return ref_coupled(cell, x, *state)
    if isinstance(cell, ChoGRUCell):
        return (ref_gru_cho(cell, x, *state),)
    if isinstance(cell, GRUCell):
        return (ref_gru_cudnn(cell, x, *state),)
    raise AssertionError(type(cell))


def ref_stack(stack, x, states):
    """The stack, step by step and layer by layer, by the references."""
    finals = []
    for layer, state in zip(stack.layers, states):
        outs = []
        for t in range(x.shape[0]):
            state = ref_step(layer.cell, x[t], state)
            outs.append(state[0])
        x = torch.stack(outs)
        finals.append(state)
    return x, finals


def random_states(stack, B, dtype):
    return [tuple(torch.randn(B, layer.cell.hidden_size, dtype=dtype, requires_grad=True)
                  for _ in layer.cell.state_names) for layer in stack.layers]


def weighted_sum(out, finals, gen):
    """A scalar depending on every output and every final state tensor, with random weights."""
    total = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    for state in finals:
        for s in state:
            total = total + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return total


# --------------------------------------------------------------------------- tests
@pytest.fixture(params=["fused", "stepwise"])
def layer_path(request, monkeypatch):
    """Run the layers through fused.py's loops (the default) or the step-by-step loop of
    layers.py; the fused backward works in blocks of 4 steps here so that T=6 crosses one."""
    monkeypatch.setattr(Recurrent, "use_fused", request.param == "fused")
    monkeypatch.setattr(fused, "CHUNK", 4)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_custom_cells_match_the_equations_step_by_step(case, dtype, layer_path):
    """Outputs, final states and gradients (all parameters, input, initial state) of a
    2-layer custom stack equal the step-by-step references."""
    _, variant, extra = case
    cfg, stack = make_stack(variant, extra, dtype=dtype)
    T, B = 6, 3
    x = torch.randn(T, B, 3, dtype=dtype, requires_grad=True)
    states = random_states(stack, B, dtype)

    out, finals = stack(x, states)
    ref_out, ref_finals = ref_stack(stack, x, states)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(finals, ref_finals):
        torch.testing.assert_close(got, tuple(want))

    inputs = [x] + [s for st in states for s in st] + list(stack.parameters())
    grads = torch.autograd.grad(weighted_sum(out, finals, torch.Generator().manual_seed(1)), inputs)
    ref_grads = torch.autograd.grad(weighted_sum(ref_out, ref_finals, torch.Generator().manual_seed(1)), inputs)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **tol)


# every variant and form, one or two gate subsets of each peephole form (the others are
# checked against the references above): gradcheck is the slowest test here
GRADCHECK = [c for c in CASES if c[0] not in ("lstm-nobias", "peephole-diag-f", "peephole-diag-none",
                                              "peephole-full-o", "coupled-nobias", "gru-cudnn-nobias",
                                              "gru-cho-nobias")]


@pytest.mark.parametrize("case", GRADCHECK, ids=[c[0] for c in GRADCHECK])
def test_gradcheck_every_variant(case, layer_path):
    """torch.autograd.gradcheck (full mode) in float64 through one layer, w.r.t. input, initial
    state and every parameter (E=2, H=3, T=4, B=2); stacking is checked against the references."""
    _, variant, extra = case
    cfg, stack = make_stack(variant, extra, E=2, H=3, L=1)
    names = [n for n, _ in stack.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in stack.parameters()]
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    states = random_states(stack, 2, torch.float64)
    flat_states = [s for st in states for s in st]
    per_layer = len(stack.layers[0].cell.state_names)

    def fn(x, *rest):
        st = rest[:len(flat_states)]
        st = [tuple(st[k:k + per_layer]) for k in range(0, len(st), per_layer)]
        p = dict(zip(names, rest[len(flat_states):]))
        out, finals = torch.func.functional_call(stack, p, (x, st))
        return (out,) + tuple(s for f in finals for s in f)

    assert torch.autograd.gradcheck(fn, (x, *flat_states, *params))


@pytest.mark.parametrize("form", ["diag", "full"])
def test_peephole_with_zero_peepholes_is_lstm(form):
    torch.manual_seed(0)
    E, H = 3, 5
    lstm = LSTMCell(E, H).double()
    peep = PeepholeLSTMCell(E, H, form=form, peepholes="fio").double()
    with torch.no_grad():
        peep.weight_ih.copy_(lstm.weight_ih)
        peep.weight_hh.copy_(lstm.weight_hh)
        peep.bias.copy_(lstm.bias_ih + lstm.bias_hh)
        peep.weight_ch.zero_()
    x = torch.randn(7, 2, E, dtype=torch.float64)
    state = (torch.randn(2, H, dtype=torch.float64), torch.randn(2, H, dtype=torch.float64))
    out_l, st_l = Recurrent(lstm)(x, state)
    out_p, st_p = Recurrent(peep)(x, state)
    torch.testing.assert_close(out_p, out_l)
    torch.testing.assert_close(st_p, st_l)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gates_match_forward_and_equations(case):
    """return_gates gives the same outputs and state as forward, and each activation
    stacked over time (T, B, H): gates in (0, 1), h and c as the references compute them."""
    _, variant, extra = case
    cfg, stack = make_stack(variant, extra, H=4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    states = random_states(stack, 2, torch.float64)
    out, finals = stack(x, states)
    out_g, finals_g, gates = stack(x, states, return_gates=True)
    torch.testing.assert_close(out_g, out)
    torch.testing.assert_close(finals_g, finals)
    assert len(gates) == 2
    expected = {"rnn": {"h"}, "lstm": set("ifgoch"), "peephole": set("ifgoch"), "coupled": set("fgoch"),
                "gru": {"r", "z", "n", "h"}}[variant]
    for layer_gates in gates:
        assert set(layer_gates) == expected
        for name, value in layer_gates.items():
            assert value.shape == (5, 2, 4)
            if name in "ifozr":
                assert bool(((value > 0) & (value < 1)).all())
    torch.testing.assert_close(gates[1]["h"], out)
    if "c" in expected:
        torch.testing.assert_close(gates[1]["c"][-1], finals[1][1])


def test_cell_gates_method_steps_one_character():
    """cell.gates(x_proj_t, state) runs one step by hand, as the visualizer does."""
    torch.manual_seed(0)
    cell = LSTMCell(3, 4)
    x = torch.randn(2, 3)
    state = cell.zero_state(2)
    g = cell.gates(cell.project(x), state)
    h, (h2, c2) = cell(cell.project(x), state)
    torch.testing.assert_close(g["h"], h)
    torch.testing.assert_close(g["c"], c2)
    torch.testing.assert_close(g["c"], g["i"] * g["g"])  # C_{t-1} = 0


def test_cell_parameter_names_and_shapes():
    E, H = 3, 5
    assert {n: tuple(p.shape) for n, p in LSTMCell(E, H).named_parameters()} == {
        "weight_ih": (4 * H, E), "weight_hh": (4 * H, H), "bias_ih": (4 * H,), "bias_hh": (4 * H,)}
    assert {n: tuple(p.shape) for n, p in GRUCell(E, H).named_parameters()} == {
        "weight_ih": (3 * H, E), "weight_hh": (3 * H, H), "bias_ih": (3 * H,), "bias_hh": (3 * H,)}
    assert {n: tuple(p.shape) for n, p in CoupledLSTMCell(E, H).named_parameters()} == {
        "weight_ih": (3 * H, E), "weight_hh": (3 * H, H), "bias": (3 * H,)}
    assert tuple(PeepholeLSTMCell(E, H, form="diag", peepholes="fio").weight_ch.shape) == (3 * H,)
    assert tuple(PeepholeLSTMCell(E, H, form="diag", peepholes="o").weight_ch.shape) == (H,)
    assert tuple(PeepholeLSTMCell(E, H, form="full", peepholes="fo").weight_ch.shape) == (2 * H, H)
    assert PeepholeLSTMCell(E, H, peepholes="").weight_ch is None
    assert {n for n, _ in LSTMCell(E, H, bias=False).named_parameters()} == {"weight_ih", "weight_hh"}


def test_layer_iterates_with_unbind_not_indexing():
    """The time loop must not index the hoisted projection (xp[t] makes backward quadratic in T)."""
    import inspect

    import charlstm.layers as layers

    src = inspect.getsource(layers.Recurrent)
    assert "unbind(0)" in src
    assert "xp[t]" not in src and "xp[i]" not in src

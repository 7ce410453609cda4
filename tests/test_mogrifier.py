"""The Mogrifier LSTM (cells.MogrifierLSTMCell, fused_mogrifier._Mogrifier, the registry entry 'mogrifier').

Against a step-by-step reference written here from ../shared/EQUATIONS.md (section "Mogrifier"),
full and low rank, r in {0, 1, 2, 5}; r = 0 against the lstm cell and nn.LSTM; the fused loop
against the step-by-step layer; gradcheck in float64; the parameter counts of EQUATIONS.md's
table; the initialisation; and a model that trains, saves, loads and samples.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import draw, save_run, text_model, tiny_text, tiny_vocab, train_tiny
from torch import nn
from typer.testing import CliRunner

from charlstm import checkpoint as ck
from charlstm import fused, fused_mogrifier
from charlstm.cells import LSTMCell, MogrifierLSTMCell
from charlstm.cli import app
from charlstm.config import ModelConfig
from charlstm.errors import UsageError
from charlstm.layers import Recurrent
from charlstm.model import build_model, resolve_backend
from charlstm.registry import spec_for, spec_named
from charlstm.sample import generate
from charlstm.sampling import SamplingOptions
from charlstm.steppers import ModelStep, make_stepper

sig, tanh = torch.sigmoid, torch.tanh

ROUNDS = [0, 1, 2, 5]
RANKS = [0, 2]                      # full rank, rank 2


def cells(rounds, rank, *, E=3, H=4, L=2, dtype=torch.float64, seed=0, bias=True):
    """L mogrifier cells with every parameter spread over (-0.6, 0.6) so that every term matters."""
    torch.manual_seed(seed)
    out = [MogrifierLSTMCell(E if k == 0 else H, H, bias, rounds=rounds, rank=rank).to(dtype) for k in range(L)]
    with torch.no_grad():
        for cell in out:
            for p in cell.parameters():
                p.uniform_(-0.6, 0.6)
    return out


# --------------------------------------------------------------------------- the reference

def Q(cell, i):
    """Q^(i) (E x H, odd i) or R^(i) (H x E, even i) as one matrix: at rank k, the product a @ b."""
    name = f"weight_q{i}" if i % 2 else f"weight_r{i}"
    if cell.rank == 0:
        return getattr(cell, name)
    return getattr(cell, name + "_a") @ getattr(cell, name + "_b")


def ref_step(cell, x_t, h_prev, c_prev):
    """One step of EQUATIONS.md literally: the rounds, then the lstm on [h↑, x↑] with W_g = [U_g, W_g]."""
    H = cell.hidden_size
    x = {-1: x_t}
    h = {0: h_prev}
    for i in range(1, cell.rounds + 1):
        if i % 2:
            x[i] = 2 * sig(h[i - 1] @ Q(cell, i).T) * x[i - 2]
        else:
            h[i] = 2 * sig(x[i - 1] @ Q(cell, i).T) * h[i - 2]
    x_up, h_up = x[max(x)], h[max(h)]
    hx = torch.cat([h_up, x_up], 1)

    def gate(k):
        rows = slice(k * H, (k + 1) * H)
        W = torch.cat([cell.weight_hh[rows], cell.weight_ih[rows]], 1)
        b = 0.0 if cell.bias_ih is None else cell.bias_ih[rows] + cell.bias_hh[rows]
        return hx @ W.T + b

    i, f, g, o = sig(gate(0)), sig(gate(1)), tanh(gate(2)), sig(gate(3))
    c = f * c_prev + i * g
    return o * tanh(c), c


def ref_stack(cells_, x, states):
    finals = []
    for cell, (h, c) in zip(cells_, states):
        outs = []
        for t in range(x.shape[0]):
            h, c = ref_step(cell, x[t], h, c)
            outs.append(h)
        x = torch.stack(outs)
        finals.append((h, c))
    return x, finals


def run_stack(cells_, x, states, *, path):
    """The layers one after the other: 'fused' (the registry's fast paths) or 'step' (step by step)."""
    finals = []
    for cell, state in zip(cells_, states):
        layer = Recurrent(cell, spec_named("mogrifier").fast_paths)
        layer.use_fused = path == "fused"
        if path == "fused":
            assert layer.fast_path(x)[0] is fused_mogrifier.MOGRIFIER
        x, state = layer(x, state)
        finals.append(tuple(state))
    return x, finals


def random_states(cells_, B, dtype):
    return [tuple(torch.randn(B, c.hidden_size, dtype=dtype, requires_grad=True) for _ in range(2)) for c in cells_]


def weighted_sum(out, finals, seed=1):
    """A scalar depending on every output and every final state tensor, with random weights."""
    gen = torch.Generator().manual_seed(seed)
    total = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    for state in finals:
        for s in state:
            total = total + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return total


def grads(out, finals, inputs):
    return torch.autograd.grad(weighted_sum(out, finals), inputs)


# --------------------------------------------------------------------------- the equations

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("path", ["fused", "step"])
@pytest.mark.parametrize("rank", RANKS, ids=["full", "rank2"])
@pytest.mark.parametrize("rounds", ROUNDS, ids=[f"r{r}" for r in ROUNDS])
def test_the_layers_match_the_equations(rounds, rank, path, dtype, monkeypatch):
    """Outputs, final states and every gradient (input, initial states, all parameters) of a
    2-layer stack, fused or step by step, equal the reference (T=7 crosses backward blocks of 3)."""
    monkeypatch.setattr(fused, "CHUNK", 3)
    cs = cells(rounds, rank, dtype=dtype)
    x = torch.randn(7, 3, 3, dtype=dtype, requires_grad=True)
    states = random_states(cs, 3, dtype)
    out, finals = run_stack(cs, x, states, path=path)
    ref_out, ref_finals = ref_stack(cs, x, states)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(finals, ref_finals):
        torch.testing.assert_close(got, want)
    inputs = [x] + [s for st in states for s in st] + [p for c in cs for p in c.parameters()]
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for g, rg in zip(grads(out, finals, inputs), grads(ref_out, ref_finals, inputs)):
        torch.testing.assert_close(g, rg, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rank", RANKS, ids=["full", "rank2"])
@pytest.mark.parametrize("rounds", [1, 2, 3, 5, 6], ids=lambda r: f"r{r}")
def test_fused_matches_the_step_by_step_layer(rounds, rank, dtype, monkeypatch):
    """The fused loop against layers.Recurrent's step-by-step loop, bigger sizes, no biases in layer 1."""
    monkeypatch.setattr(fused, "CHUNK", 4)
    cs = cells(rounds, rank, E=5, H=6, dtype=dtype, bias=True)[:1] + cells(rounds, rank, E=6, H=6, L=1,
                                                                            dtype=dtype, bias=False, seed=1)
    x = torch.randn(9, 2, 5, dtype=dtype, requires_grad=True)
    states = random_states(cs, 2, dtype)
    out, finals = run_stack(cs, x, states, path="fused")
    ref_out, ref_finals = run_stack(cs, x, states, path="step")
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(finals, ref_finals):
        torch.testing.assert_close(got, want)
    inputs = [x] + [s for st in states for s in st] + [p for c in cs for p in c.parameters()]
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for g, rg in zip(grads(out, finals, inputs), grads(ref_out, ref_finals, inputs)):
        torch.testing.assert_close(g, rg, **tol)


def test_the_fused_function_itself_runs_zero_rounds():
    """The layer sends r = 0 to the lstm's loop; the mogrifier's own Function computes it too."""
    (cell,) = cells(0, 0, L=1)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = random_states([cell], 2, torch.float64)[0]
    hs, c = fused_mogrifier._Mogrifier.apply(x, h0, c0, cell.weight_ih, cell.weight_hh, cell.input_bias(), 0)
    ref_out, ref_finals = ref_stack([cell], x, [(h0, c0)])
    torch.testing.assert_close(hs, ref_out)
    torch.testing.assert_close(c, ref_finals[0][1])
    assert torch.autograd.gradcheck(
        lambda x, h0, c0, w_ih, w_hh: fused_mogrifier._Mogrifier.apply(x, h0, c0, w_ih, w_hh, None, 0),
        (x, h0, c0, cell.weight_ih.detach().requires_grad_(), cell.weight_hh.detach().requires_grad_()))


# --------------------------------------------------------------------------- r = 0 is the lstm

@pytest.mark.parametrize("path", ["fused", "step"])
def test_zero_rounds_is_the_lstm_cell_and_nn_lstm(path):
    """With r = 0 the cell has exactly LSTMCell's parameters; loaded with nn.LSTM's weights both give
    its outputs, final states and gradients (2 layers, float32)."""
    torch.manual_seed(0)
    E, H, L, T, B = 5, 8, 2, 11, 3
    ref = nn.LSTM(E, H, num_layers=L)
    mog = [MogrifierLSTMCell(E if k == 0 else H, H, rounds=0) for k in range(L)]
    lstm = [LSTMCell(E if k == 0 else H, H) for k in range(L)]
    assert [n for n, _ in mog[0].named_parameters()] == [n for n, _ in lstm[0].named_parameters()]
    with torch.no_grad():
        for k in range(L):
            for cell in (mog[k], lstm[k]):
                for name, p in cell.named_parameters():
                    p.copy_(getattr(ref, f"{name}_l{k}"))
    x = torch.randn(T, B, E, requires_grad=True)
    h0, c0 = torch.randn(L, B, H, requires_grad=True), torch.randn(L, B, H, requires_grad=True)
    ref_out, (hn, cn) = ref(x, (h0, c0))
    states = [(h0[k], c0[k]) for k in range(L)]
    out, finals = run_stack(mog, x, states, path=path)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(torch.stack([f[0] for f in finals]), hn)
    torch.testing.assert_close(torch.stack([f[1] for f in finals]), cn)
    lstm_layers = [Recurrent(c) for c in lstm]
    y = x
    for layer, state in zip(lstm_layers, states):
        y, _ = layer(y, state)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)
    got = torch.autograd.grad(weighted_sum(out, [tuple(torch.stack([f[j] for f in finals]) for j in (0, 1))]),
                              [x, h0, c0] + [p for c in mog for p in c.parameters()])
    want = torch.autograd.grad(weighted_sum(ref_out, [(hn, cn)]),
                               [x, h0, c0] + [getattr(ref, f"{n}_l{k}") for k in range(L)
                                              for n, _ in mog[k].named_parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- gradcheck

def _with_params(cell, names, values, fn):
    saved = {n: cell._parameters[n] for n in names}
    try:
        for n, v in zip(names, values):
            cell._parameters[n] = v
        return fn()
    finally:
        cell._parameters.update(saved)


@pytest.mark.parametrize("path", ["fused", "step"])
@pytest.mark.parametrize("rank", RANKS, ids=["full", "rank2"])
@pytest.mark.parametrize("rounds", [1, 2, 5], ids=lambda r: f"r{r}")
def test_gradcheck(rounds, rank, path, monkeypatch):
    """torch.autograd.gradcheck in float64 through one layer, fused or step by step, w.r.t. the input,
    both initial states and every parameter (E=2, H=3, T=4, B=2, backward blocks of 3 steps)."""
    monkeypatch.setattr(fused, "CHUNK", 3)
    (cell,) = cells(rounds, rank, E=2, H=3, L=1)
    layer = Recurrent(cell, spec_named("mogrifier").fast_paths)
    layer.use_fused = path == "fused"
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in cell.parameters()]
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = random_states([cell], 2, torch.float64)[0]

    def fn(x, h0, c0, *ps):
        out, (h, c) = _with_params(cell, names, ps, lambda: layer(x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


# --------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("E, H, r, k", [(3, 4, 0, 0), (3, 4, 5, 0), (16, 64, 5, 0), (16, 64, 6, 4), (64, 256, 5, 32),
                                        (7, 5, 3, 2)])
def test_parameter_counts_are_the_table_of_equations_md(E, H, r, k):
    """4H(E+H) + r·E·H (full) or 4H(E+H) + r·k(E+H) (rank k) weights, plus the two lstm biases
    (nn.LSTM's layout: 2 × 4H); the registry's weight count (bench's FLOPs) is the weights."""
    cell = MogrifierLSTMCell(E, H, rounds=r, rank=k)
    weights = 4 * H * (E + H) + (r * E * H if k == 0 else r * k * (E + H))
    assert sum(p.numel() for p in cell.parameters()) == weights + 2 * 4 * H
    assert sum(p.numel() for p in MogrifierLSTMCell(E, H, False, rounds=r, rank=k).parameters()) == weights
    cfg = ModelConfig(vocab_size=9, variant="mogrifier", embed=E, hidden=H, layers=2, mogrify_rounds=r, mogrify_rank=k)
    second = 4 * H * 2 * H + (r * H * H if k == 0 else r * k * 2 * H)
    assert spec_for(cfg).weights(cfg) == weights + second
    model = build_model(cfg)
    assert model.num_parameters() == weights + second + 2 * 2 * 4 * H + 9 * E + H * 9 + 9


def test_parameter_names_and_shapes():
    full = dict(MogrifierLSTMCell(3, 4, rounds=3).named_parameters())
    assert {n: tuple(p.shape) for n, p in full.items()} == {
        "weight_ih": (16, 3), "weight_hh": (16, 4), "bias_ih": (16,), "bias_hh": (16,),
        "weight_q1": (3, 4), "weight_r2": (4, 3), "weight_q3": (3, 4)}
    low = dict(MogrifierLSTMCell(3, 4, rounds=2, rank=2).named_parameters())
    assert {n: tuple(p.shape) for n, p in low.items() if "_" in n[8:]} == {
        "weight_q1_a": (3, 2), "weight_q1_b": (2, 4), "weight_r2_a": (4, 2), "weight_r2_b": (2, 3)}


@pytest.mark.parametrize("k", [0, 8])
def test_the_rounds_are_initialised_as_nn_linear_weights(k):
    """Each round matrix uniform ±1/sqrt(its columns) (nn.Linear's weight), in the cell and in a
    CharModel (whose lstm part keeps ±1/sqrt(H) and the forget bias)."""
    torch.manual_seed(0)
    E, H = 16, 100
    model = build_model(ModelConfig(vocab_size=9, variant="mogrifier", embed=E, hidden=H, layers=2, mogrify_rank=k))
    for layer in model.rnn.layers:
        cell = layer.cell
        for name, p in cell.named_parameters():
            if p.dim() == 1:
                continue
            cols = p.shape[1] if name.startswith(("weight_q", "weight_r")) else H
            bound = 1 / math.sqrt(cols)
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound, name
        assert torch.equal(cell.bias_ih[H:2 * H], torch.ones(H)) and torch.equal(cell.bias_hh[H:2 * H], torch.zeros(H))


def _initialise_as_before(model) -> None:
    """CharModel.reset_parameters as it was before the mogrifier: every rnn parameter uniform ±1/sqrt(H)."""
    bound = 1 / math.sqrt(model.cfg.hidden)
    nn.init.normal_(model.embedding.weight, 0.0, 1.0)
    nn.init.uniform_(model.head.weight, -bound, bound)
    nn.init.zeros_(model.head.bias)
    with torch.no_grad():
        for p in model.rnn.parameters():
            p.uniform_(-bound, bound)
        if model.cfg.bias:
            for k in range(model.cfg.layers):
                model._init_gate_biases(*model._layer_biases(k))


@pytest.mark.parametrize("extra", [dict(variant="lstm", backend="custom"), dict(variant="peephole"),
                                   dict(variant="peephole", peephole_form="full", peepholes="fo"),
                                   dict(variant="coupled", init="chrono"), dict(variant="gru", backend="custom"),
                                   dict(variant="gru", gru_form="cho", bias=False), dict(variant="rnn")],
                         ids=lambda e: "-".join(map(str, e.values())))
def test_models_of_the_other_cells_are_initialised_as_before(extra):
    """CharModel initialises custom layers through each cell's reset_parameters: for every other cell
    that is the same draws, in the same order, as the loop over all rnn parameters it replaced."""
    model = build_model(ModelConfig(vocab_size=9, embed=5, hidden=7, layers=2, **extra))
    torch.manual_seed(4)
    model.reset_parameters()
    new = [p.clone() for p in model.parameters()]
    torch.manual_seed(4)
    _initialise_as_before(model)
    for a, b in zip(new, model.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the registry and the config

def test_registry_entry_and_config():
    cfg = ModelConfig(vocab_size=5, variant="mogrifier")
    spec = spec_for(cfg)
    assert spec is spec_named("mogrifier")
    assert (spec.cell, spec.gates, spec.forget_gate, spec.cudnn, spec.kernel, spec.step) == (
        MogrifierLSTMCell, ("i", "f", "g", "o"), "f", None, None, None)
    assert spec.fast_paths[-1] == fused_mogrifier.MOGRIFIER and spec.has_cell_state
    assert (cfg.mogrify_rounds, cfg.mogrify_rank) == (5, 0)
    assert resolve_backend(cfg) == "custom"
    with pytest.raises(UsageError, match="--backend custom"):
        resolve_backend(ModelConfig(vocab_size=5, variant="mogrifier", backend="cudnn"))
    for bad in (dict(mogrify_rounds=-1), dict(mogrify_rank=-2)):
        with pytest.raises(UsageError, match="--mogrify-r"):
            ModelConfig(vocab_size=5, variant="mogrifier", **bad)
    cell = spec.make_cell(ModelConfig(vocab_size=5, variant="mogrifier", mogrify_rounds=3, mogrify_rank=2), 7)
    assert (cell.rounds, cell.rank, cell.input_size) == (3, 2, 7)


def test_gates_record_the_modulated_input_and_state():
    """gates() returns every activation, the modulated x and h included; forward_with_gates stacks
    them per layer (x_mod has the layer's input width) and every recorded quantity is there."""
    model = text_model(dict(variant="mogrifier", mogrify_rounds=3), dtype=torch.float64)
    idx = torch.randint(len(tiny_vocab()), (6, 2))
    logits, state, gates = model.forward_with_gates(idx)
    ref_logits, ref_state = model(idx)
    torch.testing.assert_close(logits, ref_logits)
    E, H = model.cfg.embed, model.cfg.hidden
    for k, g in enumerate(gates):
        assert set(model.spec.recorded) <= set(g) and set(g) == {"x_mod", "h_mod", "i", "f", "g", "o", "c", "h"}
        assert g["x_mod"].shape == (6, 2, E if k == 0 else H) and g["h_mod"].shape == (6, 2, H)
    cell = model.rnn.layers[0].cell
    x = model.embedding(idx[0])
    h, c = torch.zeros(2, H, dtype=torch.float64), torch.zeros(2, H, dtype=torch.float64)
    torch.testing.assert_close(cell.gates(cell.project(x), (h, c))["x_mod"], cell.mogrify(x, h)[0])


# --------------------------------------------------------------------------- a model: train, save, load, sample

def _windows(steps, T=16, B=4):
    ids = torch.tensor(tiny_vocab().encode(tiny_text(3)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        window = torch.stack([ids[s:s + T + 1] for s in starts.tolist()], 1)   # (T+1, B)
        yield window[:-1], window[1:]


@pytest.mark.parametrize("extra", [dict(), dict(mogrify_rounds=2, mogrify_rank=3)], ids=["r5-full", "r2-rank3"])
def test_a_mogrifier_model_trains_saves_loads_and_samples(tmp_path, extra):
    torch.manual_seed(0)
    vocab = tiny_vocab()
    model = build_model(ModelConfig(vocab_size=len(vocab), variant="mogrifier", embed=8, hidden=16, layers=2, **extra))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    (x0, y0), *batches = _windows(41, B=8)

    def loss_of(x, y):
        logits, _ = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    before = loss_of(x0, y0).item()
    for x, y in batches:
        loss = loss_of(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_of(x0, y0).item() < before - 0.5

    save_run(tmp_path / "run", model=model)
    loaded = ck.load_checkpoint(tmp_path / "run")
    assert loaded.model_cfg == model.cfg and loaded.model.spec.name == "mogrifier"
    idx = torch.randint(len(vocab), (10, 3))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx)[0], model(idx)[0], rtol=0, atol=0)

    stepper = make_stepper(loaded.model)
    assert isinstance(stepper, ModelStep)
    opts = SamplingOptions(greedy=True)
    with torch.no_grad():
        logits, state = loaded.model(idx[:4, :1])
        stepper.load_state(state)
        ids, _ = draw(stepper, logits[-1], 12, opts, torch.Generator().manual_seed(0))
    assert ids.shape == (12, 1)
    one = generate(loaded.model, vocab, prime="Café ", length=30, seed=5)
    two = generate(loaded.model, vocab, prime="Café ", length=30, seed=5)
    assert one.texts == two.texts and len(one.texts[0]) == len("Café ") + 30
    assert one.stepper == "model.forward"


def test_train_and_sample_commands_take_the_variant(tmp_path, monkeypatch):
    """`charlstm train --variant mogrifier` (the config's variant list is the registry's) and
    `charlstm sample` on its run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    r = train_tiny("--variant", "mogrifier", "--hidden", "12", "--embed", "6", "--sample-chars", "5",
                   "--max-steps", "3", "--out", "run")
    assert r.exit_code == 0, r.output
    loaded = ck.load_checkpoint(tmp_path / "run")
    assert (loaded.model_cfg.variant, loaded.model_cfg.backend, loaded.step) == ("mogrifier", "custom", 3)
    s = CliRunner().invoke(app, ["sample", str(tmp_path / "run"), "--prime", "The ", "--length", "20", "--seed", "1"])
    assert s.exit_code == 0, s.output
    assert s.stdout.startswith("The ") and len(s.stdout) == len("The ") + 20 + 1

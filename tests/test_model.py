"""CharModel: custom stacks against torch.nn.LSTM/GRU/RNN, carried state, parameter counts,
initialisation, backend resolution, weight conversion between the two layouts, CUDA and bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from charlstm.config import ModelConfig
from charlstm.errors import UsageError
from charlstm.model import State, build_model, convert_state_dict, detach_state

V, E, H = 7, 3, 5

# (id, variant, extra fields) for every variant and form
FORMS = [
    ("rnn", "rnn", {}),
    ("lstm", "lstm", {}),
    ("peephole-diag", "peephole", {"peephole_form": "diag"}),
    ("peephole-diag-fo", "peephole", {"peephole_form": "diag", "peepholes": "fo"}),
    ("peephole-full", "peephole", {"peephole_form": "full"}),
    ("peephole-full-i", "peephole", {"peephole_form": "full", "peepholes": "i"}),
    ("coupled", "coupled", {}),
    ("gru-cudnn", "gru", {"gru_form": "cudnn"}),
    ("gru-cho", "gru", {"gru_form": "cho"}),
]
CUDNN_VARIANTS = {"rnn", "lstm", "gru-cudnn"}
# every (form, backend) pair that exists
PAIRS = [(f, "custom") for f in FORMS] + [(f, "cudnn") for f in FORMS if f[0] in CUDNN_VARIANTS]
PAIR_IDS = [f"{f[0]}-{b}" for f, b in PAIRS]


def cfg_of(variant, backend="auto", *, layers=3, **extra):
    return ModelConfig(vocab_size=V, variant=variant, backend=backend, embed=E, hidden=H, layers=layers, **extra)


def model_of(variant, backend="auto", *, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(cfg_of(variant, backend, **kw)).to(dtype)


def random_state(model, B, dtype):
    L = model.cfg.layers
    h = torch.randn(L, B, H, dtype=dtype, requires_grad=True)
    c = torch.randn(L, B, H, dtype=dtype, requires_grad=True) if model.init_state(1).c is not None else None
    return State(h, c)


# --------------------------------------------------------------------------- parity with torch.nn
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant,extra,module", [
    ("lstm", {}, nn.LSTM), ("gru", {"gru_form": "cudnn"}, nn.GRU), ("rnn", {}, nn.RNN)],
    ids=["lstm", "gru", "rnn"])
def test_custom_matches_torch_nn(variant, extra, module, dtype):
    """Custom 3-layer stacks loaded with nn.LSTM/GRU/RNN's weights: same logits, final
    states, and gradients of every parameter and of the initial state."""
    ref = model_of(variant, "cudnn", dtype=dtype, **extra)
    assert type(ref.rnn) is module and ref.rnn.num_layers == 3
    custom = model_of(variant, "custom", dtype=dtype, seed=1, **extra)
    custom.load_state_dict(ref.state_dict())

    idx = torch.randint(0, V, (8, 4))
    state = random_state(ref, 4, dtype)
    out = {}
    for name, m in (("ref", ref), ("custom", custom)):
        logits, final = m(idx, state)
        w = torch.Generator().manual_seed(3)
        loss = (logits * torch.randn(logits.shape, generator=w, dtype=dtype)).sum()
        loss = loss + (final.h * torch.randn(final.h.shape, generator=w, dtype=dtype)).sum()
        if final.c is not None:
            loss = loss + (final.c * torch.randn(final.c.shape, generator=w, dtype=dtype)).sum()
        tensors = [state.h] + ([state.c] if state.c is not None else [])
        names = [n for n, _ in m.named_parameters()]
        grads = torch.autograd.grad(loss, tensors + [p for _, p in m.named_parameters()])
        param_grads = dict(zip(names, grads[len(tensors):]))
        if name == "custom":
            param_grads = convert_state_dict(param_grads, custom.cfg, "cudnn")
        out[name] = (logits, final, grads[:len(tensors)], param_grads)

    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    (l1, s1, sg1, pg1), (l2, s2, sg2, pg2) = out["ref"], out["custom"]
    torch.testing.assert_close(l2, l1, **tol)
    torch.testing.assert_close(s2.h, s1.h, **tol)
    if s1.c is not None:
        torch.testing.assert_close(s2.c, s1.c, **tol)
    torch.testing.assert_close(sg2, sg1, **tol)
    assert set(pg1) == set(pg2) and len(pg1) == 1 + 4 * 3 + 2  # embedding, 3 layers x 4, head
    for k in pg1:
        torch.testing.assert_close(pg2[k], pg1[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- carried state
@pytest.mark.parametrize("form,backend", PAIRS, ids=PAIR_IDS)
def test_two_halves_with_carried_state_equal_the_whole(form, backend):
    _, variant, extra = form
    model = model_of(variant, backend, layers=2, **extra).eval()
    idx = torch.randint(0, V, (10, 3))
    whole, s_whole = model(idx)
    first, s1 = model(idx[:4])
    second, s2 = model(idx[4:], detach_state(s1))
    torch.testing.assert_close(torch.cat([first, second]), whole)
    torch.testing.assert_close(s2.h, s_whole.h)
    if s_whole.c is not None:
        torch.testing.assert_close(s2.c, s_whole.c)
    else:
        assert s2.c is None


@pytest.mark.parametrize("form,backend", PAIRS, ids=PAIR_IDS)
def test_state_shapes_and_zero_initial_state(form, backend):
    _, variant, extra = form
    model = model_of(variant, backend, layers=2, **extra)
    st = model.init_state(3)
    assert st.h.shape == (2, 3, H) and st.h.dtype == torch.float64 and not st.h.any()
    assert (st.c is None) == (variant in ("rnn", "gru"))
    idx = torch.randint(0, V, (5, 3))
    logits, final = model(idx)
    assert logits.shape == (5, 3, V)
    assert final.h.shape == (2, 3, H)
    torch.testing.assert_close(model(idx, st)[0], logits)


def test_detach_state():
    st = State(torch.ones(2, 3, 4, requires_grad=True) * 2, None)
    d = detach_state(st)
    assert not d.h.requires_grad and d.c is None and torch.equal(d.h, st.h)
    st = State(torch.ones(1, 1, 1, requires_grad=True) * 2, torch.zeros(1, 1, 1, requires_grad=True) * 1)
    d = detach_state(st)
    assert not d.h.requires_grad and not d.c.requires_grad


# --------------------------------------------------------------------------- parameter counts
def table_count(variant, extra, n_in, n_h, two_biases, bias=True):
    """One layer's parameters by the table of EQUATIONS.md (two-bias layouts count biases twice)."""
    gates = {"rnn": 1, "lstm": 4, "peephole": 4, "coupled": 3, "gru": 3}[variant]
    n = gates * n_h * (n_in + n_h)
    if bias:
        n += gates * n_h * (2 if two_biases else 1)
    if variant == "peephole":
        k = len(extra.get("peepholes", "fio"))
        n += k * n_h if extra.get("peephole_form", "diag") == "diag" else k * n_h * n_h
    return n


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("form,backend", PAIRS, ids=PAIR_IDS)
def test_parameter_counts_follow_the_table(form, backend, bias):
    _, variant, extra = form
    Hc, Ec, Vc = 16, 8, 11
    model = build_model(ModelConfig(vocab_size=Vc, variant=variant, backend=backend, embed=Ec, hidden=Hc,
                                    layers=3, bias=bias, **extra))
    two = variant in ("rnn", "lstm") or (variant == "gru" and extra.get("gru_form", "cudnn") == "cudnn")
    layers = table_count(variant, extra, Ec, Hc, two, bias) + 2 * table_count(variant, extra, Hc, Hc, two, bias)
    assert model.num_parameters() == Vc * Ec + layers + Hc * Vc + Vc
    model.embedding.weight.requires_grad_(False)  # counts what is trained
    assert model.num_parameters() == layers + Hc * Vc + Vc


def test_parameter_counts_spelled_out():
    """The table at E=64, H=256 for one layer, as numbers."""
    def one_layer(variant, **extra):
        m = build_model(ModelConfig(vocab_size=2, variant=variant, backend="custom", embed=64, hidden=256,
                                    layers=1, **extra))
        return m.num_parameters() - (2 * 64 + 256 * 2 + 2)
    assert one_layer("lstm") == 4 * 256 * 320 + 2 * 4 * 256 == 329_728
    assert one_layer("peephole") == 4 * 256 * 320 + 3 * 256 + 4 * 256 == 329_472
    assert one_layer("peephole", peephole_form="full") == 4 * 256 * 320 + 3 * 256 ** 2 + 4 * 256 == 525_312
    assert one_layer("coupled") == 3 * 256 * 320 + 3 * 256 == 246_528
    assert one_layer("gru", gru_form="cho") == 3 * 256 * 320 + 3 * 256 == 246_528
    assert one_layer("gru") == 3 * 256 * 320 + 2 * 3 * 256 == 247_296
    assert one_layer("rnn") == 256 * 320 + 2 * 256 == 82_432


# --------------------------------------------------------------------------- backends
def test_auto_backend_is_resolved_into_the_model_config():
    for variant, extra, want in [("lstm", {}, "cudnn"), ("rnn", {}, "cudnn"), ("gru", {}, "cudnn"),
                                 ("gru", {"gru_form": "cho"}, "custom"), ("peephole", {}, "custom"),
                                 ("coupled", {}, "custom")]:
        cfg = cfg_of(variant, "auto", **extra)
        model = build_model(cfg)
        assert model.cfg.backend == want
        assert cfg.backend == "auto"  # the caller's config is left alone
        assert model.cfg.to_dict() == {**cfg.to_dict(), "backend": want}


@pytest.mark.parametrize("variant,extra", [("peephole", {}), ("peephole", {"peephole_form": "full"}),
                                           ("coupled", {}), ("gru", {"gru_form": "cho"})])
def test_impossible_pairs_are_usage_errors(variant, extra):
    with pytest.raises(UsageError, match="--backend custom"):
        build_model(cfg_of(variant, "cudnn", **extra))
    custom = build_model(cfg_of(variant, "custom", **extra))
    with pytest.raises(UsageError, match="no cuDNN layout"):
        convert_state_dict(custom.state_dict(), custom.cfg, "cudnn")


def test_missing_vocabulary_is_a_usage_error():
    with pytest.raises(UsageError):
        build_model(ModelConfig(vocab_size=0))


@pytest.mark.parametrize("variant,extra", [("lstm", {}), ("gru", {}), ("rnn", {})])
def test_state_dict_round_trip_between_backends(variant, extra):
    cudnn = model_of(variant, "cudnn", **extra)
    custom = model_of(variant, "custom", seed=5, **extra)
    sd = cudnn.state_dict()
    as_custom = convert_state_dict(sd, cudnn.cfg, "custom")
    assert set(as_custom) == set(custom.state_dict())
    back = convert_state_dict(as_custom, cudnn.cfg, "cudnn")
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert convert_state_dict(sd, cudnn.cfg, "cudnn").keys() == sd.keys()  # already in layout: unchanged

    idx = torch.randint(0, V, (6, 2))
    custom.load_state_dict(sd)  # load_state_dict accepts either layout
    torch.testing.assert_close(custom(idx)[0], cudnn(idx)[0])
    other = model_of(variant, "cudnn", seed=9, **extra)
    other.load_state_dict(custom.state_dict())
    torch.testing.assert_close(other(idx)[0], cudnn(idx)[0])


def test_forward_with_gates_matches_forward_on_both_backends():
    idx = torch.randint(0, V, (6, 2))
    for backend in ("cudnn", "custom"):
        model = model_of("lstm", backend).eval()
        logits, st = model(idx)
        logits_g, st_g, gates = model.forward_with_gates(idx)
        torch.testing.assert_close(logits_g, logits)
        torch.testing.assert_close(st_g.c, st.c)
        assert len(gates) == 3 and set(gates[0]) == set("ifgoch") and gates[0]["f"].shape == (6, 2, H)


def test_state_in_another_dtype_is_accepted():
    """A state carried from a bf16-autocast window (or any dtype) is cast to the weights' dtype."""
    model = model_of("lstm", "custom")
    st = model.init_state(2)
    logits, _ = model(torch.randint(0, V, (3, 2)), State(st.h.float(), st.c.float()))
    assert logits.dtype == torch.float64


def test_layer_dropout_only_in_training():
    for backend in ("cudnn", "custom"):
        plain = model_of("lstm", backend, dropout=0.0)
        dropped = model_of("lstm", backend, dropout=0.5)
        dropped.load_state_dict(plain.state_dict())
        idx = torch.randint(0, V, (5, 2))
        torch.testing.assert_close(dropped.eval()(idx)[0], plain.eval()(idx)[0])
        assert not torch.allclose(dropped.train()(idx)[0], plain(idx)[0])


# --------------------------------------------------------------------------- initialisation
def gate_bias_sum(model, k, block):
    """Layer k's total bias of gate block `block` (b_ih + b_hh in two-bias layouts)."""
    rows = slice(block * model.cfg.hidden, (block + 1) * model.cfg.hidden)
    if model.cfg.backend == "cudnn":
        return getattr(model.rnn, f"bias_ih_l{k}")[rows] + getattr(model.rnn, f"bias_hh_l{k}")[rows]
    cell = model.rnn.layers[k].cell
    return cell.bias_ih[rows] + cell.bias_hh[rows] if cell.bias_ih is not None else cell.bias[rows]


@pytest.mark.parametrize("form,backend", PAIRS, ids=PAIR_IDS)
def test_uniform_init_and_forget_bias(form, backend):
    _, variant, extra = form
    Hb = 64
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=V, variant=variant, backend=backend, embed=E, hidden=Hb,
                                    layers=2, forget_bias=2.5, **extra))
    bound = 1 / math.sqrt(Hb)
    f_block = {"lstm": 1, "peephole": 1, "coupled": 0}.get(variant)
    for k in range(2):
        for name, p in model.rnn.named_parameters():
            if "bias" not in name:
                assert p.abs().max() <= bound and p.std() > bound / 3, name
        if f_block is None:  # gru, rnn: no forget-gate bias, all biases uniform
            for name, p in model.rnn.named_parameters():
                assert p.abs().max() <= bound, name
        else:
            assert torch.allclose(gate_bias_sum(model, k, f_block), torch.full((Hb,), 2.5))
            other = [b for b in range(model.rnn.layers[0].cell.gate_blocks if backend == "custom" else 4)
                     if b != f_block]
            for b in other:
                assert gate_bias_sum(model, k, b).abs().max() <= 2 * bound
    assert model.head.bias.abs().max() == 0
    assert model.head.weight.abs().max() <= bound


def test_embedding_init():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=65, embed=64, hidden=8, layers=1))
    assert 0.9 < model.embedding.weight.std() < 1.1 and abs(model.embedding.weight.mean()) < 0.05


@pytest.mark.parametrize("variant,backend,extra", [
    ("lstm", "cudnn", {}), ("lstm", "custom", {}), ("peephole", "custom", {}), ("coupled", "custom", {}),
    ("gru", "cudnn", {}), ("gru", "custom", {"gru_form": "cho"})])
def test_chrono_init(variant, backend, extra):
    torch.manual_seed(0)
    tmax = 50
    model = build_model(ModelConfig(vocab_size=V, variant=variant, backend=backend, embed=E, hidden=64,
                                    layers=2, init="chrono", chrono_tmax=tmax, **extra))
    lo, hi = 0.0, math.log(tmax - 1)
    for k in range(2):
        if variant in ("lstm", "peephole"):
            bf, bi = gate_bias_sum(model, k, 1), gate_bias_sum(model, k, 0)
            torch.testing.assert_close(bi, -bf)
        elif variant == "coupled":
            bf = gate_bias_sum(model, k, 0)
        elif extra.get("gru_form") == "cho":
            bf = -gate_bias_sum(model, k, 1)  # 1 - z keeps the old state
        else:
            bf = gate_bias_sum(model, k, 1)  # z keeps the old state
        assert bool(((bf >= lo) & (bf <= hi)).all())
        assert bf.std() > 0.3  # spread over time scales, not a constant


def test_chrono_tmax_defaults_when_unset():
    model = build_model(cfg_of("lstm", init="chrono", chrono_tmax=0))
    assert model.cfg.chrono_tmax == 128
    with pytest.raises(UsageError):
        build_model(cfg_of("lstm", init="chrono", chrono_tmax=1))


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=65, variant="lstm", embed=16, hidden=64, layers=2))
    idx = torch.randint(0, 65, (20, 4))
    logits, _ = model(idx)
    loss = F.cross_entropy(logits.reshape(-1, 65), idx.reshape(-1))
    assert abs(loss.item() - math.log(65)) < 0.3


# --------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("form,backend", PAIRS, ids=PAIR_IDS)
def test_cuda_matches_cpu_and_runs_under_bf16_autocast(form, backend):
    _, variant, extra = form
    model = model_of(variant, backend, dtype=torch.float32, layers=2, **extra)
    idx = torch.randint(0, V, (6, 3))
    cpu_logits, _ = model(idx)
    model = model.cuda()
    logits, st = model(idx.cuda())
    torch.testing.assert_close(logits.cpu(), cpu_logits, rtol=1e-3, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits_bf, st_bf = model(idx.cuda())
        logits_bf2, _ = model(idx.cuda(), detach_state(st_bf))  # carry a bf16-autocast state
    loss = F.cross_entropy(logits_bf.float().reshape(-1, V), idx.cuda().reshape(-1)) + logits_bf2.float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(logits_bf.float(), logits, rtol=0.1, atol=0.1)
    model.eval()(idx.cuda(), st_bf)  # a bf16 state fed back outside autocast

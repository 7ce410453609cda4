"""The native sampling step (charlstm/csrc/sample_step.c) against model.forward and the torch step."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from charlstm.cli import app
from charlstm.config import ModelConfig
from charlstm.errors import UsageError
from charlstm.model import build_model
from charlstm.native import build as native_build
from charlstm.native.step import NativeStep
from charlstm.sample import generate
from charlstm.sampling import SamplingOptions
from charlstm.steppers import FastStep, make_stepper, read_prime

from conftest import draw, save_run, tiny_vocab

VOCAB = tiny_vocab()
LIB, WHY = native_build.library()
needs_native = pytest.mark.skipif(LIB is None, reason=f"the native step is unavailable here: {WHY}")

SHAPES = [(1, 8), (2, 16), (3, 24), (2, 72)]     # (layers, hidden); 2H = 144 rows: more than one block of 128


def lstm(layers: int, hidden: int, vocab: int = 70, backend: str = "auto", bias: bool = True,
         **case) -> torch.nn.Module:
    """An LSTM (or the variant in `case`) with weights large enough that every gate matters
    (float32, the native step's type)."""
    torch.manual_seed(layers * 100 + hidden)
    model = build_model(ModelConfig(vocab_size=vocab, embed=6, hidden=hidden, layers=layers, backend=backend,
                                    bias=bias, **case))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.6, 0.6)
    return model.eval()


def stepped(stepper, model, idx):
    """Logits (T, B, V) and final state of feeding idx (T, B) one character at a time."""
    stepper.load_state(model.init_state(idx.shape[1]))
    out = torch.stack([stepper.advance(x) for x in idx])
    return out, stepper.get_state()


@needs_native
@pytest.mark.parametrize("B", [1, 2, 5, 17])                  # one stream, pairs, one left over, two groups
@pytest.mark.parametrize("layers, hidden", SHAPES)
@pytest.mark.parametrize("backend, bias", [("cudnn", True), ("custom", True), ("cudnn", False)])
def test_native_step_gives_the_logits_and_state_of_forward(B, layers, hidden, backend, bias):
    model = lstm(layers, hidden, backend=backend, bias=bias)
    check_against_forward(model, B)


def check_against_forward(model, B: int, tol: float = 1e-5) -> None:
    """The native step fed 10 characters gives model.forward's logits and final state."""
    idx = torch.randint(0, 70, (10, B))
    with torch.inference_mode():
        ref, ref_state = model(idx)                                      # (T, B, V)
        out, state = stepped(NativeStep(model), model, idx)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.h, ref_state.h, rtol=tol, atol=tol)
    if ref_state.c is None:
        assert state.c is None
    else:
        torch.testing.assert_close(state.c, ref_state.c, rtol=tol, atol=tol)


# The other variants the native step runs (every form but peephole full).
OTHER_VARIANTS = [dict(variant="peephole"), dict(variant="peephole", peepholes="fo", backend="custom"),
                  dict(variant="coupled", backend="custom"), dict(variant="coupled", backend="custom", bias=False),
                  dict(variant="gru"), dict(variant="gru", backend="custom"), dict(variant="gru", bias=False),
                  dict(variant="gru", gru_form="cho"), dict(variant="gru", gru_form="cho", bias=False),
                  dict(variant="rnn"), dict(variant="rnn", backend="custom")]


@needs_native
@pytest.mark.parametrize("B", [1, 5, 17])
@pytest.mark.parametrize("layers, hidden", [(1, 8), (3, 24), (2, 72)])
@pytest.mark.parametrize("case", OTHER_VARIANTS, ids=lambda c: "-".join(map(str, c.values())))
def test_native_step_of_every_other_variant_gives_the_logits_and_state_of_forward(case, layers, hidden, B):
    # the vanilla rnn with these large weights is chaotic: float rounding grows to a few 1e-5 of
    # logits about 10 in size within 10 steps (torch's two backends differ as much)
    check_against_forward(lstm(layers, hidden, **case), B, tol=2e-4 if case["variant"] == "rnn" else 1e-5)


def half_weights(model):
    """A copy of the model whose matrices the fp16 step rounds (all but layer 0's input weights,
    which it folds into a float32 table with the embedding) rounded to float16."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "weight" in name and name not in ("embedding.weight", "rnn.weight_ih_l0"):
                p.copy_(p.half().float())
    return m


@needs_native
@pytest.mark.parametrize("layers, hidden", SHAPES)
def test_fp16_step_is_forward_with_its_weights_rounded_to_fp16(layers, hidden):
    model = lstm(layers, hidden)
    idx = torch.randint(0, 70, (10, 3))
    with torch.inference_mode():
        ref, _ = half_weights(model)(idx)
        exact, _ = model(idx)
        out, _ = stepped(NativeStep(model, "fp16"), model, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)             # float32 arithmetic on fp16 weights
    assert 0 < (out - exact).abs().max() < 0.02                           # and what rounding costs


@needs_native
@pytest.mark.parametrize("opts", [SamplingOptions(temperature=0.8), SamplingOptions(greedy=True)],
                         ids=["temperature", "greedy"])
def test_native_generation_draws_what_the_torch_step_draws(opts):
    model = lstm(2, 16)
    outs = []
    with torch.inference_mode():
        for stepper in (FastStep(model), NativeStep(model)):
            logits, state = read_prime(model, torch.tensor([1, 2, 3]), 3)
            stepper.load_state(state)
            gen = torch.Generator().manual_seed(7)
            a, logits = draw(stepper, logits, 20, opts, gen)
            b, logits = draw(stepper, logits, 20, opts, gen)          # chunks continue each other
            outs.append((torch.cat([a, b]), logits))
    assert outs[1][0].dtype == torch.int64 and outs[1][0].shape == (40, 3)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


@needs_native
def test_threads_share_the_step_without_changing_it():
    model = lstm(2, 24)
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                step = NativeStep(model)
                logits, state = read_prime(model, torch.tensor([4, 5]), 5)
                step.load_state(state)
                ids, logits = draw(step, logits, 30, SamplingOptions(), torch.Generator().manual_seed(1))
            runs.append((ids, logits, step.get_state().c))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)                                     # each panel's sums in the same order


@needs_native
def test_make_stepper_takes_the_native_step_where_it_can_run():
    model = lstm(2, 16)
    assert isinstance(make_stepper(model), NativeStep)
    assert make_stepper(model, precision="fp16").name == "native step (fp16)"
    # top-k and top-p, other variants, sizes and types take the torch step
    assert isinstance(make_stepper(model, options=SamplingOptions(top_k=5)), FastStep)
    assert isinstance(make_stepper(model, options=SamplingOptions(top_k=5, greedy=True)), NativeStep)
    assert isinstance(make_stepper(model, native=False), FastStep)
    assert isinstance(make_stepper(lstm(2, 16, variant="gru", gru_form="cho")), NativeStep)
    for other in (lstm(2, 12), lstm(2, 16).double(), lstm(2, 16, variant="peephole", peephole_form="full")):
        assert isinstance(make_stepper(other), FastStep)
        with pytest.raises(UsageError, match="needs the native step"):
            make_stepper(other, precision="fp16")
    with pytest.raises(UsageError, match="--precision must be one of fp32, fp16"):
        make_stepper(model, precision="int4")


def test_without_a_compiler_the_torch_step_samples(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "_LIB", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))                  # nothing compiled yet
    monkeypatch.setenv("CC", "no-such-compiler-here")
    lib, why = native_build.library()
    assert lib is None and ("no C compiler" in why or "lacks" in why or "needs Linux" in why)
    model = lstm(2, 16)
    assert isinstance(make_stepper(model), FastStep)
    with pytest.raises(UsageError, match="needs the native step"):
        make_stepper(model, precision="fp16")
    monkeypatch.setattr(native_build, "_LIB", {})
    monkeypatch.setenv("CHARLSTM_NO_NATIVE", "1")
    assert native_build.library() == (None, "turned off by CHARLSTM_NO_NATIVE")


@needs_native
def test_compiling_into_an_empty_cache_is_atomic_and_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "_LIB", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib, why = native_build.library()
    assert lib is not None, why
    built = list((tmp_path / "charlstm").iterdir())
    assert len(built) == 1 and built[0].name.startswith("charlstm-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native_build, "_LIB", {})
    assert native_build.library()[0] is not None
    assert [p.stat().st_mtime_ns for p in (tmp_path / "charlstm").iterdir()] == [stamp]


# --------------------------------------------------------------------------- the command

def invoke(*args):
    return CliRunner().invoke(app, ["sample", *map(str, args)])


def text_lstm_run(tmp_path, hidden: int = 16):
    """A run of an LSTM over the tiny corpus's vocabulary that the native step can sample."""
    run = tmp_path / "run"
    save_run(run, dict(variant="lstm"))                                 # then swap in a size it takes
    save_run(run, step=20, model=build_model(ModelConfig(vocab_size=len(VOCAB), embed=5, hidden=hidden, layers=2)))
    return run


@needs_native
def test_sample_command_with_the_native_step(tmp_path):
    run = text_lstm_run(tmp_path)
    a = invoke(run, "--prime", "Café ", "--length", "60", "--seed", "3")
    assert a.exit_code == 0, a.output
    assert a.stdout.startswith("Café ") and len(a.stdout) == len("Café ") + 60 + 1
    assert invoke(run, "--prime", "Café ", "--length", "60", "--seed", "3", "--threads", "2").stdout == a.stdout
    h = invoke(run, "--prime", "Café ", "--length", "60", "--seed", "3", "--precision", "fp16")
    assert h.exit_code == 0 and h.stdout.startswith("Café ") and len(h.stdout) == len(a.stdout)
    # greedy (native) and top-k 1 (torch step) pick the same characters
    g = invoke(run, "--length", "50", "--greedy", "--seed", "1").stdout
    assert g == invoke(run, "--length", "50", "--top-k", "1", "--seed", "2").stdout
    gen = generate(build_model(ModelConfig(vocab_size=len(VOCAB), hidden=16)), VOCAB, length=5, seed=1)
    assert gen.stepper == "native step (fp32)"


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp8"], "--precision must be one of fp32, fp16"),
    (["--precision", "fp16"], "--precision fp16 needs the native step"),
])
def test_precision_errors_are_one_clear_line(tmp_path, args, message):
    save_run(tmp_path / "run", dict(variant="peephole", peephole_form="full"))
    r = invoke(tmp_path / "run", *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output and r.stderr.count("\n") == 1

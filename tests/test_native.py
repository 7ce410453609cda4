"""The native sampling step (charlstm/csrc/sample_step.c) against model.forward and the torch step; how
the library is built, cached and checked (native/build.py, native/abi.py)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import draw, save_run, tiny_vocab
from torch import Tensor
from typer.testing import CliRunner

from charlstm import runtime
from charlstm.cli import app
from charlstm.config import ModelConfig
from charlstm.errors import CharlstmError, UsageError
from charlstm.model import build_model
from charlstm.native import abi
from charlstm.native import build as native_build
from charlstm.native.pack import int8_rounded
from charlstm.native.step import NativeStep
from charlstm.registry import spec_named
from charlstm.sample import generate
from charlstm.sampling import SamplingOptions
from charlstm.steppers import FastStep, make_stepper, read_prime

VOCAB = tiny_vocab()
LIB, WHY = native_build.library()
needs_native = pytest.mark.skipif(LIB is None, reason=f"the native step is unavailable here: {WHY}")

# (layers, hidden); 2H = 144 rows: more than one block of 128; 12 and 7 are padded to 16 and 8
SHAPES = [(1, 8), (2, 16), (3, 24), (2, 72), (2, 12), (1, 7)]


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


# The other variants and forms (the native step runs every one).
OTHER_VARIANTS = [dict(variant="peephole"), dict(variant="peephole", peepholes="fo", backend="custom"),
                  dict(variant="peephole", peephole_form="full"),
                  dict(variant="peephole", peephole_form="full", peepholes="fi", bias=False),
                  dict(variant="coupled", backend="custom"), dict(variant="coupled", backend="custom", bias=False),
                  dict(variant="gru"), dict(variant="gru", backend="custom"), dict(variant="gru", bias=False),
                  dict(variant="gru", gru_form="cho"), dict(variant="gru", gru_form="cho", bias=False),
                  dict(variant="rnn"), dict(variant="rnn", backend="custom")]


def chaotic(case: dict) -> bool:
    """The vanilla rnn with these large weights is chaotic: float rounding grows to a few 1e-5 of logits
    about 10 in size within 10 steps (torch's two backends differ as much); the full peephole's H x H
    matrices of weights up to 0.6 make its sums large too."""
    return case["variant"] == "rnn" or case.get("peephole_form") == "full"


@needs_native
@pytest.mark.parametrize("B", [1, 5, 17])
@pytest.mark.parametrize("layers, hidden", [(1, 8), (3, 24), (2, 72), (2, 20)])
@pytest.mark.parametrize("case", OTHER_VARIANTS, ids=lambda c: "-".join(map(str, c.values())))
def test_native_step_of_every_other_variant_gives_the_logits_and_state_of_forward(case, layers, hidden, B):
    check_against_forward(lstm(layers, hidden, **case), B, tol=2e-4 if chaotic(case) else 1e-5)


def rounded_weights(model, rounded):
    """A copy of the model whose matrices are rounded as the fp16 and int8 steps round theirs: every
    recurrent matrix, the input matrices of layers k >= 1 (for the lstm family and the rnn, which stack
    [W_ih, W_hh] there, the two together: int8 scales each stacked row), the full peepholes' matrices
    and the head; not layer 0's input weights, which the step folds with the embedding into a float32
    table, nor biases and diagonal peepholes."""
    m = copy.deepcopy(model)
    stacked = m.spec.step not in ("gru", "gru_cho")
    with torch.no_grad():
        for k in range(m.cfg.layers):
            lw = m.layer_weights(k)
            if k > 0 and stacked:
                both = rounded(torch.cat([lw.w_ih, lw.w_hh], 1))
                lw.w_ih.copy_(both[:, :lw.w_ih.shape[1]])
                lw.w_hh.copy_(both[:, lw.w_ih.shape[1]:])
            else:
                lw.w_hh.copy_(rounded(lw.w_hh))
                if k > 0:
                    lw.w_ih.copy_(rounded(lw.w_ih))
            if lw.peep is not None and lw.peep[0].dim() == 2:
                lw.peep[0].copy_(rounded(lw.peep[0]))
        m.head.weight.copy_(rounded(m.head.weight))
    return m


def half_weights(model):
    """The model with the matrices the fp16 step rounds rounded to float16."""
    return rounded_weights(model, lambda w: w.half().float())


def int8_weights(model):
    """The model with the matrices the int8 step rounds rounded to int8, each row (an output unit's
    weights) with its own scale."""
    return rounded_weights(model, int8_rounded)


@needs_native
@pytest.mark.parametrize("layers, hidden", SHAPES)
@pytest.mark.parametrize("backend", ["cudnn", "custom"])
def test_fp16_step_is_forward_with_its_weights_rounded_to_fp16(layers, hidden, backend):
    model = lstm(layers, hidden, backend=backend)
    idx = torch.randint(0, 70, (10, 3))
    with torch.inference_mode():
        ref, _ = half_weights(model)(idx)
        exact, _ = model(idx)
        out, _ = stepped(NativeStep(model, "fp16"), model, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)             # float32 arithmetic on fp16 weights
    assert 0 < (out - exact).abs().max() < 0.02                           # and what rounding costs


@needs_native
@pytest.mark.parametrize("case", [dict(variant="lstm")] + OTHER_VARIANTS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("layers, hidden", [(2, 16), (3, 12)])
def test_int8_step_is_forward_with_its_weights_rounded_to_int8(case, layers, hidden):
    model = lstm(layers, hidden, **case)
    idx = torch.randint(0, 70, (10, 3))
    with torch.inference_mode():
        ref, _ = int8_weights(model)(idx)
        exact, _ = model(idx)
        out, _ = stepped(NativeStep(model, "int8"), model, idx)
    tol = 1e-3 if chaotic(case) else 1e-4                                 # scaled after the sums: other rounding
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert 0 < (out - exact).abs().max() < 0.5                            # and what rounding costs (weights ~0.6)


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
def test_threads_share_the_step_without_changing_it(monkeypatch):
    monkeypatch.setattr(runtime, "GRAIN", 1)                 # every thread asked for, however small the step
    model = lstm(2, 24)
    runs = []
    with torch.inference_mode():
        prime = read_prime(model, torch.tensor([4, 5]), 5)          # torch's products: threads may reorder sums
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                step = NativeStep(model)
                logits, state = prime
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
    assert make_stepper(model, precision="int8").name == "native step (int8)"
    # top-k and top-p, float64 and switching it off take the torch step
    assert isinstance(make_stepper(model, options=SamplingOptions(top_k=5)), FastStep)
    assert isinstance(make_stepper(model, options=SamplingOptions(top_k=5, greedy=True)), NativeStep)
    assert isinstance(make_stepper(model, native=False), FastStep)
    for other in (lstm(2, 16, variant="gru", gru_form="cho"), lstm(2, 12), lstm(2, 16, variant="peephole",
                                                                                 peephole_form="full")):
        assert isinstance(make_stepper(other), NativeStep)
    assert isinstance(make_stepper(lstm(2, 16).double()), FastStep)
    for precision in ("fp16", "int8"):
        with pytest.raises(UsageError, match=f"--precision {precision} needs the native step"):
            make_stepper(lstm(2, 16).double(), precision=precision)
    with pytest.raises(UsageError, match="--precision must be one of fp32, fp16, int8"):
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
def test_compiling_into_an_empty_cache_says_so_once_and_is_reused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(native_build, "_LIB", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib, why = native_build.library()
    assert lib is not None, why
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling its native kernels" in err and "once" in err
    built = sorted(p.name for p in (tmp_path / "charlstm").iterdir())
    name = built[0].removesuffix(".lock")
    assert built == [f"{name}.lock", f"{name}.so", f"{name}.so.sha256"] and name.startswith("charlstm-")
    stamp = (tmp_path / "charlstm" / f"{name}.so").stat().st_mtime_ns
    monkeypatch.setattr(native_build, "_LIB", {})
    assert native_build.library()[0] is not None
    assert (tmp_path / "charlstm" / f"{name}.so").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""                                  # loaded, not compiled


def cached_copy(tmp_path):
    """The test session's library copied into an empty cache at tmp_path (without compiling)."""
    target = native_build.target_for([*native_build.FLAGS, native_build.OPENMP])
    assert native_build.verified(target), "the test session's library was built with OpenMP"
    new = tmp_path / "charlstm" / target.name
    new.parent.mkdir(parents=True)
    for suffix in ("", ".sha256"):
        new.with_name(new.name + suffix).write_bytes(target.with_name(target.name + suffix).read_bytes())
    return new


@needs_native
@pytest.mark.parametrize("damage", ["truncated", "overwritten", "record missing"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(monkeypatch, tmp_path, capsys, damage):
    so = cached_copy(tmp_path)
    if damage == "truncated":
        so.write_bytes(so.read_bytes()[:len(so.read_bytes()) // 2])       # loading it would be a Bus error
    elif damage == "overwritten":
        data = bytearray(so.read_bytes())
        data[5000:5100] = bytes(100)
        so.write_bytes(bytes(data))
    else:
        so.with_name(so.name + ".sha256").unlink()
    monkeypatch.setattr(native_build, "_LIB", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert not native_build.verified(so)
    lib, why = native_build.library()
    assert lib is not None and why == "ready"
    assert native_build.verified(so) and "compiling" in capsys.readouterr().err


def test_concurrent_processes_compile_once(tmp_path):
    """Three processes starting on an empty cache at once: one compiles (and says so), the others
    wait for it and load what it built."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from charlstm.native import build; lib, why = build.library(); "
            "print(why, lib is not None, build._LIB.get('seconds') is not None)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    if LIB is None:
        assert all("True" not in out for out, _ in outs)
        return
    assert [out.split()[:2] for out, _ in outs] == [["ready", "True"]] * 3
    assert sum(out.split()[2] == "True" for out, _ in outs) == 1          # one of them compiled
    assert sum("compiling" in err for _, err in outs) == 1
    assert len(list((tmp_path / "charlstm").glob("*.so"))) == 1


# --------------------------------------------------------------------------- the ABI

@needs_native
def test_the_library_agrees_with_abi_py():
    assert abi.mismatch(LIB) is None
    assert abi.c_slots(LIB, 0, "lstm") == (0, 1, 3, 2)


@needs_native
def test_the_registry_and_the_step_layout_use_the_c_slot_tables():
    from charlstm.registry import CELLS
    from charlstm.stepweights import STEP_ORDER

    for spec in CELLS:
        if spec.kernel is not None:
            assert spec.kernel.slots == abi.c_slots(LIB, 0, spec.kernel.kind), spec.name
    for kind in abi.KINDS:
        step_kind = "peephole" if kind == "peephole_full" else kind
        assert STEP_ORDER.get(step_kind, tuple(range(abi.GATES[kind]))) == abi.c_slots(LIB, 1, kind), kind
    assert all(spec.kernel is not None for spec in CELLS if spec.variant != "mogrifier")


@needs_native
def test_a_library_that_disagrees_with_abi_py_is_removed_and_never_called(monkeypatch, tmp_path):
    so = cached_copy(tmp_path)
    monkeypatch.setattr(abi, "KINDS", {**abi.KINDS, "lstm2": 7})
    lib, why, rebuild = native_build._load(so)
    assert lib is None and rebuild and "does not match charlstm/native/abi.py" in why and "lstm2" in why
    assert not so.exists()
    monkeypatch.setattr(abi, "KINDS", dict(abi.KINDS))
    so = cached_copy(tmp_path / "again")
    monkeypatch.setattr(abi, "VERSION", 99)
    assert "ABI version 2, charlstm expects 99" in native_build._load(so)[1]


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
    for precision in ("fp16", "int8"):
        h = invoke(run, "--prime", "Café ", "--length", "60", "--seed", "3", "--precision", precision)
        assert h.exit_code == 0 and h.stdout.startswith("Café ") and len(h.stdout) == len(a.stdout)
    # greedy (native) and top-k 1 (torch step) pick the same characters
    g = invoke(run, "--length", "50", "--greedy", "--seed", "1").stdout
    assert g == invoke(run, "--length", "50", "--top-k", "1", "--seed", "2").stdout
    gen = generate(build_model(ModelConfig(vocab_size=len(VOCAB), hidden=16)), VOCAB, length=5, seed=1)
    assert gen.stepper == "native step (fp32)"


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp8"], "--precision must be one of fp32, fp16, int8"),
    (["--precision", "int8"], "--precision int8 needs the native step"),
])
def test_precision_errors_are_one_clear_line(tmp_path, monkeypatch, args, message):
    save_run(tmp_path / "run", dict(variant="peephole", peephole_form="full"))
    monkeypatch.setattr(native_build, "_LIB", {"lib": None, "why": "turned off by CHARLSTM_NO_NATIVE"})
    r = invoke(tmp_path / "run", *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output and r.stderr.count("\n") == 1


# --------------------------------------------------------------------------- the checked boundary

class Spy:
    """The library with calls of its kernels (not of abi.c's tables) recorded."""

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def __getattr__(self, name):
        attr = getattr(self.lib, name)
        if name not in abi.ENTRY_POINTS:
            return attr

        def call(*args):
            self.calls.append(name)
            return attr(*args)
        return call


@pytest.fixture
def spy(monkeypatch):
    """Every call of a kernel from now on, through the library the loops and the step use."""
    s = Spy(LIB)
    monkeypatch.setitem(native_build._LIB, "lib", s)
    return s


LOOP_KINDS = ["lstm", "peephole:diag", "peephole:full", "coupled", "gru:cudnn", "gru:cho", "rnn"]
COPIED = ("w_hh", "b_hh", "peep")        # arguments the loops repack: any strides will do


def loop_args(name: str, gen, T: int = 2, B: int = 2, H: int = 8) -> tuple[dict, dict]:
    """Valid arguments of recurrent_forward and recurrent_backward for a kernel's kind."""
    kind = spec_named(name).kernel.kind
    G = abi.GATES[kind]
    lstm_family = kind in ("lstm", "peephole", "peephole_full", "coupled")

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    hs = r(T + 1, B, H)
    fwd = dict(gates=r(T, B, G * H), w_hh=r(G * H, H, scale=0.3), hs=hs, cs=r(T + 1, B, H) if lstm_family else None,
               tcs=r(T, B, H) if lstm_family or kind == "gru" else None)
    if kind == "peephole":
        fwd["peep"] = r(3, H, scale=0.3)
    if kind == "peephole_full":
        fwd["peep"] = r(3 * H, H, scale=0.1)
    bwd = dict(fwd, dhs=r(T, B, H), dpre=r(T, B, G * H), dh=r(B, H), dc=None if kind == "rnn" else r(B, H))
    if kind == "gru":
        fwd["b_hh"] = r(3 * H)
        bwd["dph"] = r(T, B, 3 * H)
    if kind == "gru_cho":
        fwd["rh"] = r(T, B, H)
    return fwd, bwd


def strided(t: Tensor) -> Tensor:
    """A non-contiguous view with t's shape and values."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def mutated(t, how: str, gen):
    """t spoiled in one way: another type, device, shape or layout, or not a tensor."""
    if how == "dtype":
        dtypes = [torch.float64, torch.float16, torch.int32, torch.bfloat16]
        return t.to(dtypes[int(torch.randint(4, (1,), generator=gen))])
    if how == "device":
        return torch.empty(t.shape, device="meta")
    if how == "strides":
        return strided(t)
    if how == "not a tensor":
        return t.tolist()
    shape = list(t.shape)
    d = int(torch.randint(len(shape) + 1, (1,), generator=gen))
    if d == len(shape):
        shape = [1] + shape                                          # one dimension too many
    else:
        shape[d] += 1 if shape[d] == 1 or int(torch.randint(2, (1,), generator=gen)) else -1
    return torch.randn(shape, generator=gen)


@needs_native
def test_fuzzing_the_loops_boundary_nothing_invalid_reaches_c(spy):
    """Random kinds, arguments and ways to spoil one of them (type, device, strides, shape, missing or
    unexpected tensors): a CharlstmError and no call of C; where the spoiled argument is one the loops
    repack (non-contiguous weights), a call with the same results as contiguous ones."""
    from charlstm.native import loops

    gen = torch.Generator().manual_seed(0)
    ways = ["dtype", "device", "strides", "shape", "not a tensor", "missing", "unexpected"]
    checked = {"refused": 0, "accepted": 0}
    for trial in range(400):
        name = LOOP_KINDS[trial % len(LOOP_KINDS)]
        kernel = spec_named(name).kernel
        backward = bool(trial // len(LOOP_KINDS) % 2)
        fwd, bwd = loop_args(name, gen)
        args = bwd if backward else fwd
        fn = loops.recurrent_backward if backward else loops.recurrent_forward
        how = ways[int(torch.randint(len(ways), (1,), generator=gen))]
        if how == "unexpected":                                          # a tensor where the kind takes None
            optional = ("cs", "tcs", "dc", "dph", "peep") if backward else ("cs", "tcs", "b_hh", "peep", "rh")
            absent = [k for k in optional if args.get(k) is None]
            if not absent:
                continue
            key = absent[int(torch.randint(len(absent), (1,), generator=gen))]
            args = dict(args, **{key: torch.zeros(3)})
        else:
            present = [k for k, v in args.items() if v is not None and not (how == "missing" and k == "b_hh")]
            key = present[int(torch.randint(len(present), (1,), generator=gen))]
            args = dict(args, **{key: None if how == "missing" else mutated(args[key], how, gen)})
        before = len(spy.calls)
        if how == "strides" and key in COPIED:
            reference = {k: v.clone() if isinstance(v, Tensor) else v for k, v in (bwd if backward else fwd).items()}
            fn(kernel, **args)
            fn(kernel, **{k: v.contiguous() if k in COPIED and isinstance(v, Tensor) else v
                          for k, v in reference.items()})
            outs = ("dpre", "dh", "dc", "dph") if backward else ("gates", "hs", "cs", "tcs", "rh")
            for k in outs:
                if args.get(k) is not None:
                    assert torch.equal(args[k], reference[k]), (name, key, k)
            assert len(spy.calls) == before + 2
            checked["accepted"] += 1
            continue
        with pytest.raises(CharlstmError, match="native loops: "):
            fn(kernel, **args)
        assert len(spy.calls) == before, (name, backward, key, how)
        checked["refused"] += 1
    assert checked["refused"] > 250 and checked["accepted"] > 5


@needs_native
@pytest.mark.parametrize("name", LOOP_KINDS)
def test_valid_loop_arguments_reach_c_once_each(spy, name):
    from charlstm.native import loops

    fwd, bwd = loop_args(name, torch.Generator().manual_seed(1))
    kernel = spec_named(name).kernel
    loops.recurrent_forward(kernel, **fwd)
    loops.recurrent_backward(kernel, **bwd)
    assert spy.calls == ["charlstm_rnn_forward", "charlstm_rnn_backward"]
    with pytest.raises(CharlstmError, match="unknown kernel"):
        loops.recurrent_forward(abi.Kernel("lstm", (0, 1, 2, 3)), **fwd)     # slots C does not use
    assert len(spy.calls) == 2


@needs_native
def test_fuzzing_the_step_boundary_nothing_invalid_reaches_c(spy):
    """Character ids out of range (the step would read past its table), and logits, noise, states
    and ids of the wrong shape, type, device or layout: a CharlstmError and no call of C."""
    model = lstm(2, 16)
    V = model.cfg.vocab_size
    step = NativeStep(model)
    with pytest.raises(CharlstmError, match="load_state first"):
        step.advance(torch.zeros(3, dtype=torch.int64))
    good = model.init_state(3)
    bad_states = [(torch.zeros(2, 3, 15), good.c), (torch.zeros(3, 3, 16), good.c), (good.h, None),
                  (good.h, torch.zeros(2, 4, 16)), (good.h.to(torch.int64), good.c), (good.h.to("meta"), good.c),
                  (good.h[0], good.c)]
    for h, c in bad_states:
        with pytest.raises(CharlstmError, match="native step: "):
            step.load_state(type(good)(h, c))
    step.load_state(good)
    ok = torch.tensor([0, V - 1, 5])
    bad_ids = [torch.tensor([0, V, 5]), torch.tensor([-1, 0, 0]), torch.tensor([2 ** 40, 0, 0]), ok[:2],
               ok.view(3, 1), ok.float(), ok.to("meta"), ok.bool(), [0, 1, 2]]
    gen = torch.Generator().manual_seed(0)
    for trial in range(100):
        if trial < len(bad_ids):
            x = bad_ids[trial % len(bad_ids)]
        else:
            x = mutated(ok, ["dtype", "device", "shape"][trial % 3], gen)
        if isinstance(x, Tensor) and x.dtype in (torch.int32,) and x.shape == (3,) and x.device.type == "cpu":
            continue                                                    # int32 ids in range are fine
        with pytest.raises(CharlstmError, match="native step: "):
            step.advance(x)
    assert spy.calls == []
    logits = step.advance(ok)
    assert logits.shape == (3, V) and spy.calls == ["charlstm_step"]
    step.advance(torch.stack([ok, ok], 1)[:, 0])                           # a strided view: copied, fine
    opts = SamplingOptions()
    noise = torch.rand(4, 3, V)
    bad_generate = [(logits[:2], 4, noise), (logits.to("meta"), 4, noise), (logits.long(), 4, noise),
                    (logits, 4, noise[:3]), (logits, 4, noise.to("meta")), (logits, 4, noise[:, :, :-1]),
                    (logits, -1, noise), (logits, 2.0, noise[:2])]
    for lg, n, nz in bad_generate:
        with pytest.raises(CharlstmError, match="native step: "):
            step.generate(lg, n, opts, nz)
    assert spy.calls == ["charlstm_step"] * 2                               # the two valid ones
    ids, _ = step.generate(logits, 4, opts, noise)
    assert ids.shape == (4, 3) and spy.calls[-1] == "charlstm_generate"


@needs_native
def test_the_c_entry_points_check_their_structs_too():
    """Sizes, kinds and missing arrays are refused by C itself (codes, not crashes)."""
    import ctypes

    H, B, T = 8, 2, 1
    gates, hs = torch.zeros(T, B, 4 * H), torch.zeros(T + 1, B, H)
    cs, tcs = torch.zeros(T + 1, B, H), torch.zeros(T, B, H)
    wf = torch.zeros(H // 8, H, 32)
    fields = dict(kind=0, T=T, B=B, H=H, threads=1, units=8, gates=gates.data_ptr(), wf=wf.data_ptr(), hs=hs.data_ptr(),
                  cs=cs.data_ptr(), tcs=tcs.data_ptr())
    assert LIB.charlstm_rnn_forward(ctypes.byref(abi.Seq(**fields))) == 0
    assert LIB.charlstm_rnn_forward(ctypes.byref(abi.Seq(**dict(fields, H=12)))) == 2
    assert LIB.charlstm_rnn_forward(ctypes.byref(abi.Seq(**dict(fields, units=16)))) == 2         # the rnn's only
    assert LIB.charlstm_rnn_forward(ctypes.byref(abi.Seq(**dict(fields, kind=7)))) == 1
    assert LIB.charlstm_rnn_forward(ctypes.byref(abi.Seq(**dict(fields, cs=None)))) == 3
    assert LIB.charlstm_rnn_backward(ctypes.byref(abi.Seq(**fields))) == 3           # no backward arrays
    step = NativeStep(lstm(1, 8))
    step.load_state(step_state := lstm(1, 8).init_state(2))
    assert LIB.charlstm_step(ctypes.byref(step.net), torch.tensor([0, 70]).data_ptr()) == 4    # id out of range
    step.net.precision = 3
    assert LIB.charlstm_step(ctypes.byref(step.net), torch.tensor([0, 1]).data_ptr()) == 1
    assert step_state.h.abs().sum() == 0


# --------------------------------------------------------------------------- --backend auto

def test_auto_takes_the_custom_cells_where_they_are_faster():
    from charlstm.model import describe_backend, resolve_backend

    def auto(variant, hidden=16, device="cpu", **extra):
        return resolve_backend(ModelConfig(vocab_size=5, variant=variant, hidden=hidden, **extra), device)

    native = LIB is not None
    for variant, extra in (("lstm", {}), ("rnn", {}), ("gru", {}), ("gru", {"gru_form": "cho"}), ("peephole", {}),
                           ("peephole", {"peephole_form": "full"}), ("coupled", {})):
        torch_twin = variant in ("lstm", "rnn") or (variant == "gru" and not extra)
        assert auto(variant, **extra) == ("custom" if native or not torch_twin else "cudnn"), (variant, extra)
        assert auto(variant, hidden=12, **extra) == ("cudnn" if torch_twin else "custom")    # no C loops at H = 12
        assert auto(variant, device="cuda", **extra) == ("cudnn" if torch_twin else "custom")  # cuDNN's kernels win
    assert resolve_backend(ModelConfig(vocab_size=5, backend="cudnn", hidden=16), "cpu") == "cudnn"   # asked for
    if native:
        assert describe_backend(build_model(ModelConfig(vocab_size=5, hidden=16), "cpu")) == "custom (native loops)"
    assert describe_backend(build_model(ModelConfig(vocab_size=5, hidden=16, backend="cudnn"))) == \
        "cudnn (torch.nn.LSTM)"
    odd = describe_backend(build_model(ModelConfig(vocab_size=5, hidden=12, backend="custom")))
    assert odd.startswith("custom (torch loops; native loop: ") and "multiple of 8 (this is 12)" in odd
    wide = describe_backend(build_model(ModelConfig(vocab_size=5, hidden=16, backend="custom")).double())
    assert wide == "custom (torch loops; native loop: the native loops run float32 on the CPU)"


def test_without_the_library_auto_keeps_torch_modules(monkeypatch):
    from charlstm.model import resolve_backend

    monkeypatch.setattr(native_build, "_LIB", {"lib": None, "why": "turned off by CHARLSTM_NO_NATIVE"})
    assert resolve_backend(ModelConfig(vocab_size=5, hidden=16), "cpu") == "cudnn"
    assert resolve_backend(ModelConfig(vocab_size=5, variant="coupled", hidden=16), "cpu") == "custom"
    assert native_build.status().startswith("unavailable (turned off by CHARLSTM_NO_NATIVE)")


@needs_native
def test_building_a_model_compiles_the_library_before_any_timing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(native_build, "_LIB", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build_model(ModelConfig(vocab_size=5, hidden=16, backend="custom"), "cpu")
    assert native_build._LIB.get("lib") is not None and "seconds" in native_build._LIB
    assert "compiling" in capsys.readouterr().err

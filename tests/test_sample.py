"""`charlstm sample`: the fast step against model.forward for every variant, sampling rules, primes, the CLI."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from conftest import draw, save_run, text_model, tiny_model, tiny_text, tiny_vocab
from typer.testing import CliRunner

from charlstm import diskfiles
from charlstm.cli import app
from charlstm.errors import CharlstmError, UsageError
from charlstm.sample import format_samples, generate
from charlstm.sampling import SamplingOptions, choose_next
from charlstm.steppers import FastStep, ModelStep, make_stepper, read_prime

# Every variant and form, on both backends where there are two.
VARIANTS = [
    dict(variant="rnn"),
    dict(variant="rnn", backend="custom"),
    dict(variant="lstm"),
    dict(variant="lstm", backend="custom"),
    dict(variant="lstm", bias=False),
    dict(variant="peephole"),
    dict(variant="peephole", peephole_form="full"),
    dict(variant="peephole", peepholes="fo"),
    dict(variant="coupled"),
    dict(variant="gru"),
    dict(variant="gru", backend="custom"),
    dict(variant="gru", gru_form="cho"),
    dict(variant="gru", gru_form="cho", bias=False),
]


def ident(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


VOCAB = tiny_vocab()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny operations on one thread: on a busy machine a second one only waits for its time slice."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the fast step

@pytest.mark.parametrize("case", VARIANTS, ids=ident)
def test_fast_step_gives_the_logits_and_state_of_forward(case):
    model = tiny_model(case)
    idx = torch.randint(0, 11, (9, 4))                                  # (T, B)
    with torch.inference_mode():
        ref, ref_state = model(idx)                                     # (T, B, V)
        step = FastStep(model)
        step.load_state(model.init_state(4))
        stepped = torch.stack([step.advance(x) for x in idx])           # (T, B, V)
        torch.testing.assert_close(stepped, ref)
        state = step.get_state()
        torch.testing.assert_close(state.h, ref_state.h)
        if ref_state.c is None:
            assert state.c is None
        else:
            torch.testing.assert_close(state.c, ref_state.c)


@pytest.mark.parametrize("case", VARIANTS, ids=ident)
def test_fast_generation_is_the_reference_generation(case):
    """Same seed: the TorchScript loop, the eager loop and model.forward step by step draw the same text."""
    model = tiny_model(case)
    opts = SamplingOptions(temperature=1.3, top_k=8, top_p=0.95)
    outs = []
    with torch.inference_mode():
        for stepper in (ModelStep(model), FastStep(model, script=False), FastStep(model, script=True)):
            logits, state = read_prime(model, torch.tensor([1, 2, 3]), 3)
            stepper.load_state(state)
            gen = torch.Generator().manual_seed(7)
            a, logits = draw(stepper, logits, 20, opts, gen)
            b, _ = draw(stepper, logits, 20, opts, gen)              # chunks continue each other
            outs.append(torch.cat([a, b]))
    assert outs[0].shape == (40, 3)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)


def test_the_stepper_is_the_fast_one_for_charmodels_and_scripted_where_possible():
    model = tiny_model(dict(variant="lstm"))
    assert isinstance(make_stepper(model), FastStep)
    assert isinstance(make_stepper(model, fast=False), ModelStep)
    assert make_stepper(model).scripted                                  # torch.jit works in this torch


def test_the_fast_step_continues_a_prime_read_by_forward():
    model = tiny_model(dict(variant="gru"))
    ids = torch.randint(0, 11, (30,))
    with torch.inference_mode():
        full, _ = model(ids.view(-1, 1))                                # (T, 1, V)
        logits, state = read_prime(model, ids[:20], 1)
        torch.testing.assert_close(logits, full[19])
        step = FastStep(model)
        step.load_state(state)
        for t in range(20, 30):
            torch.testing.assert_close(step.advance(ids[t:t + 1]), full[t])


# --------------------------------------------------------------------------- choosing the next character

def test_top_k_and_top_p_keep_only_the_likely_characters():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().expand(2000, 4)                                # (B, V)
    g = torch.Generator().manual_seed(0)
    assert set(choose_next(logits, 1.0, 2, 1.0, False, g).tolist()) == {1, 3}
    assert set(choose_next(logits, 1.0, 0, 0.75, False, g).tolist()) == {1, 3}      # 0.5 + 0.3 reaches 0.75
    assert set(choose_next(logits, 1.0, 0, 0.5, False, g).tolist()) == {1}
    assert set(choose_next(logits, 1.0, 0, 1.0, False, g).tolist()) == {0, 1, 2, 3}
    assert set(choose_next(logits, 1.0, 1, 1.0, False, g).tolist()) == {1}
    assert choose_next(logits, 1.0, 0, 1.0, True, g).unique().tolist() == [1]
    # temperature: low sharpens towards the most likely, high flattens
    cold = (choose_next(logits, 0.2, 0, 1.0, False, g) == 1).float().mean()
    hot = (choose_next(logits, 5.0, 0, 1.0, False, g) == 1).float().mean()
    assert cold > 0.9 and hot < 0.4


def test_draws_follow_the_softmax_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, -3.0, 1.5]])
    for temperature in (1.0, 0.7):
        ids = choose_next(logits.expand(40000, 7), temperature, 0, 1.0, False, g)
        freq = torch.bincount(ids, minlength=7).double() / ids.numel()
        torch.testing.assert_close(freq, torch.softmax(logits[0].double() / temperature, 0), atol=0.01, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "--temperature must be > 0"),
    (dict(temperature=-1.0), "--temperature must be > 0"),
    (dict(top_k=-2), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
])
def test_bad_sampling_options_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        SamplingOptions(**kwargs)


def test_same_seed_same_text_and_greedy_is_deterministic():
    model = text_model()
    a = generate(model, VOCAB, prime="def ", length=120, seed=3).texts
    b = generate(model, VOCAB, prime="def ", length=120, seed=3).texts
    c = generate(model, VOCAB, prime="def ", length=120, seed=4).texts
    assert a == b and a != c
    g1 = generate(model, VOCAB, prime="def ", length=80, seed=1, options=SamplingOptions(greedy=True)).texts
    g2 = generate(model, VOCAB, prime="def ", length=80, seed=2, options=SamplingOptions(greedy=True)).texts
    k1 = generate(model, VOCAB, prime="def ", length=80, seed=5, options=SamplingOptions(top_k=1)).texts
    assert g1 == g2 == k1
    # greedy is the argmax chain of model.forward itself
    with torch.inference_mode():
        ids = VOCAB.encode("def ")
        for _ in range(80):
            logits, _ = model(torch.tensor(ids).view(-1, 1))
            ids.append(int(logits[-1, 0].argmax()))
    assert g1 == [VOCAB.decode(ids)]


def test_batch_of_samples_differ_and_each_begins_with_the_prime():
    model = text_model(dict(variant="gru"))
    out = generate(model, VOCAB, prime="All:", length=60, num_samples=4, seed=0)
    assert len(out.texts) == 4 and len(set(out.texts)) == 4
    assert all(t.startswith("All:") and len(t) == 64 for t in out.texts)
    text = format_samples(out.texts)
    assert all(f"----- sample {i} of 4 -----\n" + out.texts[i - 1] in text for i in (1, 2, 3, 4))


def test_primes_any_length_unicode_and_unknown_characters():
    model = text_model()
    long_prime = tiny_text()[:3000]                                     # longer than --length, > one window
    out = generate(model, VOCAB, prime=long_prime, length=5, seed=0)
    assert out.texts[0].startswith(long_prime) and len(out.texts[0]) == 3005
    uni = "日本語のテキスト 🙂 ünï"
    out = generate(model, VOCAB, prime=uni, length=10, seed=0)
    assert out.texts[0].startswith(uni) and len(out.texts[0]) == len(uni) + 10
    assert all(ch in VOCAB.stoi for ch in out.texts[0])
    with pytest.raises(CharlstmError) as e:
        generate(model, VOCAB, prime="Ωmega ☃", length=10)
    assert "'Ω'" in str(e.value) and "'☃'" in str(e.value) and "--unknown skip" in str(e.value)
    out = generate(model, VOCAB, prime="Ωmega ☃", length=10, unknown="skip", seed=0)
    assert out.texts[0].startswith("Ωmega ☃") and out.skipped == ["Ω", "☃"]
    # the continuation is the one of the prime without those characters
    assert out.texts[0][7:] == generate(model, VOCAB, prime="mega ", length=10, seed=0).texts[0][5:]
    # no prime: the text starts after a (hidden) newline; length 0: the prime only
    assert len(generate(model, VOCAB, length=25, seed=0).texts[0]) == 25
    assert generate(model, VOCAB, prime="abc", length=0).texts == ["abc"]


def test_streaming_reports_the_text_as_it_is_produced():
    model = text_model()
    pieces = []
    out = generate(model, VOCAB, prime="x", length=70, num_samples=2, seed=1, chunk=16, on_text=pieces.append)
    assert len(pieces) == 1 + 5                                         # the prime, then 16+16+16+16+6
    assert ["".join(p[i] for p in pieces) for i in range(2)] == out.texts


# --------------------------------------------------------------------------- the command

def invoke(*args):
    return CliRunner().invoke(app, ["sample", *map(str, args)])


@pytest.mark.parametrize("case", VARIANTS[::2] + [dict(variant="peephole", peephole_form="full")], ids=ident)
def test_a_checkpoint_of_each_variant_samples(tmp_path, case):
    save_run(tmp_path / "run", case)
    r = invoke(tmp_path / "run", "--prime", "Café ", "--length", "40", "--seed", "5", "--top-p", "0.9")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Café ") and len(r.stdout) == len("Café ") + 40 + 1   # and a final newline
    again = invoke(tmp_path / "run", "--prime", "Café ", "--length", "40", "--seed", "5", "--top-p", "0.9")
    assert again.stdout == r.stdout


def test_sample_command_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = save_run(tmp_path / "checkpoints" / "tiny")
    # RUN omitted: the most recent run under checkpoints/, said on stderr; no seed: one is chosen and said
    r = invoke("--length", "30", "--no-stream")
    assert r.exit_code == 0, r.output
    assert "sampling from checkpoints/tiny/ckpt-000010" in r.stderr and "--seed" in r.stderr
    # a checkpoint directory works as RUN; several samples are headed; --output writes the file only
    r = invoke(ckpt, "--length", "30", "--num-samples", "3", "--seed", "1", "--prime", "日本", "--output", "out.txt")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and "wrote 3 sample(s)" in r.stderr
    text = (tmp_path / "out.txt").read_text(encoding="utf-8")
    assert text.count("----- sample ") == 3 and text.count("\n日本") == 3
    streamed = invoke(ckpt, "--length", "30", "--num-samples", "3", "--seed", "1", "--prime", "日本")
    assert streamed.stdout == text                                      # the same text, streamed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.txt")]   # no temporary left
    # greedy == top-k 1
    g = invoke(ckpt, "--length", "50", "--greedy", "--seed", "1").stdout
    assert g == invoke(ckpt, "--length", "50", "--top-k", "1", "--seed", "2").stdout


@pytest.mark.parametrize("args, code, message", [
    (["--temperature", "0"], 2, "--temperature must be > 0"),
    (["--temperature", "nan"], 2, "--temperature must be > 0"),
    (["--top-k", "0"], 2, "--top-k must be >= 1 (got 0); leave it out to sample from every character"),
    (["--top-k", "-3"], 2, "--top-k must be >= 1 (got -3)"),
    (["--top-p", "nan"], 2, "--top-p"),
    (["--top-p", "2"], 2, "--top-p"),
    (["--num-samples", "0"], 2, "--num-samples"),
    (["--length", "-1"], 2, "--length"),
    (["--unknown", "maybe"], 2, "--unknown"),
    (["--prime", "Ω☃"], 1, "'Ω' (U+03A9), '☃' (U+2603)"),
    (["--device", "cuda"], 2, "cuda"),
])
def test_sample_command_errors_are_one_clear_line(tmp_path, args, code, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    save_run(tmp_path / "run")
    r = invoke(tmp_path / "run", *args)
    assert r.exit_code == code, r.output
    assert message in r.stderr and "Traceback" not in r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_prime_file_gives_the_text_of_the_same_prime(tmp_path):
    save_run(tmp_path / "run")
    prime = "Café 日本\nx, 1\n"                                      # exactly, the final newline included
    (tmp_path / "prime.txt").write_bytes(prime.encode("utf-8"))
    r = invoke(tmp_path / "run", "--prime-file", tmp_path / "prime.txt", "--length", "30", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(prime)
    assert r.stdout == invoke(tmp_path / "run", "--prime", prime, "--length", "30", "--seed", "3").stdout
    (tmp_path / "empty.txt").write_bytes(b"")                           # an empty file: no prime
    r = invoke(tmp_path / "run", "--prime-file", tmp_path / "empty.txt", "--length", "30", "--seed", "3")
    assert r.exit_code == 0 and r.stdout == invoke(tmp_path / "run", "--length", "30", "--seed", "3").stdout


@pytest.mark.parametrize("make, args, code, message", [
    (lambda d: None, [], 1, "--prime-file {d}/p.txt does not exist"),
    (lambda d: (d / "p.txt").mkdir(), [], 1, "--prime-file {d}/p.txt is a directory; give one text file"),
    (lambda d: os.mkfifo(d / "p.txt"), [], 1, "--prime-file {d}/p.txt is a FIFO (named pipe), not a regular file"),
    (lambda d: (d / "p.txt").write_bytes(b"ab\xffc"), [], 1,
     "--prime-file {d}/p.txt is not UTF-8 text: undecodable byte at offset 2"),
    (lambda d: (d / "p.txt").write_text("a", encoding="utf-8"), ["--prime", "b"], 2,
     "give the prime with --prime TEXT or --prime-file FILE, not both"),
    (lambda d: (d / "p.txt").write_text("Ω", encoding="utf-8"), [], 1,
     "'Ω' (U+03A9); remove them from --prime-file {d}/p.txt or pass --unknown skip"),
])
def test_prime_file_errors_are_one_clear_line(tmp_path, make, args, code, message):
    if "mkfifo" in make.__code__.co_names and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    save_run(tmp_path / "run")
    make(tmp_path)
    r = invoke(tmp_path / "run", "--prime-file", tmp_path / "p.txt", *args, "--length", "5")
    assert r.exit_code == code, r.output
    assert message.format(d=tmp_path) in r.stderr and "Traceback" not in r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_output_that_cannot_be_written_fails_and_leaves_nothing(tmp_path, monkeypatch):
    save_run(tmp_path / "run")
    if Path("/dev/full").exists():
        before = set(os.listdir("/dev"))
        r = invoke(tmp_path / "run", "--length", "20", "--seed", "1", "--output", "/dev/full")
        assert r.exit_code == 1 and r.stderr == "error: cannot write --output /dev/full: No space left on device\n"
        assert set(os.listdir("/dev")) == before and Path("/dev/full").is_char_device()   # still the device
    # a full disk while the file is written: the temporary file goes, the error is one line
    def full(path, text):
        Path(path).write_text(text[:3], encoding="utf-8")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskfiles, "_write_text", full)
    r = invoke(tmp_path / "run", "--length", "20", "--seed", "1", "--output", tmp_path / "sample.txt")
    assert r.exit_code == 1 and "No space left on device" in r.stderr and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # a pipe or a device other than a full one is written as a shell redirection would
    r = invoke(tmp_path / "run", "--length", "20", "--seed", "1", "--output", "/dev/null")
    assert r.exit_code == 0 and Path("/dev/null").is_char_device()


def test_damaged_or_missing_checkpoints_exit_1(tmp_path, monkeypatch):
    ckpt = save_run(tmp_path / "run")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    r = invoke(tmp_path / "run", "--length", "5")
    assert r.exit_code == 1 and "damaged" in r.stderr and "Traceback" not in r.output
    r = invoke(tmp_path / "nothing-here")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    monkeypatch.chdir(tmp_path)                                         # no checkpoints/ here
    r = invoke()
    assert r.exit_code == 1 and "no training runs under checkpoints/" in r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_checkpoint_samples_on_cuda_identically_in_greedy_mode(tmp_path):
    save_run(tmp_path / "run")
    cpu = invoke(tmp_path / "run", "--greedy", "--length", "40", "--device", "cpu")
    gpu = invoke(tmp_path / "run", "--greedy", "--length", "40", "--device", "cuda")
    assert cpu.exit_code == gpu.exit_code == 0
    assert cpu.stdout[:20] == gpu.stdout[:20]

"""`charlstm eval` and `charlstm info` on a tiny trained run: the trainer's figures, text files, JSON, errors."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_text, train_tiny
from typer.testing import CliRunner

from charlstm import checkpoint as ck
from charlstm.cli import app
from charlstm.corpus import encode_text
from charlstm.evaluation import evaluate_loss


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A working directory holding tiny.txt and a run trained for 6 steps (evaluated at 3 and 6)."""
    work = tmp_path_factory.mktemp("evalinfo")
    (work / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        r = train_tiny("--layers", "2", "--seq-len", "32", "--max-steps", "6", "--eval-every", "3",
                       "--checkpoint-every", "3", "--val-frac", "0.1", "--out", "run")
        assert r.exit_code == 0, r.output
    return work


@pytest.fixture
def work(trained, monkeypatch):
    """The trained run's directory as the working directory, torch on one thread (restored after)."""
    monkeypatch.chdir(trained)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield trained
    torch.set_num_threads(before)


def invoke(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def stored_val_loss(ckpt_dir: Path) -> float:
    return ck.load_trainer_state(ckpt_dir)["val_loss"]


# --------------------------------------------------------------------------- eval

def test_eval_repeats_the_trainers_validation_loss(work):
    for which in ("ckpt-000003", "ckpt-000006"):
        r = invoke("eval", Path("run") / which, "--json")
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)                                        # one JSON object, nothing else
        expected = stored_val_loss(work / "run" / which)
        assert out["loss_nats"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert out["trainer_val_loss"] == pytest.approx(expected, rel=1e-12)
        assert out["bpc"] == pytest.approx(out["loss_nats"] / math.log(2))
        n = len(tiny_text())
        assert out["chars"] == n - int(n * 0.9) - 1                       # every target of the val split once
        assert out["split"] == "val" and out["step"] == int(which[-6:]) and out["unknown_chars"] == 0
    # RUN = the run directory: its best checkpoint; human output names loss and bpc
    r = invoke("eval", "run")
    assert r.exit_code == 0, r.output
    best = ck.read_pointer(work / "run", "best")
    assert f"{stored_val_loss(best):.4f} nats/char" in r.stdout and "bpc" in r.stdout


def test_eval_other_splits_and_batch_size(work):
    r = invoke("eval", "run", "--split", "train", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["split"] == "train" and out["chars"] == int(len(tiny_text()) * 0.9) - 1
    # the number of streams changes where the state restarts, so the figure moves a little, not a lot
    a = json.loads(invoke("eval", "run", "--json").stdout)["loss_nats"]
    b = json.loads(invoke("eval", "run", "--json", "--batch-size", "1").stdout)["loss_nats"]
    assert abs(a - b) < 0.5
    r = invoke("eval", "run", "--split", "test")
    assert r.exit_code == 1 and "--test-frac" in r.stderr and "Traceback" not in r.output
    r = invoke("eval", "run", "--split", "dev")
    assert r.exit_code == 2 and "--split" in r.stderr


def test_eval_on_a_text_file_counts_unknown_characters(work):
    text = "Speak, speak. Ωmega ☃ naïve façade.\n" * 30
    (work / "other.txt").write_text(text, encoding="utf-8")
    r = invoke("eval", "run", "--text-file", "other.txt", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["unknown_chars"] == 60 and out["unknown"] == ["Ω", "☃"]
    assert out["chars"] == len(text) - 60 - 1 and out["split"] is None and out["text_file"] == "other.txt"
    ckpt = ck.load_checkpoint(work / "run")
    ids = encode_text(text, ckpt.vocab, "skip")
    loss, count = evaluate_loss(ckpt.model, ids, batch_size=ckpt.train_cfg.batch_size,
                                seq_len=ckpt.train_cfg.seq_len, device="cpu")
    assert out["loss_nats"] == pytest.approx(loss, rel=1e-12) and out["chars"] == count
    human = invoke("eval", "run", "--text-file", "other.txt")
    assert "60 character(s) outside the model's vocabulary" in human.stdout and "'Ω'" in human.stdout
    (work / "bad.txt").write_bytes(b"abc\xff\xfe")
    r = invoke("eval", "run", "--text-file", "bad.txt")
    assert r.exit_code == 1 and "not UTF-8" in r.stderr and "offset 3" in r.stderr
    r = invoke("eval", "run", "--text-file", "missing.txt")
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_eval_warns_when_the_corpus_changed(work):
    # The run reads its corpus where it was trained (the absolute path it stored): change that file.
    corpus = work / "tiny.txt"
    original = corpus.read_bytes()
    corpus.write_text(tiny_text()[:-200], encoding="utf-8")
    try:
        r = invoke("eval", work / "run", "--json")
    finally:
        corpus.write_bytes(original)
    assert r.exit_code == 0, r.output
    assert "has changed since" in r.stderr and json.loads(r.stdout)["corpus_changed"] is True


# --------------------------------------------------------------------------- info

def test_info_describes_the_checkpoint(work):
    r = invoke("info", "run", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    ckpt = ck.load_checkpoint(work / "run")
    m = d["model"]
    # the backend auto resolved to when the run was trained (custom where the native loops ran H = 16)
    assert ((m["variant"], m["backend"], m["layers"], m["hidden"], m["embed"])
            == ("lstm", ckpt.model.cfg.backend, 2, 16, 8))
    assert m["parameters"] == ckpt.model.num_parameters() == sum(p.numel() for p in ckpt.model.parameters())
    assert d["vocab"]["size"] == m["vocab_size"] == len(set(tiny_text()))
    assert d["corpus"]["sha256"] == hashlib.sha256(tiny_text().encode("utf-8")).hexdigest()
    assert d["corpus"]["name"] == "tiny.txt"
    assert d["training"]["steps"] == d["step"] == ckpt.step
    assert d["training"]["best_val_loss"] == pytest.approx(min(stored_val_loss(work / "run" / f"ckpt-00000{s}")
                                                               for s in (3, 6)))
    assert d["versions"]["torch"] == torch.__version__ and d["versions"]["charlstm"]
    assert d["run_checkpoints"] == ["ckpt-000003", "ckpt-000006"] and d["latest"] == "ckpt-000006"
    human = invoke("info", "run")
    assert human.exit_code == 0
    for text in ("lstm", m["backend"], f"{m['parameters']:,}", d["corpus"]["sha256"][:16], "best val loss", "torch"):
        assert text in human.stdout


def test_info_and_eval_refuse_damaged_checkpoints(work, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(work / "run", run)
    config = run / "ckpt-000006" / "config.json"
    config.write_text(config.read_text().replace('"hidden": 16', '"hidden": 17'))
    for command in ("info", "eval"):
        r = invoke(command, run / "ckpt-000006")
        assert r.exit_code == 1 and "damaged" in r.stderr and "Traceback" not in r.output
    r = invoke("info", tmp_path / "nope")
    assert r.exit_code == 1 and "does not exist" in r.stderr


# --------------------------------------------------------------------------- eval --dynamic

def _file_digests(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_eval_dynamic_reports_both_figures_and_leaves_the_run_alone(work):
    before = _file_digests(work / "run")
    r = invoke("eval", "run", "--dynamic", "--dynamic-lr", "3e-3", "--dynamic-stat-segments", "20", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    static = invoke("eval", "run", "--json")
    assert out["loss_nats"] == json.loads(static.stdout)["loss_nats"]         # the static figure is unchanged
    dyn = out["dynamic"]
    assert dyn["chars"] == out["chars"] and math.isfinite(dyn["loss_nats"]) and dyn["loss_nats"] != out["loss_nats"]
    assert (dyn["rule"], dyn["segment"], dyn["lr"]) == ("rms", 5, 3e-3)
    assert dyn["bpc"] == pytest.approx(dyn["loss_nats"] / math.log(2))
    assert _file_digests(work / "run") == before                                # nothing on disk changed
    text = invoke("eval", "run", "--dynamic", "--dynamic-rule", "sgd", "--dynamic-lr", "0")
    lines = text.stdout.splitlines()
    assert text.exit_code == 0 and lines[0].startswith("run/") and lines[1].startswith("dynamic evaluation (sgd")
    assert "+0.0000 nats/char against the static figure" in lines[1]            # lr 0: the static figure


@pytest.mark.parametrize("args, message", [
    (["--dynamic-lr", "1e-3"], "--dynamic-lr is an option of --dynamic"),
    (["--dynamic", "--dynamic-rule", "adam"], "--dynamic-rule must be one of rms, sgd"),
    (["--dynamic", "--dynamic-lr", "-1"], "--dynamic-lr must be a number >= 0"),
    (["--dynamic", "--dynamic-segment", "0"], "--dynamic-segment must be > 0"),
])
def test_eval_dynamic_option_errors_are_one_line(work, args, message):
    r = invoke("eval", "run", *args)
    assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.output

"""The long-gap recall task: generator, trainer, and `compare-variants --task long-gap`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from charlstm.cli import app
from charlstm.config import ModelConfig
from charlstm.errors import UsageError
from charlstm.longgap import MARKER, LongGapTask, evaluate_recall, train_long_gap


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; the suite's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the generator

@pytest.mark.parametrize("gap", [0, 1, 7, 50])
def test_sequences_are_key_distractors_marker(gap):
    task = LongGapTask(gap=gap, num_keys=5, num_distractors=6)
    x, y = task.sample(300, task.train_generator(3))
    assert x.shape == (gap + 2, 300) and x.dtype == torch.long
    assert y.shape == (300,)
    pattern = re.compile(rf"^[{task.keys}][{task.distractors}]{{{gap}}}\?$")
    for b in range(300):
        text = task.decode(x[:, b])
        assert pattern.match(text), text
        # the target is the key shown at the start
        assert task.chars[int(y[b])] == text[0]
    assert torch.equal(x[0], y)


def test_alphabets_are_disjoint_and_vocab_sorted():
    task = LongGapTask(gap=3, num_keys=8, num_distractors=8)
    assert not set(task.keys) & set(task.distractors)
    assert MARKER not in task.keys + task.distractors
    assert task.chars == sorted(task.chars)
    assert task.vocab_size == 8 + 8 + 1
    assert task.chance == pytest.approx(1 / 8)
    assert task.seq_len == 5


def test_generation_is_deterministic_from_the_seed():
    task = LongGapTask(gap=10)
    a = task.sample(64, task.train_generator(1))
    b = task.sample(64, task.train_generator(1))
    c = task.sample(64, task.train_generator(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # the held-out set is fixed for a seed and is not the training stream
    e1, e2 = task.eval_set(1, 64), task.eval_set(1, 64)
    assert torch.equal(e1[0], e2[0])
    assert not torch.equal(e1[0], a[0])


def test_every_key_and_distractor_is_used():
    task = LongGapTask(gap=20, num_keys=8, num_distractors=8)
    x, y = task.sample(2000, task.train_generator(0))
    assert set(y.tolist()) == set(task.key_ids.tolist())
    assert set(x[1:-1].flatten().tolist()) == set(task.distractor_ids.tolist())
    # keys are roughly uniform: no key takes more than twice its share
    counts = torch.bincount(y, minlength=task.vocab_size)[task.key_ids]
    assert counts.max() < 2 * 2000 / 8


@pytest.mark.parametrize("kwargs", [{"gap": -1}, {"gap": 3, "num_keys": 1}, {"gap": 3, "num_keys": 27},
                                    {"gap": 3, "num_distractors": 0}])
def test_bad_task_settings_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        LongGapTask(**kwargs)


# --------------------------------------------------------------------------- training

def _cfg(task, variant="lstm", hidden=16):
    return ModelConfig(vocab_size=task.vocab_size, variant=variant, hidden=hidden, layers=1, embed=8)


def test_a_short_gap_is_learned():
    """Gap 3 is easy: an lstm reaches near-perfect recall in 120 steps (chance is 25%)."""
    task = LongGapTask(gap=3, num_keys=4, num_distractors=4)
    result, model = train_long_gap(task, _cfg(task), seed=1, max_steps=120, lr=1e-2, eval_size=200, eval_every=60)
    assert result.steps == 120
    assert result.accuracy >= 0.95, result.curve
    assert [c["step"] for c in result.curve] == [60, 120]
    assert result.params == model.num_parameters()
    # the reported accuracy is the model's on the held-out set
    acc, _ = evaluate_recall(model, *task.eval_set(1, 200))
    assert acc == pytest.approx(result.accuracy)


def test_training_is_reproducible():
    task = LongGapTask(gap=4, num_keys=4, num_distractors=4)
    r1, _ = train_long_gap(task, _cfg(task, "gru", 8), seed=5, max_steps=15, eval_size=50, eval_every=15)
    r2, _ = train_long_gap(task, _cfg(task, "gru", 8), seed=5, max_steps=15, eval_size=50, eval_every=15)
    assert r1.curve[-1]["loss"] == pytest.approx(r2.curve[-1]["loss"], abs=1e-6)
    assert r1.accuracy == r2.accuracy


def test_a_time_budget_stops_training():
    task = LongGapTask(gap=2, num_keys=4, num_distractors=4)
    result, _ = train_long_gap(task, _cfg(task, "rnn", 8), max_steps=None, max_time=0.3, eval_size=20)
    assert result.steps >= 1
    assert result.curve[-1]["step"] == result.steps


def test_a_budget_is_required_and_vocab_must_match():
    task = LongGapTask(gap=2)
    with pytest.raises(UsageError, match="budget"):
        train_long_gap(task, _cfg(task), max_steps=None, max_time=None)
    with pytest.raises(UsageError, match="vocab_size"):
        train_long_gap(task, ModelConfig(vocab_size=5, hidden=8, layers=1), max_steps=1)


# --------------------------------------------------------------------------- the command

def test_tiny_long_gap_comparison_writes_an_accuracy_table(tmp_path):
    out = tmp_path / "lg"
    args = ["compare-variants", "--task", "long-gap", "--variants", "rnn,lstm", "--gaps", "1,3",
            "--keys", "4", "--distractors", "4", "--hidden", "8", "--embed", "4", "--max-steps", "6",
            "--eval-size", "40", "--threads", "1", "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Long-gap recall accuracy" in result.stdout
    assert "gap 1" in result.stdout and "gap 3" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "long-gap" and summary["chance"] == 0.25
    assert [r["variant"] for r in summary["rows"]] == ["rnn", "lstm"]
    for row in summary["rows"]:
        for gap in ("1", "3"):
            assert 0.0 <= row["gaps"][gap]["accuracy_mean"] <= 1.0
    assert len(summary["runs"]) == 4
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("variant,form,hidden,params,gap,accuracy_mean")
    assert len(csv_lines) == 1 + 4
    # every run keeps its model as an ordinary checkpoint
    for run in ("gap1/rnn-seed1", "gap3/lstm-seed1"):
        assert (out / run / "result.json").is_file()
        assert (out / run / "best").is_file()

    # --json: one object on stdout and nothing else; finished runs are not retrained
    again = CliRunner().invoke(app, args + ["--json"])
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert data["rows"][0]["gaps"]["1"]["accuracy_mean"] == summary["rows"][0]["gaps"]["1"]["accuracy_mean"]


def test_chrono_init_uses_the_sequence_length(tmp_path):
    from charlstm.compare import plan_runs, settings_from_options

    s = settings_from_options({"task": "long-gap", "gaps": "5,50", "init": "chrono", "out": tmp_path})
    specs = plan_runs(s, LongGapTask(gap=5).vocab_size, None)
    tmax = {(sp["variant"], sp["gap"]): sp["model_cfg"]["chrono_tmax"] for sp in specs}
    assert tmax[("lstm", 5)] == 7 and tmax[("lstm", 50)] == 52

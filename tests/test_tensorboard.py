"""`charlstm train --tensorboard`: the scalars of metrics.jsonl and the samples as text under
RUN/tensorboard/ (with the tensorboard package, else a fake SummaryWriter), one line and exit 1
where the package is missing, a setting that --config, --print-config and --resume know."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import cli

from charlstm import observers

TINY = ["train", "--data", "tiny.txt", "--hidden", "8", "--embed", "4", "--batch-size", "4", "--seq-len", "16",
        "--threads", "1", "--sample-chars", "12", "--no-progress"]
HINT = "pip install 'charlstm[tensorboard]'"




def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class FakeWriter:
    """What the observer hands a SummaryWriter, kept in memory."""

    made: list[FakeWriter] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars, self.texts, self.closed = [], [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def add_text(self, tag, text, step):
        self.texts.append((tag, step, text))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake_writer(monkeypatch):
    FakeWriter.made = []
    monkeypatch.setattr(observers, "summary_writer_class", lambda: FakeWriter)
    return FakeWriter.made


def test_the_same_scalars_as_metrics_jsonl_and_the_samples(work, fake_writer):
    r = cli(*TINY, "--max-steps", "12", "--eval-every", "6", "--log-every", "4", "--out", "run", "--tensorboard")
    assert r.exit_code == 0, r.output
    (w,) = fake_writer
    assert w.log_dir == str(Path("run") / "tensorboard") and w.purge_step is None and w.closed
    m = metrics(work / "run")
    train = [(r["step"], r["train_loss"]) for r in m if "val_loss" not in r]
    val = [(r["step"], r["val_loss"]) for r in m if "val_loss" in r]
    assert [(s, v) for tag, s, v in w.scalars if tag == "loss/train"] == train
    assert [(s, v) for tag, s, v in w.scalars if tag == "loss/val"] == val
    assert [s for tag, s, _ in w.scalars if tag == "lr"] == [4, 8, 12]
    assert [s for tag, s, _ in w.scalars if tag == "chars_per_sec"] == [4, 8, 12]
    assert [s for tag, s, _ in w.texts if tag == "sample"] == [6, 12]
    assert all(line.startswith("    ") for tag, _, text in w.texts for line in text.split("\n"))
    assert "tensorboard = true" in next(text for tag, _, text in w.texts if tag == "settings")


def test_resume_may_turn_it_on_and_drops_later_events(work, fake_writer):
    r = cli(*TINY, "--max-steps", "8", "--checkpoint-every", "4", "--eval-every", "4", "--out", "run")
    assert r.exit_code == 0, r.output
    assert not fake_writer and not (work / "run" / "tensorboard").exists()
    r = cli("train", "--resume", "run", "--max-steps", "12", "--tensorboard", "--no-progress")
    assert r.exit_code == 0, r.output
    (w,) = fake_writer
    assert w.purge_step == 8 and not [t for t in w.texts if t[0] == "settings"]
    assert min(s for _, s, _ in w.scalars) > 8


def test_without_the_package_it_fails_at_once_with_the_install_hint(work, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails as without tensorboard
    r = cli(*TINY, "--max-steps", "4", "--out", "run", "--tensorboard")
    assert r.exit_code == 1
    assert r.stderr == f"error: --tensorboard needs the tensorboard package, an optional extra: {HINT}\n"
    assert not (work / "run").exists()
    assert cli(*TINY, "--max-steps", "2", "--out", "run2").exit_code == 0            # off: nothing needed


def test_a_setting_of_help_config_and_print_config(work):
    r = cli("train", "--help", env={"COLUMNS": "300"})
    assert "--tensorboard" in r.stdout and HINT in r.stdout
    printed = cli(*TINY, "--tensorboard", "--print-config").stdout
    assert "tensorboard = true" in printed
    (work / "run.toml").write_text(printed, encoding="utf-8")
    again = cli("train", "--config", "run.toml", "--print-config").stdout
    assert again == printed
    assert "tensorboard = false" in cli(*TINY, "--print-config").stdout


def test_real_event_files(work):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = cli(*TINY, "--max-steps", "8", "--eval-every", "4", "--log-every", "2", "--out", "run", "--tensorboard")
    assert r.exit_code == 0, r.output
    assert "tensorboard --logdir" in r.stderr
    events = EventAccumulator(str(work / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/val", "bpc/val", "lr", "chars_per_sec"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss/val")] == [4, 8]
    assert [e.step for e in events.Scalars("loss/train")] == [2, 4, 6, 8]
    assert any(t.startswith("sample") for t in tags["tensors"])

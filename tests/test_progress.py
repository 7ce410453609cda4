"""Progress in a log file: plain lines instead of progress frames when stderr is not a terminal
(console.progress and the training's LogLines), bars on a terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import tiny_text
from tqdm import tqdm

from charlstm import console

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^run: step (\d+) \((\d+)%\), loss (\d+\.\d{4}), ([\d,]+) chars/s, ETA (\d+:\d\d|\?)$")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_writes_a_line_per_interval_and_one_at_the_end(capsys):
    clock = FakeClock()
    bar = console.PlainProgress(1000, desc="encoding corpus", unit="B", unit_scale=True, interval=10, clock=clock)
    for _ in range(10):             # 100 every 3 s: lines at 12 s and 24 s only
        clock.now += 3
        bar.update(100)
    bar.set_postfix_str("pass 2")
    bar.close()
    bar.close()                     # closing twice writes nothing more
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["encoding corpus: 400/1.00k B (40%), 33.3 B/s, ETA 0:18",
                     "encoding corpus: 800/1.00k B (80%), 33.3 B/s, ETA 0:06",
                     "encoding corpus: done, 1.00k B in 0:30"]


def test_plain_progress_without_total_and_with_postfix(capsys):
    clock = FakeClock()
    with console.PlainProgress(None, desc="runs", unit="runs", interval=0, clock=clock) as bar:
        clock.now += 1
        bar.update()
        bar.set_postfix_str("lstm seed 1")
        bar.update()
    assert capsys.readouterr().err.splitlines() == ["runs: 1 runs, 1 runs/s", "runs: 2 runs, 2 runs/s, lstm seed 1",
                                                    "runs: done, 2 runs in 0:01"]


def test_a_short_quiet_operation_ends_without_a_line_and_a_failed_one_without_done(capsys):
    clock = FakeClock()
    with console.PlainProgress(10, desc="recording", interval=10, clock=clock) as bar:
        clock.now += 1
        bar.update(10)
    assert capsys.readouterr().err == ""
    try:
        with console.PlainProgress(10, desc="recording", interval=1, clock=clock) as bar:
            clock.now += 5
            bar.update(5)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert capsys.readouterr().err.splitlines() == ["recording: 5/10 it (50%), 1 it/s, ETA 0:05"]


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, capsys):
    monkeypatch.setattr(console, "stderr_is_terminal", lambda: False)
    assert isinstance(console.progress(5, desc="x"), console.PlainProgress)
    monkeypatch.setattr(console, "stderr_is_terminal", lambda: True)
    bar = console.progress(5, desc="x")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    off = console.progress(5, desc="x", enabled=False)
    off.update(5)
    off.set_postfix_str("y")
    off.close()
    assert off.disable


def test_no_tqdm_outside_the_console_helper():
    """Every long operation's progress goes through console.progress (the training bar excepted,
    which LogLines replaces in a log)."""
    users = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "charlstm").rglob("*.py")
                   if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(encoding="utf-8"), flags=re.M))
    assert users == ["charlstm/console.py", "charlstm/observers.py"]


def test_training_into_a_log_file_writes_one_plain_line_per_log_interval(tmp_path):
    """`charlstm train ... 2> log`: no carriage return, no progress frame; a line every --log-every
    steps whose loss is metrics.jsonl's train_loss at that step."""
    (tmp_path / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}   # the native kernels of the tests' cache (conftest)
    env.pop("COLUMNS", None)
    log = tmp_path / "log"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-m", "charlstm", "train", "--data", "tiny.txt", "--hidden", "16",
                        "--embed", "8", "--batch-size", "4", "--seq-len", "16", "--max-steps", "50",
                        "--log-every", "10", "--eval-every", "25", "--sample-chars", "10", "--threads", "1",
                        "--out", "run", "--data-dir", "data"],
                       cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, check=True, env=env, timeout=300)
    text = log.read_text(encoding="utf-8")
    assert "\r" not in text and "\x1b[A" not in text and "|" not in text.split("training finished")[0]
    progress = [LINE.match(line) for line in text.splitlines() if line.startswith("run: ")]
    assert all(progress), text
    assert [int(m.group(1)) for m in progress] == [10, 20, 30, 40, 50]
    assert [int(m.group(2)) for m in progress] == [20, 40, 60, 80, 100]
    logged = {r["step"]: r["train_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if "val_loss" not in r}
    assert [float(m.group(3)) for m in progress] == [round(logged[s], 4) for s in (10, 20, 30, 40, 50)]
    assert "step 25: val loss" in text and "training finished" in text


def test_no_progress_means_no_lines(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from charlstm.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    r = CliRunner().invoke(app, ["train", "--data", "tiny.txt", "--hidden", "8", "--embed", "4", "--batch-size", "4",
                                 "--seq-len", "16", "--max-steps", "20", "--log-every", "5", "--threads", "1",
                                 "--sample-chars", "0", "--no-progress", "--out", "run"])
    assert r.exit_code == 0, r.output
    assert not [line for line in r.stderr.splitlines() if line.startswith("run: step")]

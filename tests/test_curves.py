"""Training curves: curves.png/.svg in every run directory (drawn from metrics.jsonl, a resumed run's
history included; one note without matplotlib), and `charlstm plot` overlaying runs."""

from __future__ import annotations

import json

import pytest
from conftest import cli, tiny_text

from charlstm import curves, observers, plots

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--data", "tiny.txt", "--hidden", "8", "--embed", "4", "--batch-size", "4", "--seq-len", "16",
        "--threads", "1", "--sample-chars", "0", "--no-progress"]
INSTALL = "pip install 'charlstm[plot]'"




def train(*args):
    r = cli("train", *TINY, *args)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture
def drawn(monkeypatch):
    """The curves the observer draws, instead of drawing them: [(steps of train, steps of val)]."""
    calls = []

    def fake(curve, stem, *, title, subtitle=""):
        calls.append(([p["step"] for p in curve.train], [p["step"] for p in curve.val], title, subtitle))
        return []

    monkeypatch.setattr(observers, "draw_run", fake)
    return calls


# --------------------------------------------------------------------------- reading metrics.jsonl

def test_metrics_split_into_train_val_and_lr(tmp_path):
    lines = [{"step": 10, "elapsed": 1.0, "lr": 1e-3, "train_loss": 3.0},
             {"step": 20, "elapsed": 2.0, "lr": 2e-3, "train_loss": 2.5},
             {"step": 20, "elapsed": 2.0, "lr": 2e-3, "train_loss": 2.6, "val_loss": 2.4, "val_bpc": 3.5},
             {"step": 30, "elapsed": 3.0, "lr": 1e-3, "train_loss": 2.2, "val_loss": 2.45}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 40, "train_lo', encoding="utf-8")
    curve = curves.read_curve(tmp_path, "run")
    assert [(p["step"], p["train_loss"]) for p in curve.train] == [(10, 3.0), (20, 2.5)]   # not the eval lines'
    assert [(p["step"], p["elapsed"], p["val_loss"]) for p in curve.val] == [(20, 2.0, 2.4), (30, 3.0, 2.45)]
    assert [p["lr"] for p in curve.lr] == [1e-3, 2e-3, 2e-3, 1e-3]
    assert curve.best["step"] == 20 and not curve.empty


def test_loss_limits_leave_out_the_steep_start_and_time_units():
    c = curves.Curve("a", train=[{"step": s, "elapsed": s, "train_loss": v}
                                 for s, v in enumerate([4.6, 3.0] + [2.0] * 18)],
                     val=[{"step": 5, "elapsed": 5, "val_loss": 2.2}])
    lo, hi = curves.loss_limits([c])
    assert lo < 2.0 and 2.2 < hi < 2.3                  # 4.6 and 3.0 (the first tenth) are above the top
    assert curves.loss_limits([curves.Curve("empty")]) is None
    assert curves.time_unit(90) == (1.0, "s") and curves.time_unit(600) == (60.0, "min")
    assert curves.time_unit(3 * 3600) == (3600.0, "h")


def test_draw_run_and_overlay_write_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")
    steps = range(10, 110, 10)
    c = curves.Curve("a", train=[{"step": s, "elapsed": s / 10, "train_loss": 3 - s / 100} for s in steps],
                     val=[{"step": 50, "elapsed": 5.0, "val_loss": 2.6},
                          {"step": 100, "elapsed": 10.0, "val_loss": 2.2}],
                     lr=[{"step": s, "elapsed": s / 10, "lr": 1e-3} for s in steps])
    written = curves.draw_run(c, tmp_path / "curves", title="run", subtitle="lstm")
    assert [p.name for p in written] == ["curves.png", "curves.svg"]
    assert written[0].read_bytes()[:8] == PNG and "<svg" in written[1].read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]        # no temporary left
    b = curves.Curve("b", train=c.train[:3])                                     # no evaluation yet
    for x in ("step", "time"):
        assert [p.name for p in curves.draw_overlay([c, b], tmp_path / x, x=x)] == [f"{x}.png", f"{x}.svg"]


# --------------------------------------------------------------------------- the observer

def test_every_run_draws_its_curves(work):
    pytest.importorskip("matplotlib")
    r = train("--max-steps", "12", "--eval-every", "6", "--log-every", "3", "--out", "run")
    for name in ("curves.png", "curves.svg"):
        assert (work / "run" / name).is_file()
    assert (work / "run" / "curves.png").read_bytes()[:8] == PNG
    assert "curves" in r.stderr                                   # the summary names them
    # charlstm's own files: --overwrite replaces the run, curves included
    train("--max-steps", "6", "--eval-every", "6", "--out", "run", "--overwrite")
    assert (work / "run" / "curves.png").is_file()


def test_curves_are_drawn_at_each_evaluation_and_hold_a_resumed_runs_history(work, drawn, monkeypatch):
    monkeypatch.setattr(observers.Curves, "FIRST_COST", 0.0)     # draw at every evaluation however close
    train("--max-steps", "20", "--eval-every", "5", "--log-every", "5", "--out", "run")
    assert [val[-1] for _, val, _, _ in drawn] == [5, 10, 15, 20]
    title, subtitle = drawn[-1][2:]
    assert title == "run" and "lstm 2 \u00d7 8" in subtitle and "parameters" in subtitle and "tiny" in subtitle
    drawn.clear()
    train("--resume", "run", "--max-steps", "30", "--eval-every", "5", "--log-every", "5", "--no-progress")
    train_steps, val_steps, _, _ = drawn[-1]
    assert train_steps == [5, 10, 15, 20, 25, 30] and val_steps == [5, 10, 15, 20, 25, 30]


def test_without_matplotlib_one_note_and_training_goes_on(work, monkeypatch):
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    r = train("--max-steps", "12", "--eval-every", "3", "--out", "run")
    assert r.stderr.count(INSTALL) == 1 and "curves.png" in r.stderr
    assert not (work / "run" / "curves.png").exists() and (work / "run" / "metrics.jsonl").is_file()


def test_a_drawing_failure_is_one_note_not_a_failed_run(work, monkeypatch):
    def broken(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(observers, "draw_run", broken)
    monkeypatch.setattr(observers.Curves, "FIRST_COST", 0.0)
    r = train("--max-steps", "12", "--eval-every", "3", "--out", "run")
    assert r.stderr.count("could not draw") == 1 and "No space left on device" in r.stderr
    assert (work / "run" / "latest").is_file()


# --------------------------------------------------------------------------- charlstm plot

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs (one named without its variant) and a corpus comparison of two variants."""
    root = tmp_path_factory.mktemp("plot")
    (root / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    tiny = [a if a != "tiny.txt" else str(root / "tiny.txt") for a in TINY]
    for name, variant in (("mine", "gru"), ("lstm-a", "lstm")):
        r = cli("train", *tiny, "--variant", variant, "--max-steps", "8", "--eval-every", "4", "--log-every", "2",
                   "--out", root / name, "--data-dir", root / "data")
        assert r.exit_code == 0, r.output
    r = cli("compare-variants", "--variants", "rnn,lstm", "--data", root / "tiny.txt", "--hidden", "4", "--embed",
               "2", "--seq-len", "16", "--batch-size", "4", "--max-steps", "4", "--threads", "1", "--no-plot",
               "--no-progress", "--out", root / "cmp", "--data-dir", root / "data")
    assert r.exit_code == 0, r.output
    return root


def test_plot_overlays_runs_and_a_comparison(runs, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    seen = []
    real = curves.draw_overlay
    monkeypatch.setattr("charlstm.plot.draw_overlay", lambda cs, stem, **kw: seen.append(cs) or real(cs, stem, **kw))
    r = cli("plot", runs / "mine", runs / "lstm-a" / "best", runs / "cmp")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["curves-by-step.png", "curves-by-step.svg"]
    assert (tmp_path / "curves-by-step.png").read_bytes()[:8] == PNG
    assert [c.label for c in seen[0]] == ["mine (gru)", "lstm-a", "lstm-seed1", "rnn-seed1"]
    assert [p["step"] for p in seen[0][0].val] == [4, 8]
    r = cli("plot", runs / "mine", runs / "cmp" / "rnn-seed1", "--x", "time", "--out", "figs.png",
               "--title", "GRU against RNN")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["figs.png", "figs.svg"] and (tmp_path / "figs.svg").is_file()
    r = cli("plot", runs / "mine", "--out", tmp_path / "stem")
    assert r.exit_code == 0 and (tmp_path / "stem.png").is_file() and (tmp_path / "stem.svg").is_file()


def test_plot_labels_clashing_names_by_their_parent(tmp_path):
    from charlstm import plot as plot_mod

    for parent in ("a", "b"):
        (tmp_path / parent / "lstm-seed1").mkdir(parents=True)
    assert plot_mod.labels_of([tmp_path / "a" / "lstm-seed1", tmp_path / "b" / "lstm-seed1"]) == \
        ["a/lstm-seed1", "b/lstm-seed1"]


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "nowhere does not exist"),
    (["empty"], "empty is not a run directory (no metrics.jsonl) nor a comparison of runs"),
    (["tiny.txt"], "tiny.txt is a file, not a run directory"),
    (["longgap"], "longgap is a long-gap comparison"),
    (["RUN", "--x", "epoch"], "--x must be one of step, time (got 'epoch')"),
    (["RUN", "--out", "fig.pdf"], "--out fig.pdf: charlstm plot writes PNG and SVG"),
    (["RUN", "--out", "missing/fig.png"], "--out missing/fig.png: the directory missing does not exist"),
])
def test_plot_usage_errors_are_one_line_and_exit_2(runs, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiny.txt").write_text("x", encoding="utf-8")
    (tmp_path / "longgap").mkdir()
    (tmp_path / "longgap" / "summary.json").write_text('{"task": "long-gap"}', encoding="utf-8")
    r = cli("plot", *[str(runs / "mine") if a == "RUN" else a for a in args])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"error: {message}") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.png"))


def test_plot_without_matplotlib_is_one_line_and_exit_1(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    r = cli("plot", runs / "mine")
    assert r.exit_code == 1
    assert r.stderr == f"error: charlstm plot needs matplotlib, an optional extra: {INSTALL}\n"
    assert cli("plot").exit_code == 2                                       # no RUN: a usage error

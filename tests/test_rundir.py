"""Run directories (issue 18): deletion that cannot half-happen, checkpoints never overwritten, a full
disk as one message, readers that outlive the run's retention."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from charlstm import checkpoint as ck
from charlstm import ckptdir
from charlstm.config import ModelConfig, TrainConfig
from charlstm.corpus import Vocab
from charlstm.errors import CharlstmError
from charlstm.model import build_model

VOCAB = Vocab(list("abcdefgh"))


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=len(VOCAB), hidden=8, embed=4))


def _save(run: Path, step: int, *, is_best=False, keep=10, model=None):
    model = model or _model()
    return ck.save_checkpoint(run, step=step, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                              model_cfg=model.cfg, train_cfg=TrainConfig(), vocab=VOCAB, corpus_meta={},
                              trainer_state={"step": step, "rng": {"torch_cpu": torch.get_rng_state()}},
                              is_best=is_best, keep=keep)


def steps(run: Path) -> list[int]:
    return [s for s, _ in ck.list_checkpoints(run)]


# --------------------------------------------------------------------------- deletion

def test_a_checkpoint_is_deleted_manifest_first_then_renamed_away(tmp_path, monkeypatch):
    path = _save(tmp_path / "run", 1)
    seen = []
    real_rename = os.rename

    def rename(src, dst):
        seen.append((Path(src).name, sorted(p.name for p in Path(src).iterdir())))
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    ck.remove_checkpoint(path)
    (name, files), = seen
    assert name == "ckpt-000001" and ck.MANIFEST not in files and "model.safetensors" in files
    assert not path.exists() and not list((tmp_path / "run").glob(".old-*"))


def test_retention_never_follows_a_symbolic_link_and_clears_half_deleted_leftovers(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        _save(run, step)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ck.MANIFEST).write_text("{}")
    (elsewhere / "mine.txt").write_text("keep me")
    (run / "ckpt-000000").symlink_to(elsewhere)                 # an old-looking checkpoint that is a link
    half = run / "ckpt-000003"                                  # a deletion interrupted after its manifest went
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")
    trash = run / ".old-ckpt-000004-1-2"                        # interrupted after its rename
    trash.mkdir()
    _save(run, 5, keep=1)
    assert (run / "ckpt-000000").is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == [ck.MANIFEST,
                                                                                                "mine.txt"]
    assert not half.exists() and not trash.exists()
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-000000", "ckpt-000005", "latest"]


# --------------------------------------------------------------------------- never overwritten

def test_a_checkpoint_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    first = _save(run, 10, is_best=True)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    torch.manual_seed(1)
    other = build_model(ModelConfig(vocab_size=len(VOCAB), hidden=8, embed=4))
    with pytest.raises(CharlstmError, match="exists already and is never overwritten"):
        _save(run, 10, model=other)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    # A directory of that name without a manifest is not a checkpoint: what a deletion left, replaced.
    ck.remove_checkpoint(first)
    (run / "ckpt-000010").mkdir()
    (run / "ckpt-000010" / "model.safetensors").write_bytes(b"partial")
    assert _save(run, 10) == first and ck.verify_checkpoint(first)["step"] == 10


def test_the_same_state_gives_byte_identical_files(tmp_path):
    a, b = _save(tmp_path / "a", 3), _save(tmp_path / "b", 3)
    for name in ck.CKPT_FILES:
        if name != "config.json":                               # holds the time it was written
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


# --------------------------------------------------------------------------- a full disk

def test_a_full_disk_removes_the_partial_checkpoint_and_says_how_much_space_it_needed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    good = _save(run, 1, is_best=True)
    real = ck.save_tensors

    def full(path, tensors, metadata=None):
        if Path(path).name == "optimizer.safetensors":
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckptdir, "save_tensors", full)
    with pytest.raises(ck.NoSpaceError, match=r"no space left in .*run for checkpoint ckpt-000002: "
                                              r"it needs about [\d.]+ KiB, [\d.]+ \w+ are free") as e:
        _save(run, 2, is_best=True)
    assert "earlier ones are intact" in str(e.value)
    assert steps(run) == [1] and not [p for p in run.iterdir() if p.name.startswith(".")]
    assert ck.read_pointer(run, "latest") == good == ck.read_pointer(run, "best")


# --------------------------------------------------------------------------- readers and retention

def test_a_reader_resolves_the_run_again_when_retention_removes_its_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _save(run, 1, is_best=True)
    _save(run, 2)
    real = ck.verify_checkpoint
    raced = []

    def retention_strikes(path):
        if not raced:                                           # the run moves on while the reader reads
            raced.append(Path(path).name)
            _save(run, 3, is_best=True, keep=1)
        return real(path)

    monkeypatch.setattr(ckptdir, "verify_checkpoint", retention_strikes)
    loaded = ck.load_checkpoint(run)
    assert raced == ["ckpt-000001"] and loaded.path.name == "ckpt-000003" and steps(run) == [3]
    said = capsys.readouterr().err
    assert "ckpt-000001 was removed by the run's retention while it was read; read ckpt-000003" in said
    # A checkpoint named explicitly is not replaced by another one: it says what happened.
    raced.clear()
    with pytest.raises(CharlstmError, match="was removed while it was read"):
        monkeypatch.setattr(ckptdir, "verify_checkpoint", lambda p: (ck.remove_checkpoint(Path(p)), real(p))[1])
        ck.load_checkpoint(run / "ckpt-000003")


def test_resume_takes_the_newest_complete_checkpoint_and_knows_the_newer_ones(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        _save(run, step, is_best=step == 10)
    (run / "latest").write_text("ckpt-000020\n")                # a save interrupted before its pointer
    assert ck.resume_checkpoint(run).name == "ckpt-000030"
    assert ck.resume_checkpoint(run / "latest").name == "ckpt-000030"
    assert ck.resume_checkpoint(run / "best").name == "ckpt-000010"
    assert ck.resume_checkpoint(run / "ckpt-000020").name == "ckpt-000020"
    assert [p.name for p in ck.newer_checkpoints(run / "ckpt-000010")] == ["ckpt-000020", "ckpt-000030"]
    assert ck.newer_checkpoints(run / "ckpt-000030") == []


# --------------------------------------------------------------------------- one writer, history, damaged files

TINY = ["--hidden", "8", "--embed", "4", "--batch-size", "4", "--seq-len", "16", "--threads", "1",
        "--sample-chars", "0", "--no-progress"]


def cli(*args):
    from typer.testing import CliRunner

    from charlstm.cli import app

    result = CliRunner().invoke(app, [*map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def train(*args):
    return cli("train", "--data", "tiny.txt", *TINY, *args)


def one_line(r, code: int, message: str) -> None:
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_a_run_being_trained_is_refused_to_a_second_writer_and_to_overwrite(work):
    from charlstm import rundir

    assert train("--out", "R", "--max-steps", "2").exit_code == 0
    with rundir.lock_run_dir(work / "R"):                      # what a training process holds
        assert (work / "R" / rundir.LOCK).read_text() == f"{os.getpid()}\n"
        message = f"R is being trained by process {os.getpid()}; wait for it or choose another --out"
        one_line(train("--out", "R", "--max-steps", "2"), 1, message)
        one_line(train("--out", "R", "--max-steps", "2", "--overwrite"), 1, message)
        one_line(cli("train", "--resume", "R", "--max-steps", "4", "--no-progress"), 1, message)
        assert steps(work / "R") == [2]
        # Unnamed runs take the next name that no process is training.
        with rundir.lock_run_dir(work / "checkpoints" / "lstm-tiny"):
            assert train("--max-steps", "1").exit_code == 0
        assert steps(work / "checkpoints" / "lstm-tiny-2") == [1]
    assert not (work / "R" / rundir.LOCK).exists()             # released: removed
    assert train("--out", "R", "--max-steps", "3", "--overwrite").exit_code == 0 and steps(work / "R") == [3]
    # A setup that fails leaves no directory behind (the lock's included).
    one_line(cli("train", "--data", "missing.txt", *TINY, "--out", "new/R"), 1, "no such file")
    assert not (work / "new").exists()


def test_resuming_an_older_checkpoint_is_refused_and_forks_into_a_new_run(work):
    import json

    assert train("--out", "R", "--max-steps", "30", "--checkpoint-every", "10", "--keep", "5").exit_code == 0
    before = {p.name: (p / "model.safetensors").read_bytes() for _, p in ck.list_checkpoints(work / "R")}
    r = cli("train", "--resume", "R/ckpt-000010", "--max-steps", "50", "--no-progress")
    one_line(r, 2, "R holds newer checkpoints (ckpt-000020, ckpt-000030) that continuing from ckpt-000010 would "
                   "replace; continue the run with --resume R, or fork ckpt-000010 into a new run with "
                   "--resume R/ckpt-000010 --out NEW")
    assert {p.name: (p / "model.safetensors").read_bytes() for _, p in ck.list_checkpoints(work / "R")} == before
    r = cli("train", "--resume", "R/ckpt-000010", "--out", "F", "--max-steps", "30", "--no-progress")
    assert r.exit_code == 0, r.output
    assert steps(work / "F") == [10, 20, 30] and steps(work / "R") == [10, 20, 30]
    for step in (10, 20, 30):                                   # the fork computes what the run did
        name = ck.checkpoint_name(step)
        assert (work / "F" / name / "model.safetensors").read_bytes() == before[name]
    forked = ck.load_checkpoint(work / "F")
    assert forked.config["forked_from"] == str(Path("R") / "ckpt-000010")
    assert forked.train_cfg.out == "F" and forked.train_cfg.name == "F"

    def losses(run):    # the history up to step 10 is copied, then the same (an evaluation's smoothed loss restarts)
        return [(m["step"], m["lr"], m["val_loss"] if "val_loss" in m else m["train_loss"])
                for m in map(json.loads, (work / run / "metrics.jsonl").read_text().splitlines())]

    assert losses("F") == losses("R") and len(losses("F")) == 4
    # The fork is a run of its own: it resumes, and a fork into a directory holding a run is refused.
    assert cli("train", "--resume", "F", "--max-steps", "40", "--no-progress").exit_code == 0
    assert steps(work / "F")[-1] == 40 and ck.load_checkpoint(work / "F").config["forked_from"].endswith("000010")
    one_line(cli("train", "--resume", "R/ckpt-000010", "--out", "F", "--no-progress"), 2, "F already holds a run")


def test_damaged_files_beside_the_checkpoints_are_named_in_one_line(work):
    import hashlib
    import json
    import shutil

    assert train("--out", "R", "--max-steps", "3").exit_code == 0
    for name in ("bytes", "dir", "state", "config"):
        shutil.copytree(work / "R", work / name)
    bad_line = len((work / "bytes" / "metrics.jsonl").read_bytes().splitlines()) + 2
    with open(work / "bytes" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 1}\n\xff\xfe\n')
    one_line(cli("train", "--resume", "bytes", "--max-steps", "4", "--no-progress"), 1,
             f"bytes/metrics.jsonl is damaged: line {bad_line} is not UTF-8 text; move it away")
    (work / "dir" / "metrics.jsonl").unlink()
    (work / "dir" / "metrics.jsonl").mkdir()
    one_line(cli("train", "--resume", "dir", "--max-steps", "4", "--no-progress"), 1,
             "dir/metrics.jsonl is damaged: it is not a file")

    def edit(run: str, name: str, change) -> None:             # an edit the manifest agrees with
        ckpt = work / run / "ckpt-000003"
        data = json.loads((ckpt / name).read_text())
        change(data)
        (ckpt / name).write_text(json.dumps(data))
        manifest = json.loads((ckpt / ck.MANIFEST).read_text())
        raw = (ckpt / name).read_bytes()
        manifest["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        (ckpt / ck.MANIFEST).write_text(json.dumps(manifest))

    edit("state", "trainer_state.json", lambda d: d["rng"].update(python="abc"))
    one_line(cli("train", "--resume", "state", "--max-steps", "4", "--no-progress"), 1,
             "checkpoint state/ckpt-000003 is damaged: its trainer_state.json does not hold a trainer state")
    edit("config", "config.json", lambda d: d.update(model=[1, 2]))
    one_line(cli("train", "--resume", "config", "--max-steps", "4", "--no-progress"), 1,
             "checkpoint config/ckpt-000003 is damaged: its config.json")


def test_overwrite_refuses_symbolic_links_and_foreign_files_before_deleting_anything(work):
    assert train("--out", "R", "--max-steps", "2").exit_code == 0
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (work / "R" / "ckpt-000001").symlink_to(elsewhere)
    before = sorted(p.name for p in (work / "R").iterdir())
    one_line(train("--out", "R", "--max-steps", "2", "--overwrite"), 2,
             "R also holds files charlstm did not write (ckpt-000001 (a symbolic link)); remove them")
    for k in range(7):
        (work / "R" / f"notes{k}.txt").write_text("x")
    one_line(train("--out", "R", "--max-steps", "2", "--overwrite"), 2,
             "(ckpt-000001 (a symbolic link), notes0.txt, notes1.txt, notes2.txt, notes3.txt and 3 more)")
    assert sorted(p.name for p in (work / "R").iterdir()) == sorted(before + [f"notes{k}.txt" for k in range(7)])
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]


def test_compare_variants_long_gap_runs_start_again_after_an_interruption(work):
    args = ["compare-variants", "--task", "long-gap", "--variants", "rnn", "--gaps", "2", "--hidden", "4", "--embed",
            "2", "--max-steps", "2", "--eval-size", "10", "--threads", "1", "--no-progress", "--no-plot", "--out", "lg"]
    assert cli(*args).exit_code == 0
    (result,) = (work / "lg").glob("*/*/result.json")
    run = result.parent
    (run / "result.json").unlink()                 # stopped after its checkpoint, before its result
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert steps(run) == [2] and (run / "result.json").is_file()

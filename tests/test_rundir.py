"""Run directories (issue 18): deletion that cannot half-happen, checkpoints never overwritten, a full
disk as one message, readers that outlive the run's retention."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from charlstm import checkpoint as ck
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

    monkeypatch.setattr(ck, "save_tensors", full)
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

    monkeypatch.setattr(ck, "verify_checkpoint", retention_strikes)
    loaded = ck.load_checkpoint(run)
    assert raced == ["ckpt-000001"] and loaded.path.name == "ckpt-000003" and steps(run) == [3]
    said = capsys.readouterr().err
    assert "ckpt-000001 was removed by the run's retention while it was read; read ckpt-000003" in said
    # A checkpoint named explicitly is not replaced by another one: it says what happened.
    raced.clear()
    with pytest.raises(CharlstmError, match="was removed while it was read"):
        monkeypatch.setattr(ck, "verify_checkpoint", lambda p: (ck.remove_checkpoint(Path(p)), real(p))[1])
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

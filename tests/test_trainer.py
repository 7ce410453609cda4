"""The Trainer as a library: TrainerState's on-disk form (old checkpoints included), exact resume
from a state written the old way, and the order of the observers' hooks."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from charlstm import checkpoint as ck
from charlstm import runtime
from charlstm import trainer as trainer_mod
from charlstm.config import ModelConfig, TrainConfig
from charlstm.errors import CharlstmError
from charlstm.model import State, build_model
from charlstm.optim import learning_rate
from charlstm.trainer import Observer, Trainer
from charlstm.trainer_state import LN2, TrainerState
from charlstm.training import resume_configs

OLD_RUN = Path(__file__).parent / "fixtures" / "run-v1"       # written before the Trainer existed


def configs(**train) -> tuple[ModelConfig, TrainConfig]:
    """A tiny lstm with dropout (the RNG matters) and a schedule that does not follow the budget."""
    options = dict(data="tiny.txt", batch_size=8, seq_len=32, threads=1, sample_chars=0, lr=1e-2, warmup=3,
                   schedule="constant", eval_every=7, checkpoint_every=100, log_every=1)
    return ModelConfig(hidden=24, embed=8, dropout=0.2), TrainConfig(**{**options, **train})


def assert_same(a, b, where="state"):
    """Equal nested dicts/lists with tensors compared exactly (dtype, shape, values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def weights(run: Path, step: int, name: str = "model") -> dict:
    return ck.load_tensors(run / ck.checkpoint_name(step) / f"{name}.safetensors")[0]


# --------------------------------------------------------------------------- TrainerState

def test_trainer_state_round_trips_and_reads_todays_checkpoints():
    old = ck.load_trainer_state(OLD_RUN / "ckpt-000003")                # as the old trainer wrote it
    state = TrainerState.from_dict(old)
    assert state.step == 3 and state.batcher["position"] == 3 and state.carried.h.shape == (1, 2, 4)
    assert state.best_val_loss == state.val_loss and state.params == 611 and state.world_size is None
    assert_same(state.to_dict(), old)                                   # the same keys, values and tensors
    assert_same_state(TrainerState.from_dict(state.to_dict()), state)


def assert_same_state(a: TrainerState, b: TrainerState) -> None:
    assert [f for f in vars(a) if f != "carried" and getattr(a, f) != getattr(b, f)] == []
    assert_same(a.carried, b.carried, "carried")


def test_trainer_state_under_torchrun_keeps_every_process_rng_and_a_gru_has_no_cell_state():
    rngs = [{"torch_cpu": torch.full((8,), r, dtype=torch.uint8), "python": [3, [r] * 4, None]} for r in range(2)]
    state = TrainerState(step=6, epoch=0, epochs_done=0.5, batcher={"epoch": 0, "position": 6},
                         carried=State(torch.ones(2, 4, 16), None), rng=rngs[0], rng_ranks=rngs, world_size=2,
                         best_val_loss=2.0, best_step=6, val_loss=2.0, train_time=3.0, chars_seen=384,
                         train_loss=2.5, params=100)
    d = state.to_dict()
    assert list(d) == ["step", "epoch", "epochs_done", "batcher", "hidden", "rng", "rng_ranks", "world_size",
                       "best_val_loss", "best_step", "val_loss", "train_time", "chars_seen", "metrics"]
    assert d["hidden"]["c"] is None and d["world_size"] == 2 and d["rng"] is rngs[0]
    assert d["metrics"] == {"step": 6, "epochs": 0.5, "train_loss": 2.5, "val_loss": 2.0, "val_bpc": 2.0 / LN2,
                            "best_val_loss": 2.0, "best_val_bpc": 2.0 / LN2, "best_step": 6, "train_time": 3.0,
                            "params": 100, "chars_per_sec": 128.0}
    assert_same_state(TrainerState.from_dict(d), state)
    single = TrainerState(step=1, batcher={}, rng=rngs[0]).to_dict()
    assert "rng_ranks" not in single and "world_size" not in single and single["hidden"] is None
    assert single["metrics"]["chars_per_sec"] is None and single["metrics"]["val_bpc"] is None


def test_a_run_written_before_the_trainer_resumes(work):
    """The fixture run (old trainer, step 3) restores exactly what it saved and trains on."""
    shutil.copytree(OLD_RUN, work / "run")
    saved = ck.load_trainer_state(OLD_RUN / "ckpt-000003")
    model_cfg, train_cfg = resume_configs(work / "run", {"max_steps": 6})
    trainer = Trainer(model_cfg, train_cfg, resume=work / "run", progress=False)
    assert trainer.steps_done == 3 and trainer.batcher.state_dict() == saved["batcher"]
    assert torch.equal(trainer.carried.h, saved["hidden"]["h"]) and torch.equal(trainer.carried.c, saved["hidden"]["c"])
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch_cpu"])
    assert list(random.getstate()[1]) == saved["rng"]["python"][1]
    assert trainer.best_val_loss == saved["best_val_loss"] and trainer.train_time == saved["train_time"]
    result = trainer.run()
    assert result.steps == 6 and result.stopped_by == "max_steps"
    assert [s for s, _ in ck.list_checkpoints(work / "run")] == [3, 6]


def test_resume_from_a_state_written_the_old_way_is_exact(work):
    """k steps, the trainer state rewritten by hand in the old trainer's layout, --resume to N ==
    N steps straight (dropout, an epoch boundary, evaluations)."""
    model_cfg, train_cfg = configs(max_steps=40, out="straight")
    Trainer(model_cfg, train_cfg, progress=False).run()
    model_cfg, train_cfg = configs(max_steps=22, out="split")
    t = Trainer(model_cfg, train_cfg, progress=False)
    t.run()
    ck.remove_checkpoint(t.run_dir / "ckpt-000022")          # a checkpoint is never overwritten: replaced here
    ck.save_checkpoint(t.run_dir, step=22, model=t.model, optimizer=t.optimizer, model_cfg=t.model_cfg,
                       train_cfg=t.train_cfg, vocab=t.vocab, corpus_meta=t.corpus.meta(),
                       trainer_state=old_layout(t), is_best=False, keep=10, extra_config=t.extra_config)
    resumed = Trainer(t.model_cfg, configs(max_steps=40, out="split")[1], resume=work / "split", progress=False)
    assert resumed.steps_done == 22
    resumed.run()
    for name in ("model", "optimizer"):
        a, b = weights(work / "straight", 40, name), weights(work / "split", 40, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def old_layout(t: Trainer) -> dict:
    """The trainer state as the trainer before this one wrote it (one process), from the live run."""
    st = random.getstate()
    return {
        "step": t.steps_done, "epoch": t.batcher.epoch, "epochs_done": t.batcher.epochs_done,
        "batcher": t.batcher.state_dict(),
        "hidden": {"h": t.carried.h.detach().float().cpu().contiguous(),
                   "c": t.carried.c.detach().float().cpu().contiguous()},
        "rng": {"torch_cpu": torch.get_rng_state(), "python": [st[0], list(st[1]), st[2]]},
        "best_val_loss": t.best_val_loss, "best_step": t.best_step, "val_loss": t.val_loss,
        "train_time": t.train_time, "chars_seen": t.chars_seen,
        "metrics": {"step": t.steps_done, "epochs": t.batcher.epochs_done, "train_loss": t.last_loss,
                    "val_loss": t.val_loss, "val_bpc": t.val_loss / LN2, "best_val_loss": t.best_val_loss,
                    "best_val_bpc": t.best_val_loss / LN2, "best_step": t.best_step, "train_time": t.train_time,
                    "params": t.params, "chars_per_sec": t.chars_seen / t.train_time},
    }


# --------------------------------------------------------------------------- observers

class Recorder(Observer):
    def __init__(self):
        self.events = []

    def on_start(self, trainer):
        self.events.append(("start", trainer.steps_done))

    def on_step(self, trainer):
        self.events.append(("step", trainer.steps_done))

    def on_eval(self, trainer, evaluation):
        assert evaluation.step == trainer.steps_done and evaluation.loss == trainer.val_loss
        self.events.append(("eval", evaluation.step))

    def on_save(self, trainer, checkpoint, is_best):
        assert checkpoint == trainer.run_dir / ck.checkpoint_name(trainer.steps_done)
        self.events.append(("save", trainer.steps_done, is_best))

    def on_loop_end(self, trainer):
        self.events.append(("loop_end", trainer.steps_done))

    def on_end(self, trainer, result):
        self.events.append(("end", None if result is None else result.steps))


def test_observers_see_the_run_in_order(work):
    model_cfg, train_cfg = configs(max_steps=4, eval_every=4, checkpoint_every=2, out="run")
    recorder = Recorder()

    class OnlySteps:                                           # any object with some of the hooks will do
        steps = 0

        def on_step(self, trainer):
            OnlySteps.steps += 1

    result = Trainer(model_cfg, train_cfg, progress=False, observers=[recorder, OnlySteps()]).run()
    assert recorder.events == [("start", 0), ("step", 1), ("step", 2), ("save", 2, False), ("step", 3), ("step", 4),
                               ("eval", 4), ("save", 4, True), ("loop_end", 4), ("end", 4)]
    assert OnlySteps.steps == 4 and result.steps == 4
    assert not (work / "run" / "metrics.jsonl").exists()      # metrics.jsonl is an observer's (train.train adds it)


def test_a_diverged_run_ends_its_observers_without_a_result(work, monkeypatch):
    monkeypatch.setattr(trainer_mod, "learning_rate",
                        lambda cfg, step, progress: float("nan") if step >= 2 else learning_rate(cfg, step, progress))
    recorder = Recorder()
    trainer = Trainer(*configs(max_steps=10, out="run"), progress=False, observers=[recorder])
    with pytest.raises(CharlstmError, match="training diverged at step 4"):
        trainer.run()
    assert recorder.events[-2:] == [("loop_end", 3), ("end", None)]


# --------------------------------------------------------------------------- threads

def test_small_time_steps_get_one_thread_and_large_ones_share_them(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert runtime.threads_for(0) == 1 and runtime.threads_for(runtime.GRAIN - 1) == 1
    assert runtime.threads_for(3 * runtime.GRAIN) == 3 and runtime.threads_for(100 * runtime.GRAIN) == 4
    assert runtime.threads_for(100 * runtime.GRAIN, threads=2) == 2


@pytest.mark.parametrize(("hidden", "given", "expected"), [(24, None, 1), (24, 2, 2), (256, None, 2)])
def test_without_threads_a_tiny_model_trains_on_one_thread(work, hidden, given, expected):
    """Two tiny trainings at once on two threads each ran 40x slower than on one (runtime.GRAIN);
    --threads is always obeyed, and a model large enough keeps torch's threads."""
    if given and runtime.cpu_cores() < given:
        pytest.skip(f"--threads {given} is capped at this machine's {runtime.cpu_cores()} core(s)")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model_cfg, train_cfg = configs(threads=given, max_steps=1)
        model_cfg.hidden = hidden
        trainer = Trainer(model_cfg, train_cfg, progress=False)
        try:
            assert torch.get_num_threads() == expected
        finally:
            trainer.close()
    finally:
        torch.set_num_threads(before)


def test_resume_says_where_it_cannot_be_exact():
    """cuDNN keeps the random state of its between-layer dropout: a resumed run on a GPU says so; on a CPU,
    without that dropout, or on the custom layers it resumes exactly and says nothing."""
    from charlstm.trainer_setup import inexact_resume_reason
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")

    def model(**kw):
        return build_model(ModelConfig(vocab_size=9, embed=4, hidden=8, **{"layers": 2, "dropout": 0.2, **kw}))

    assert "--backend custom, or --dropout 0" in inexact_resume_reason(model(backend="cudnn"), gpu)
    assert "cuDNN" in inexact_resume_reason(model(backend="cudnn", variant="gru"), gpu)
    assert inexact_resume_reason(model(backend="cudnn"), cpu) is None
    assert inexact_resume_reason(model(backend="cudnn", dropout=0.0), gpu) is None
    assert inexact_resume_reason(model(backend="cudnn", layers=1), gpu) is None
    assert inexact_resume_reason(model(backend="custom"), gpu) is None


def test_state_reset_zeroes_streams_drawn_from_seed_and_step_alike_in_every_share():
    """trainer.reset_streams: each stream's h and c zeroed or kept whole, the same draw for the same
    seed and step, another for another step, and two processes' halves of the batch drawing what
    one process draws; probability 0 keeps every state, 1 zeroes every one."""
    cfg = TrainConfig(batch_size=8, state_reset=0.5, seed=3)
    h, c = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    out = trainer_mod.reset_streams(State(h, c), cfg, 5, range(8))
    kept = (out.h != 0).any(0).any(-1)                                        # (B,)
    assert 0 < int(kept.sum()) < 8
    for t, ref in ((out.h, h), (out.c, c)):
        assert torch.equal(t[:, kept], ref[:, kept]) and not t[:, ~kept].any()
    assert torch.equal(trainer_mod.reset_streams(State(h, c), cfg, 5, range(8)).h, out.h)
    assert any(not torch.equal(trainer_mod.reset_streams(State(h, c), cfg, s, range(8)).h, out.h)
               for s in range(6, 12))
    halves = [trainer_mod.reset_streams(State(h[:, r], c[:, r]), cfg, 5, r) for r in (range(0, 4), range(4, 8))]
    assert torch.equal(torch.cat([x.h for x in halves], 1), out.h)
    assert torch.equal(torch.cat([x.c for x in halves], 1), out.c)
    gru = trainer_mod.reset_streams(State(h, None), cfg, 5, range(8))
    assert gru.c is None and torch.equal(gru.h, out.h)
    for p, same in ((0.0, True), (1.0, False)):
        got = trainer_mod.reset_streams(State(h, c), TrainConfig(batch_size=8, state_reset=p), 5, range(8))
        assert torch.equal(got.h, h if same else torch.zeros_like(h))

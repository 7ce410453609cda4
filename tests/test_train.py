"""`charlstm train` end to end on a tiny corpus: files, learning, exact resume, Ctrl-C, NaN, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import cli, tiny_text
from typer.testing import CliRunner

from charlstm import checkpoint as ck
from charlstm import optim, plots
from charlstm import trainer as trainer_mod
from charlstm import training as train_mod
from charlstm.batches import StreamBatcher
from charlstm.cli import app
from charlstm.config import ModelConfig, TrainConfig
from charlstm.corpus import Vocab
from charlstm.evaluation import evaluate_loss
from charlstm.model import build_model, custom_is_faster

# A small model that still crosses an epoch boundary quickly (about 35 steps per epoch).
TINY = ["--hidden", "24", "--embed", "8", "--batch-size", "8", "--seq-len", "32", "--threads", "1",
        "--sample-chars", "20", "--no-progress"]


def invoke(*args):
    return cli("train", "--data", "tiny.txt", *args)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["train_loss"]) for m in metrics(run) if "val_loss" not in m]


def weights(run: Path, step: int) -> dict:
    return ck.load_tensors(run / ck.checkpoint_name(step) / "model.safetensors")[0]


# --------------------------------------------------------------------------- end to end

def test_train_writes_a_run_and_the_loss_falls(work):
    r = invoke(*TINY, "--lr", "1e-2", "--warmup", "5", "--max-steps", "60", "--eval-every", "20",
               "--checkpoint-every", "20", "--keep", "2", "--log-every", "5", "--out", "run")
    assert r.exit_code == 0, r.output
    run = work / "run"
    curves = ["curves.png", "curves.svg"] if plots.have_matplotlib() else []          # drawn from metrics.jsonl
    assert sorted(p.name for p in run.iterdir()) == sorted(["best", "ckpt-000040", "ckpt-000060", "config.toml",
                                                             "latest", "metrics.jsonl", *curves])
    config = json.loads((run / "ckpt-000060" / "config.json").read_text())
    assert config["format"] == "charlstm-checkpoint" and config["step"] == 60
    assert config["train"]["max_steps"] == 60 and config["train"]["lr"] == 1e-2 and config["model"]["hidden"] == 24
    # auto resolved: the custom cells where the native loops run H = 24 on this CPU, else nn.LSTM
    assert config["model"]["backend"] == ("custom" if custom_is_faster(ModelConfig(hidden=24), "cpu") else "cudnn")
    assert "".join(config["vocab"]) == "".join(sorted(set(tiny_text())))
    assert config["corpus"]["sha256"] and config["corpus"]["n_chars"] == len(tiny_text())
    assert config["versions"]["torch"] == torch.__version__ and config["versions"]["charlstm"]
    evals = [m for m in metrics(run) if "val_loss" in m]
    assert [m["step"] for m in evals] == [20, 40, 60]
    for m in metrics(run):
        assert {"step", "train_loss", "lr", "chars_per_sec", "elapsed"} <= set(m)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(len(config["vocab"]))
    assert abs(evals[-1]["val_bpc"] - evals[-1]["val_loss"] / math.log(2)) < 1e-9
    assert "val loss" in r.stderr and "sample" in r.stderr and "best val loss" in r.stderr
    assert r.stdout == ""                                               # everything goes to stderr
    loaded = ck.load_checkpoint(run)
    assert loaded.step == 60 and loaded.metrics["best_val_loss"] == pytest.approx(evals[-1]["val_loss"])


def test_resume_is_exact_after_ctrl_c(work, monkeypatch):
    """N steps straight == k steps, Ctrl-C, --resume, N-k steps: same losses, bit-identical weights
    (dropout RNG, data position across an epoch boundary, carried state, cosine schedule, evaluations)."""
    opts = [*TINY, "--dropout", "0.2", "--lr", "1e-2", "--warmup", "3", "--max-steps", "45", "--eval-every", "7",
            "--checkpoint-every", "10", "--log-every", "1"]
    assert invoke(*opts, "--out", "straight").exit_code == 0

    real_next = StreamBatcher.next_batch
    calls = {"n": 0}

    def next_batch_then_ctrl_c(self):
        calls["n"] += 1
        if calls["n"] == 23:                      # Ctrl-C during step 23: the run stops after it and saves
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(StreamBatcher, "next_batch", next_batch_then_ctrl_c)
    r = invoke(*opts, "--out", "split")
    monkeypatch.setattr(StreamBatcher, "next_batch", real_next)
    assert r.exit_code == 130, r.output
    assert "--resume split" in r.stderr and "Traceback" not in r.output
    split = work / "split"
    assert ck.resolve_checkpoint(split, prefer="latest").name == "ckpt-000023"

    r = CliRunner().invoke(app, ["train", "--resume", "split", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert train_losses(split) == train_losses(work / "straight")
    a, b = weights(work / "straight", 45), weights(split, 45)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = ck.load_tensors(work / "straight" / "ckpt-000045" / "optimizer.safetensors")[0]
    opt_b = ck.load_tensors(split / "ckpt-000045" / "optimizer.safetensors")[0]
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    # A finished run says so and changes nothing.
    before = sorted(p.name for p in split.iterdir())
    r = CliRunner().invoke(app, ["train", "--resume", "split", "--no-progress"])
    assert r.exit_code == 0 and "already reached its budget" in r.stderr
    assert sorted(p.name for p in split.iterdir()) == before


@pytest.mark.parametrize("variant, backend", [("lstm", "custom"), ("gru", "cudnn")])
def test_resume_with_a_larger_budget_is_exact(work, variant, backend):
    """The issue's protocol with a budget that does not shape the schedule: k steps, then --resume to N."""
    opts = [*TINY, "--variant", variant, "--backend", backend, "--dropout", "0.1", "--schedule", "constant",
            "--warmup", "4", "--lr", "1e-2", "--eval-every", "100", "--log-every", "1"]
    assert invoke(*opts, "--max-steps", "40", "--out", "straight").exit_code == 0
    assert invoke(*opts, "--max-steps", "15", "--out", "split").exit_code == 0
    r = CliRunner().invoke(app, ["train", "--resume", "split", "--max-steps", "40", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert train_losses(work / "split") == train_losses(work / "straight")
    a, b = weights(work / "straight", 40), weights(work / "split", 40)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_state_reset_is_exact(work):
    """--state-reset draws its streams from the seed and the step: a resumed run zeroes the same
    states as the straight one; and the option changes the run."""
    opts = [*TINY, "--schedule", "constant", "--warmup", "4", "--lr", "1e-2", "--eval-every", "100",
            "--log-every", "1"]
    assert invoke(*opts, "--state-reset", "0.3", "--max-steps", "30", "--out", "straight").exit_code == 0
    assert invoke(*opts, "--state-reset", "0.3", "--max-steps", "12", "--out", "split").exit_code == 0
    r = CliRunner().invoke(app, ["train", "--resume", "split", "--max-steps", "30", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert train_losses(work / "split") == train_losses(work / "straight")
    a, b = weights(work / "straight", 30), weights(work / "split", 30)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert invoke(*opts, "--max-steps", "30", "--out", "carried").exit_code == 0
    assert train_losses(work / "carried") != train_losses(work / "straight")
    assert invoke(*opts, "--state-reset", "1.5", "--max-steps", "3", "--out", "bad").exit_code != 0


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(work, monkeypatch):
    real_lr = optim.learning_rate
    monkeypatch.setattr(trainer_mod, "learning_rate",
                        lambda cfg, step, progress: float("nan") if step >= 12 else real_lr(cfg, step, progress))
    r = invoke(*TINY, "--max-steps", "40", "--checkpoint-every", "10", "--eval-every", "10", "--out", "run")
    assert r.exit_code == 1
    assert "training diverged at step 14" in r.stderr and "ckpt-000010" in r.stderr
    assert "Traceback" not in r.output
    run = work / "run"
    assert [s for s, _ in ck.list_checkpoints(run)] == [10]
    loaded = ck.load_checkpoint(run)
    assert loaded.step == 10 and all(torch.isfinite(p).all() for p in loaded.model.parameters())


@pytest.mark.parametrize("variant, backend, extra", [
    ("rnn", "cudnn", []), ("rnn", "custom", []),
    ("lstm", "cudnn", []), ("lstm", "custom", ["--init", "chrono"]),
    ("peephole", "custom", []), ("peephole", "custom", ["--peephole-form", "full", "--peepholes", "fo"]),
    ("coupled", "custom", []),
    ("gru", "cudnn", []), ("gru", "custom", []), ("gru", "custom", ["--gru-form", "cho", "--no-bias"]),
])
def test_every_variant_and_backend_trains(work, variant, backend, extra):
    r = invoke("--hidden", "12", "--embed", "6", "--layers", "2", "--batch-size", "4", "--seq-len", "16",
               "--threads", "1", "--sample-chars", "5", "--no-progress", "--variant", variant, "--backend", backend,
               *extra, "--max-steps", "3", "--out", "run")
    assert r.exit_code == 0, r.output
    loaded = ck.load_checkpoint(work / "run")
    assert (loaded.model_cfg.variant, loaded.model_cfg.backend, loaded.step) == (variant, backend, 3)
    assert math.isfinite(loaded.metrics["val_loss"])


# --------------------------------------------------------------------------- fine-tuning and errors

def test_init_from_takes_the_weights_and_checks_the_vocabulary(work):
    assert invoke(*TINY, "--max-steps", "5", "--out", "base").exit_code == 0
    subset = "".join(c for c in tiny_text() if c.isascii())
    (work / "ascii.txt").write_text(subset * 2, encoding="utf-8")
    r = CliRunner().invoke(app, ["train", "--data", "ascii.txt", "--init-from", "base", "--max-steps", "2",
                                 "--threads", "1", "--no-progress", "--batch-size", "8", "--seq-len", "32",
                                 "--out", "tuned"])
    assert r.exit_code == 0, r.output
    tuned = ck.load_checkpoint(work / "tuned")
    assert tuned.vocab == ck.load_checkpoint(work / "base").vocab      # the source's vocabulary is kept
    assert tuned.config["init_from"] == "base"
    (work / "new.txt").write_text(subset + "§¶" * 50, encoding="utf-8")
    r = CliRunner().invoke(app, ["train", "--data", "new.txt", "--init-from", "base", "--max-steps", "2",
                                 "--no-progress", "--out", "bad"])
    assert r.exit_code == 1 and "not in that model's vocabulary" in r.stderr and "'§'" in r.stderr
    r = CliRunner().invoke(app, ["train", "--data", "ascii.txt", "--init-from", "base", "--hidden", "99",
                                 "--no-progress", "--out", "bad"])
    assert r.exit_code == 2 and "--hidden cannot change" in r.stderr


@pytest.mark.parametrize("args, code, message", [
    (["--variant", "lstmx"], 2, "--variant must be one of"),
    (["--preset", "huge"], 2, "--preset must be one of"),
    (["--max-time", "soon"], 2, "--max-time takes a duration"),
    (["--lr", "-1"], 2, "--lr must be > 0"),
    (["--variant", "peephole", "--backend", "cudnn"], 2, "--backend cudnn has no peephole"),
    (["--data", "missing.txt"], 1, "no such file"),
    (["--resume", "nowhere"], 1, "does not exist"),
    (["--resume", "run", "--init-from", "run"], 2, "cannot be combined"),
    (["--batch-size", "4000"], 1, "needs at least"),
    (["--min-lr-frac", "2"], 2, "--min-lr-frac must be in"),
    (["--beta2", "1"], 2, "--beta2 must be in"),
    (["--clock", "sundial"], 2, "--clock must be one of"),
])
def test_bad_options_give_one_clear_line(work, args, code, message):
    r = invoke("--max-steps", "1", "--no-progress", *args)
    assert r.exit_code == code, r.output
    assert message in r.stderr and r.stderr.startswith("error: ") and "Traceback" not in r.output


def test_cuda_without_a_gpu_is_a_usage_error(work):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = invoke("--device", "cuda", "--max-steps", "1", "--no-progress")
    assert r.exit_code == 2 and "no CUDA device" in r.stderr


def test_a_run_is_never_overwritten_by_accident_and_damaged_runs_are_refused(work):
    assert invoke(*TINY, "--max-steps", "3", "--out", "run").exit_code == 0
    r = invoke(*TINY, "--max-steps", "3", "--out", "run")
    assert r.exit_code == 2 and "already holds a run" in r.stderr and "--resume run" in r.stderr
    r = CliRunner().invoke(app, ["train", "--resume", "run", "--lr", "0.5", "--no-progress"])
    assert r.exit_code == 2 and "--lr cannot change" in r.stderr
    weights_file = work / "run" / "ckpt-000003" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-64])
    damaged = weights_file.read_bytes()
    r = CliRunner().invoke(app, ["train", "--resume", "run", "--max-steps", "6", "--no-progress"])
    assert r.exit_code == 1 and "damaged" in r.stderr and "Traceback" not in r.output
    assert weights_file.read_bytes() == damaged and not (work / "run" / "ckpt-000006").exists()
    # Unnamed runs take a free name instead of touching an existing one.
    assert invoke(*TINY, "--max-steps", "1").exit_code == 0
    assert invoke(*TINY, "--max-steps", "1").exit_code == 0
    assert {p.name for p in (work / "checkpoints").iterdir()} == {"lstm-tiny", "lstm-tiny-2"}
    # --overwrite replaces a run of charlstm's own files only.
    assert invoke(*TINY, "--max-steps", "2", "--out", "checkpoints/lstm-tiny", "--overwrite").exit_code == 0
    assert [s for s, _ in ck.list_checkpoints(work / "checkpoints" / "lstm-tiny")] == [2]


# --------------------------------------------------------------------------- units

def test_presets_sit_between_defaults_and_explicit_options():
    model_cfg, train_cfg = train_mod.build_configs({"hidden": 64}, "demo")
    assert model_cfg.hidden == 64 and model_cfg.layers == 2 and train_cfg.max_time == 120.0
    assert train_cfg.data == "pystdlib"
    model_cfg, train_cfg = train_mod.build_configs({}, "shakespeare")
    assert train_cfg.data == "tinyshakespeare" and train_cfg.max_time == 600.0
    model_cfg, train_cfg = train_mod.build_configs({}, None)
    assert (model_cfg, train_cfg) == (ModelConfig(), TrainConfig())


def test_shakespeare_recipe_stays_under_its_parameter_budget():
    """The recipe is tuned under 2.5M parameters (tinyshakespeare's 65 characters): what
    docs/training.md's 10-minute figures compare."""
    model_cfg, _ = train_mod.build_configs({}, "shakespeare")
    model = build_model(dataclasses.replace(model_cfg, vocab_size=65))
    assert 2_000_000 < model.num_parameters() <= 2_500_000


def test_schedules():
    cfg = TrainConfig(lr=1.0, warmup=10, max_steps=110, min_lr_frac=0.1)
    assert optim.learning_rate(cfg, 0, 0.0) == pytest.approx(0.1)          # warmup
    assert optim.learning_rate(cfg, 9, 0.0) == pytest.approx(1.0)           # warmup done
    assert optim.learning_rate(cfg, 60, 0.5) == pytest.approx(0.55)        # half way down the cosine
    assert optim.learning_rate(cfg, 110, 1.0) == pytest.approx(0.1)        # the floor
    step_cfg = TrainConfig(lr=1.0, warmup=0, schedule="step", lr_decay=0.5, lr_decay_every=100)
    assert [optim.learning_rate(step_cfg, s, 0) for s in (0, 99, 100, 250)] == [1.0, 1.0, 0.5, 0.25]
    const = TrainConfig(lr=0.3, warmup=0, schedule="constant")
    assert optim.learning_rate(const, 1000, 0.9) == 0.3
    assert optim.budget_fraction(TrainConfig(max_steps=100, max_time=10.0), 50, 0.0, 6.0) == 0.6


def test_weight_decay_skips_biases_and_embeddings():
    model = build_model(ModelConfig(vocab_size=7, hidden=8, embed=4, backend="cudnn"))
    opt = optim.make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1", "head.weight"}


def test_beta2_reaches_the_optimizer():
    model = build_model(ModelConfig(vocab_size=7, hidden=8, embed=4))
    assert all(g["betas"] == (0.9, 0.99) for g in optim.make_optimizer(model, TrainConfig()).param_groups)
    opt = optim.make_optimizer(model, TrainConfig(beta2=0.999))
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)


def test_adamw_is_fused_where_torch_has_it_and_a_saved_state_keeps_its_kind():
    """The trainer's AdamW runs fused on a torch that has it for the CPU (2.4 and later; the looped
    one otherwise) and takes the same steps as the looped one; a state saved by a looped AdamW
    (every checkpoint before this) resumes looped, so its run continues as it would have."""
    model = build_model(ModelConfig(vocab_size=7, hidden=8, embed=4))
    opt = optim.make_optimizer(model, TrainConfig(weight_decay=0.1))
    fused_here = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    assert all(bool(g["fused"]) == fused_here for g in opt.param_groups)
    looped = torch.optim.AdamW(opt.param_groups[0]["params"][:1], lr=0.1)
    twin = [p.detach().clone().requires_grad_() for p in opt.param_groups[0]["params"][:1]]
    fused = optim.adamw(twin, lr=0.1)
    for _ in range(3):
        for o, params in ((looped, looped.param_groups[0]["params"]), (fused, twin)):
            o.zero_grad()
            (params[0] ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(twin[0], looped.param_groups[0]["params"][0], rtol=1e-6, atol=1e-7)
    again = optim.adamw(twin, lr=0.1)
    again.load_state_dict(looped.state_dict())
    assert not again.param_groups[0]["fused"]


def test_evaluate_loss_covers_the_split_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    vocab = Vocab(sorted(set(tiny_text())))
    tokens = torch.tensor(vocab.encode(tiny_text()[:3000]))
    model = build_model(ModelConfig(vocab_size=len(vocab), hidden=16, embed=8, dropout=0.3))
    model.train()
    rng = torch.get_rng_state()
    loss, n = evaluate_loss(model, tokens, batch_size=5, seq_len=64, device="cpu")
    assert n == tokens.numel() - 1 and math.isfinite(loss)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    again, _ = evaluate_loss(model, tokens, batch_size=5, seq_len=64, device="cpu")
    assert again == loss                                       # deterministic: no dropout at evaluation
    windowed, m = evaluate_loss(model, tokens, batch_size=5, seq_len=64, device="cpu", carry_state=False)
    assert m == n and windowed != loss


def test_budgets_epochs_time_and_the_default(work):
    spe = StreamBatcher(torch.zeros(int(len(tiny_text()) * 0.9), dtype=torch.long), 8, 32).steps_per_epoch
    r = invoke(*TINY, "--max-epochs", "0.5", "--max-steps", "1000", "--eval-every", "1000", "--out", "epochs")
    assert r.exit_code == 0, r.output
    assert ck.load_checkpoint(work / "epochs").step == math.ceil(0.5 * spe)
    r = invoke(*TINY, "--max-time", "1s", "--max-steps", "100000", "--eval-every", "100000", "--out", "timed")
    assert r.exit_code == 0 and "finished (max_time)" in r.stderr
    state = ck.load_checkpoint(work / "timed").trainer_state
    assert 1.0 <= state["train_time"] < 30 and state["step"] >= 1
    r = invoke(*TINY, "--max-time", "1s", "--clock", "cpu", "--eval-every", "100000", "--out", "cpu")
    assert r.exit_code == 0 and "finished (max_time)" in r.stderr
    assert ck.load_checkpoint(work / "cpu").config["train"]["clock"] == "cpu"
    r = invoke(*TINY, "--eval-every", "1000", "--out", "default")
    assert r.exit_code == 0 and "no budget given: training for 1 epoch" in r.stderr
    assert ck.load_checkpoint(work / "default").step == spe


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_with_bf16_autocast_loads_on_the_cpu(work):
    r = invoke(*TINY, "--device", "cuda", "--max-steps", "5", "--out", "gpu")
    assert r.exit_code == 0, r.output
    loaded = ck.load_checkpoint(work / "gpu")                      # mapped to the CPU by default
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert "torch_cuda" in loaded.trainer_state["rng"] and math.isfinite(loaded.metrics["val_loss"])
    r = CliRunner().invoke(app, ["train", "--resume", "gpu", "--max-steps", "8", "--device", "cuda", "--no-progress"])
    assert r.exit_code == 0, r.output


def test_sigterm_saves_and_exits_like_ctrl_c(work, monkeypatch):
    real_next = StreamBatcher.next_batch
    calls = {"n": 0}

    def next_batch_then_kill(self):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    monkeypatch.setattr(StreamBatcher, "next_batch", next_batch_then_kill)
    before = signal.getsignal(signal.SIGTERM)
    r = invoke(*TINY, "--max-steps", "20", "--out", "run")
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert "SIGTERM: stopping after this step" in r.stderr
    assert ck.load_checkpoint(work / "run").step == 4
    assert signal.getsignal(signal.SIGTERM) == before                    # handlers restored

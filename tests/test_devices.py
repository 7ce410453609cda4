"""Every command end to end on each device: the CPU here, and CUDA where a GPU is present.

The rest of the suite states what happens on a CPU and hides CUDA (conftest.py); these tests are
the ones that put each command through a GPU (their ids name the device, so `pytest -k cuda`,
which benchmarks/gpu_check.py runs, selects the CUDA half). A cuDNN model's `eval --dynamic`
crashed on the first GPU these tests would have met (an H200): that is the kind of fault they are for.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cli

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="needs a CUDA device"))]
SMALL = ["--hidden", "16", "--embed", "8", "--layers", "2", "--batch-size", "4", "--seq-len", "16",
         "--threads", "1", "--sample-chars", "0", "--no-progress"]
MODELS = {"lstm-cudnn": ["--variant", "lstm", "--backend", "cudnn", "--dropout", "0.1"],
          "gru-custom": ["--variant", "gru", "--backend", "custom"],
          "peephole-custom": ["--variant", "peephole", "--backend", "custom"],
          "mogrifier-custom": ["--variant", "mogrifier", "--backend", "custom", "--mogrify-rounds", "2"]}


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("device", DEVICES)
def test_train_eval_dynamic_sample_info_visualize(work, device, model):
    ok(cli("train", "--data", "tiny.txt", *SMALL, *MODELS[model], "--max-steps", "6", "--eval-every", "3",
           "--device", device, "--out", "run"))
    static = json.loads(ok(cli("eval", "run", "--device", device, "--json")))
    assert math.isfinite(static["loss_nats"]) and static["device"] == device
    both = json.loads(ok(cli("eval", "run", "--device", device, "--dynamic", "--dynamic-stat-segments", "2",
                             "--json")))
    assert both["loss_nats"] == pytest.approx(static["loss_nats"], abs=1e-4)
    assert math.isfinite(both["dynamic"]["loss_nats"])
    ok(cli("sample", "run", "--device", device, "--length", "30", "--seed", "0", "--output", "s.txt"))
    assert len((work / "s.txt").read_text(encoding="utf-8")) == 30
    ok(cli("info", "run"))
    found = json.loads(ok(cli("visualize", "run", "--device", device, "--text", "Speak, speak.",
                              "--find-units", "--json", "--top", "2")))
    assert found


@pytest.mark.parametrize("device", DEVICES)
def test_resume_continues_on_the_device(work, device):
    args = ["train", "--data", "tiny.txt", *SMALL, "--variant", "lstm", "--backend", "custom", "--device", device]
    ok(cli(*args, "--max-steps", "4", "--out", "run"))
    ok(cli("train", "--resume", "run", "--max-steps", "7", "--device", device, "--no-progress"))
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 7


@pytest.mark.parametrize("device", DEVICES)
def test_compare_variants_and_bench_on_the_device(work, device):
    ok(cli("compare-variants", "--data", "tiny.txt", "--variants", "lstm,gru,rnn", "--hidden", "16",
           "--embed", "8", "--batch-size", "4", "--seq-len", "16", "--max-steps", "4", "--threads", "1",
           "--device", device, "--out", "cmp", "--no-progress"))
    report = json.loads(ok(cli("bench", "--device", device, "--variants", "lstm,gru", "--backends", "cudnn,custom",
                               "--hidden", "16", "--batch-size", "4", "--seq-len", "8", "--embed", "8",
                               "--measures", "train,sample", "--repeats", "1", "--warmup", "1",
                               "--peak-size", "0", "--json")))
    assert report["settings"]["device"] == device
    assert all(r["train"]["chars_per_s"] > 0 for r in report["results"])

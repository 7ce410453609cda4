"""`charlstm bench` at tiny sizes: the JSON report's fields and figures, the table, bad options.

Speed itself is never asserted (the machine is shared and noisy); what is checked
is that every figure is measured, positive and consistent with its definition.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from charlstm import bench_report, cli
from charlstm.bench import weight_count
from charlstm.config import ModelConfig
from charlstm.model import build_model

runner = CliRunner()

TINY = ["--hidden", "8", "--layers", "2", "--batch-size", "2", "--seq-len", "5", "--embed", "4",
        "--vocab", "7", "--repeats", "2", "--warmup", "1", "--sample-length", "3", "--peak-size", "32",
        "--threads", "1"]


def invoke(*args: str):
    return runner.invoke(cli.app, ["bench", *args], prog_name="charlstm")


@pytest.fixture(scope="module")
def report():
    """One tiny run with every measure: lstm and gru on both backends, coupled custom and basic."""
    result = invoke(*TINY, "--variants", "lstm,coupled,gru", "--backends", "cudnn,custom,basic", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_ratios_gflops_and_peak(report):
    peak = report["peak"]
    assert peak["square"]["shape"] == [32, 32, 32] and peak["square"]["gflops"] > 0
    assert [(p["batch_size"], p["hidden"], p["shape"]) for p in peak["recurrent"]] == [(2, 8, [2, 8, 32])]
    assert peak["recurrent"][0]["gflops"] > 0
    rows = {(r["variant"], r["backend"]) for r in report["results"]}
    assert rows == {("lstm", "cudnn"), ("lstm", "custom"), ("lstm", "basic"), ("coupled", "custom"),
                    ("coupled", "basic"), ("gru (cudnn)", "cudnn"), ("gru (cudnn)", "custom"),
                    ("gru (cudnn)", "basic")}
    assert any("coupled" in s for s in report["skipped"])  # coupled has no torch.nn module
    for r in report["results"]:
        assert (r["hidden"], r["layers"], r["batch_size"], r["seq_len"]) == (8, 2, 2, 5)
        for measure in ("train", "sample", "sample_batch"):
            fig = r[measure]
            assert len(fig["seconds"]) == 2 and all(s > 0 for s in fig["seconds"])
            assert fig["chars_per_s"] > 0 and fig["ratio_to_nn_lstm"] > 0
            assert fig["gflops"] > 0 and fig["fraction_of_mm_peak"] > 0 and fig["fraction_of_recurrent_mm_peak"] > 0
        assert "stepper" in r["sample"]


def test_figures_follow_their_definitions(report):
    """chars/s = chars / median seconds; GFLOP/s = 6 (training) or 2 (sampling) x weights x chars/s;
    the nn.LSTM row's training ratio is 1."""
    for r in report["results"]:
        train = r["train"]
        assert train["chars_per_s"] == pytest.approx(2 * 5 / train["seconds_median"])
        assert train["gflops"] == pytest.approx(6 * r["weights"] * train["chars_per_s"] / 1e9)
        assert train["fraction_of_mm_peak"] == pytest.approx(train["gflops"] / report["peak"]["square"]["gflops"])
        sample = r["sample_batch"]
        assert sample["chars_per_s"] == pytest.approx(2 * 3 / sample["seconds_median"])
        assert sample["gflops"] == pytest.approx(2 * r["weights"] * sample["chars_per_s"] / 1e9)
        if r["baseline"]:
            assert (r["variant"], r["backend"]) == ("lstm", "cudnn")
            assert train["ratio_to_nn_lstm"] == pytest.approx(1.0)
    (base,) = report["baselines"]
    assert base["sample_onednn_chars_per_s"] > 0 and base["sample_no_onednn_chars_per_s"] > 0
    assert base["sample_batch_onednn_chars_per_s"] > 0 and base["sample_batch_no_onednn_chars_per_s"] > 0
    assert report["machine"]["threads"] == 1 and report["machine"]["cpu"]
    assert report["flops"]["train_per_weight_per_char"] == 6


@pytest.mark.parametrize("variant,extra", [
    ("rnn", {}), ("lstm", {}), ("coupled", {}), ("gru", {"gru_form": "cho"}),
    ("peephole", {"peephole_form": "diag"}), ("peephole", {"peephole_form": "full", "peepholes": "fo"}),
])
def test_weight_count_is_the_models_weight_matrices(variant, extra):
    cfg = ModelConfig(vocab_size=7, variant=variant, backend="custom", embed=4, hidden=6, layers=2, **extra)
    model = build_model(cfg)
    expected = sum(p.numel() for n, p in model.rnn.named_parameters()
                   if n.endswith(("weight_ih", "weight_hh")) or (n.endswith("weight_ch") and p.dim() == 2))
    assert weight_count(model.cfg) == expected


def test_table_on_stdout_and_progress_off_stdout():
    result = invoke(*TINY, "--variants", "gru:cho", "--backends", "custom", "--measures", "train",
                    "--clock", "cpu")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "x nn.LSTM" in out and "GFLOP/s" in out and "gru (cho)" in out and "lstm" in out
    assert "mm peak" in out and "CPU time" in out
    assert "measuring" not in out  # the tqdm bar goes to stderr


@pytest.mark.parametrize("args,message", [
    (["--variants", "lstm,tree"], "unknown variant"),
    (["--variants", "gru:full"], "has no form"),
    (["--backends", "cudnn,fast"], "unknown backend"),
    (["--hidden", "8,x"], "--hidden takes integers"),
    (["--measures", "train,speed"], "unknown measure"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--device", "tpu"], "--device must be one of"),
    (["--clock", "sundial"], "--clock must be one of"),
    (["--bf16", "--device", "cpu"], "--bf16 times training under bf16 autocast, which train uses on CUDA only"),
])
def test_bad_options_exit_2_with_one_line(args, message):
    result = invoke(*TINY, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_training_figures_on_cuda():
    result = invoke(*TINY, "--variants", "lstm", "--backends", "cudnn,custom", "--device", "cuda", "--bf16",
                    "--measures", "train", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["settings"]["bf16"] is True and all(r["train"]["chars_per_s"] > 0 for r in out["results"])
    assert "training under bf16 autocast" in " ".join(bench_report.table_footer(out))

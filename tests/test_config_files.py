"""Config files: `--config FILE.toml` (command line over file over preset over defaults), `--print-config`
(what --config reads back to the same run), the TOML writer, one-line errors naming file and key, and
the run directory's config.toml (configfile.write_run_config)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli as invoke

from charlstm import checkpoint as ck
from charlstm import cli, configfile, training
from charlstm import compare as compare_mod
from charlstm.config import PRESETS, CompareConfig, ModelConfig, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TINY = ["--data", "tiny.txt", "--hidden", "16", "--embed", "8", "--layers", "1", "--batch-size", "4",
        "--seq-len", "16", "--threads", "1", "--sample-chars", "0", "--max-steps", "6", "--eval-every", "3",
        "--checkpoint-every", "3", "--lr", "0.01", "--warmup", "2", "--seed", "7", "--device", "cpu"]




def printed(*args) -> str:
    result = invoke(*args, "--print-config")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout


def configs_of(toml_text: str) -> tuple[ModelConfig, TrainConfig]:
    """The configs `charlstm train` builds from a printed settings file alone."""
    path = Path("settings.toml")
    path.write_text(toml_text, encoding="utf-8")
    preset, values = configfile.read_train_config(path)
    return training.build_configs(values, preset)


# --------------------------------------------------------------------------- print-config / config round trip

def test_print_config_is_toml_of_every_setting_and_reads_back_to_the_same_configs(work):
    text = printed("train", *TINY, "--variant", "peephole", "--peepholes", "fo", "--no-bias", "--max-time", "2m")
    table = tomllib.loads(text)
    assert set(table) == {"model", "train"}                            # no preset given: none written
    assert table["model"]["hidden"] == 16 and table["model"]["bias"] is False
    assert table["train"]["max_time"] == 120.0 and table["train"]["data"] == "tiny.txt"
    assert "vocab_size" not in table["model"]                          # set from the corpus, not a setting
    assert "threads" in table["train"] and "name" not in table["train"]  # None is left out
    expected = training.build_configs(_options(
        *TINY, "--variant", "peephole", "--peepholes", "fo", "--no-bias", "--max-time", "2m"), None)
    assert configs_of(text) == expected
    Path("run.toml").write_text(text, encoding="utf-8")
    assert printed("train", "--config", "run.toml") == text           # a fixed point


def _options(*args) -> dict:
    """The {field: value} options `charlstm train ARGS` hands to train.run_from_cli (nothing trained)."""
    seen = {}
    real = cli.train_mod.run_from_cli
    cli.train_mod.run_from_cli = lambda options, **kw: seen.update(options)
    try:
        r = invoke("train", *args)
        assert r.exit_code == 0, r.output
    finally:
        cli.train_mod.run_from_cli = real
    return seen


def test_precedence_command_line_over_file_over_preset_over_defaults(work):
    Path("run.toml").write_text('preset = "demo"\n[model]\nhidden = 100\nembed = 10\n'
                                '[train]\nbatch_size = 5\nmax_time = "3m"\n', encoding="utf-8")
    model, train = configs_of(printed("train", "--config", "run.toml", "--hidden", "50"))
    assert model.hidden == 50                                   # command line over the file
    assert model.embed == 10 and train.batch_size == 5          # the file over the preset (16)
    assert train.max_time == 180.0                              # "3m" read as a duration
    assert train.lr == PRESETS["demo"]["lr"]                    # the preset over the defaults
    assert train.beta2 == TrainConfig().beta2                   # the defaults
    assert tomllib.loads(printed("train", "--config", "run.toml"))["preset"] == "demo"
    # a preset on the command line replaces the file's
    model, train = configs_of(printed("train", "--config", "run.toml", "--preset", "shakespeare"))
    assert train.lr == PRESETS["shakespeare"]["lr"] and model.hidden == 100


def test_a_run_from_its_printed_config_has_the_same_weights(work):
    """print-config -> file -> --config: the same ModelConfig, TrainConfig and, trained, the same weights."""
    assert invoke("train", *TINY, "--no-progress", "--out", "a").exit_code == 0
    Path("run.toml").write_text(printed("train", *TINY, "--out", "a"), encoding="utf-8")
    r = invoke("train", "--config", "run.toml", "--out", "b", "--no-progress")
    assert r.exit_code == 0, r.output
    a, b = (json.loads((work / d / "ckpt-000006" / "config.json").read_text()) for d in "ab")
    assert a["model"] == b["model"]
    assert {**a["train"], "out": None, "name": None} == {**b["train"], "out": None, "name": None}
    wa, wb = (ck.load_tensors(work / d / "ckpt-000006" / "model.safetensors")[0] for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_run_config_file_trains_the_same_run_again_into_a_new_directory(work):
    assert invoke("train", *TINY, "--no-progress", "--out", "a", "--preset", "demo").exit_code == 0
    config = json.loads((work / "a" / "ckpt-000006" / "config.json").read_text())
    model, train = ModelConfig.from_dict(config["model"]), TrainConfig.from_dict(config["train"])
    path = configfile.write_run_config(work / "a", model, train, preset=config["preset"])
    assert path == work / "a" / "config.toml"
    table = tomllib.loads(path.read_text(encoding="utf-8"))
    assert table["preset"] == "demo" and "out" not in table["train"] and "name" not in table["train"]
    assert not list((work / "a").glob(".config.toml.tmp*"))
    again_model, again_train = configs_of(path.read_text(encoding="utf-8"))
    assert dataclasses.replace(again_model, vocab_size=model.vocab_size) == model
    assert dataclasses.replace(again_train, out=train.out, name=train.name) == train
    # with --resume, the file's settings must be the run's own (only the budget may grow)
    r = invoke("train", "--resume", "a", "--config", path, "--max-steps", "9", "--print-config")
    assert r.exit_code == 0, r.output
    assert tomllib.loads(r.stdout)["train"]["max_steps"] == 9
    r = invoke("train", "--resume", "a", "--config", path, "--hidden", "17", "--print-config")
    assert r.exit_code == 2 and "--hidden" in r.stderr


def test_compare_variants_print_config_round_trip(work):
    for args in (["--data", "tiny.txt", "--variants", "lstm,gru", "--seeds", "1,2", "--max-time", "90s",
                  "--match-params", "--hidden", "32"],
                 ["--task", "long-gap", "--gaps", "5,7", "--max-steps", "10", "--keys", "4"]):
        text = printed("compare-variants", *args)
        table = tomllib.loads(text)
        assert {"model", "train"} <= set(table) and "variants" in table
        Path("cmp.toml").write_text(text, encoding="utf-8")
        settings = compare_mod.settings_from_options(configfile.read_compare_config(Path("cmp.toml")))
        direct = compare_mod.settings_from_options(_compare_options(*args))
        assert settings.to_dict() == direct.to_dict()
        assert printed("compare-variants", "--config", "cmp.toml") == text
    assert "seq_len" not in table["train"]                          # the long-gap task refuses it
    Path("cmp.toml").write_text('variants = ["lstm", "rnn"]\n[train]\nmax_steps = 3\n', encoding="utf-8")
    table = tomllib.loads(printed("compare-variants", "--config", "cmp.toml", "--variants", "gru"))
    assert table["variants"] == ["gru"] and table["train"]["max_steps"] == 3


def _compare_options(*args) -> dict:
    """The {field: value} options `charlstm compare-variants ARGS` hands to settings_from_options."""
    seen = {}
    real = compare_mod.settings_from_options

    def spy(options):
        seen.update(options)
        return real(options)

    cli.compare_mod.settings_from_options = spy
    try:
        assert invoke("compare-variants", *args, "--print-config").exit_code == 0
    finally:
        cli.compare_mod.settings_from_options = real
    return seen


# --------------------------------------------------------------------------- errors: one line, file and key

@pytest.mark.parametrize("text,message", [
    ('[model]\nhiden = 3\n', "run.toml: [model] hiden: unknown setting (did you mean hidden?)"),
    ('[model]\nhidden = "3"\n', 'run.toml: [model] hidden must be an integer (got "3")'),
    ('[model]\nhidden = 3.5\n', "run.toml: [model] hidden must be an integer (got 3.5)"),
    ('[model]\nbias = 1\n', "run.toml: [model] bias must be true or false (got 1)"),
    ('[train]\nlr = "fast"\n', 'run.toml: [train] lr must be a number (got "fast")'),
    ('[train]\nlr = nan\n', "run.toml: [train] lr must be a finite number (got nan)"),
    ('[train]\nmax_time = "ten minutes"\n', "run.toml: [train] max_time must be a number of seconds or a duration"),
    ('[train]\nhidden = 3\n', "run.toml: [train] hidden: this setting belongs in [model]"),
    ('hidden = 3\n', "run.toml: hidden: this setting belongs in [model]"),
    ('[optim]\nlr = 1\n', "run.toml: unknown section [optim]; the sections are [model], [train]"),
    ('model = 3\n', "run.toml: model must be a section [model]"),
    ('preset = "fast"\n', 'run.toml: preset must be one of demo, shakespeare (got "fast")'),
    ('[model]\nhidden = -3\n', "run.toml: [model] hidden: --hidden must be > 0 (got -3)"),
    ('[model]\nvariant = "lsmt"\n', "run.toml: [model] variant: --variant must be one of"),
    ('[model\n', "--config run.toml is not valid TOML: "),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(work, text, message):
    Path("run.toml").write_text(text, encoding="utf-8")
    r = invoke("train", "--config", "run.toml")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: " + message) and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == "" and "Traceback" not in r.output


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "--config run.toml does not exist"),
    (lambda p: p.mkdir(), "--config run.toml is not a file"),
    (lambda p: p.write_bytes(b"[model]\nhidden = 3 # \xff\n"), "--config run.toml is not UTF-8 text"),
])
def test_a_missing_or_unreadable_file_is_one_line(work, make, message):
    make(Path("run.toml"))
    r = invoke("train", "--config", "run.toml", "--print-config")
    assert r.exit_code == 2 and r.stderr.startswith("error: " + message) and r.stderr.count("\n") == 1


def test_compare_variants_file_errors_name_the_key(work):
    Path("cmp.toml").write_text('[train]\nsample_chars = 3\n', encoding="utf-8")
    r = invoke("compare-variants", "--config", "cmp.toml")
    assert r.exit_code == 2 and r.stderr.startswith("error: cmp.toml: [train] sample_chars: unknown setting")
    Path("cmp.toml").write_text('seeds = ["one"]\n', encoding="utf-8")
    r = invoke("compare-variants", "--config", "cmp.toml")
    assert r.exit_code == 2 and r.stderr.startswith("error: cmp.toml: seeds must be a list of integers")
    Path("cmp.toml").write_text('[model]\ntask = "corpus"\n', encoding="utf-8")
    r = invoke("compare-variants", "--config", "cmp.toml")
    assert r.exit_code == 2 and "belongs at the top of the file" in r.stderr


# --------------------------------------------------------------------------- the writer

@pytest.mark.parametrize("value", [
    "plain", 'quote " and back\\slash', "line\nbreak\ttab\r", "ünïcödé 日本 🙂", "del \x7f bell \x07 nul \x00",
    0, -3, 10**12, 0.1, 3e-3, 1e-12, 1e16, -2.5, 3.0, True, False, [], ["a", "b"], [1, 2, 3],
    float("inf"), float("-inf"),
])
def test_the_writer_writes_toml_that_reads_back_exactly(value):
    text = configfile.dumps({"x": value, "gone": None}, {"s": {"y": value}}, header="a\nb")
    table = tomllib.loads(text)
    assert table == {"x": value, "s": {"y": value}}
    assert all(type(a) is type(b) for a, b in ((table["x"], value), (table["s"]["y"], value)))
    assert text.startswith("# a\n# b\n")


def test_the_writer_writes_nan_as_toml_nan():
    assert math.isnan(tomllib.loads(configfile.dumps({"x": float("nan")}, {}))["x"])


def test_every_setting_of_the_files_has_a_kind():
    for schema in (configfile.train_schema(), configfile.compare_schema()):
        for keys in schema.values():
            for owner, f in keys.values():
                assert configfile._kind(owner, f) in configfile.KIND_TEXT
    assert set(configfile.compare_schema()["model"]) == set(CompareConfig.MODEL_OPTIONS)

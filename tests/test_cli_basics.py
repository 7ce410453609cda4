"""The CLI frame: every command listed, --help defaults from the dataclasses, --debug, --version,
completion, one-line errors (ours and the parser's)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import charlstm
from charlstm import cli
from charlstm.config import PRESETS, VARIANTS, BenchConfig, CompareConfig, ModelConfig, TrainConfig
from charlstm.errors import UsageError

CLI_MD = Path(__file__).resolve().parents[1].parent / "shared" / "CLI.md"
# The commands of ../shared/CLI.md, for machines where that file is absent.
CONTRACT_COMMANDS = ["train", "sample", "eval", "info", "compare-variants", "bench"]
# Commands of CLI.md that are still to come; until then their absence is expected.
LATER: dict[str, str] = {}

runner = CliRunner()


def invoke(*args: str, **kw):
    return runner.invoke(cli.app, list(args), prog_name="charlstm", **kw)


def contract_commands() -> list[str]:
    """Command names from the '## Commands' section of CLI.md (or the built-in copy)."""
    if not CLI_MD.is_file():
        return CONTRACT_COMMANDS
    text = CLI_MD.read_text(encoding="utf-8")
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\s+charlstm ([a-z][a-z-]*)", section, flags=re.M)
    assert names, "no commands found in CLI.md's Commands section"
    return names


@pytest.fixture
def extra_command(monkeypatch):
    """Register a throwaway command on the real app (undone after the test)."""
    monkeypatch.setattr(cli.app, "registered_commands", list(cli.app.registered_commands))

    def add(name: str, error: Exception):
        def command() -> None:
            raise error

        cli.app.command(name)(command)

    return add


@pytest.mark.parametrize("name", contract_commands())
def test_help_lists_every_contract_command(name):
    if name in LATER:
        pytest.xfail(f"charlstm {name} comes with {LATER[name]}")
    result = runner.invoke(cli.app, ["--help"], prog_name="charlstm", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert set(CONTRACT_COMMANDS) <= set(contract_commands())
    assert re.search(rf"\b{re.escape(name)}\b", result.stdout), f"{name} missing from charlstm --help"
    assert invoke(name, "--help").exit_code == 0


# --------------------------------------------------------------------------- defaults in --help

def rendered_defaults(command: str) -> dict[str, str]:
    """{'--hidden': '256', ...}: the default each option's row of `charlstm COMMAND --help` shows."""
    result = invoke(command, "--help", env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    shown = {}
    for line in result.stdout.splitlines():
        m = re.match(r"\W*(--[a-z0-9-]+)\b.*?\[default: (.*?)\]\s*\W*$", line)
        if m:
            shown[m.group(1)] = m.group(2)
    return shown


def flag_of(f: dataclasses.Field) -> str:
    return (f.metadata.get("flag") or "--" + f.name.replace("_", "-")).split("/")[0]


def parsed(text: str, example):
    """A default as --help shows it, read back as the type of ``example``."""
    if isinstance(example, bool):
        return not text.startswith("--no-") if text.startswith("--") else text   # --bf16 / --no-tensorboard
    if isinstance(example, list):
        return [type(example[0])(x) for x in text.split(",")]
    return type(example)(text) if example is not None else text


def expected_default(f: dataclasses.Field):
    """What --help must show for a field: its 'shown' text, else its default (None: nothing)."""
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool) and "/" not in (f.metadata.get("flag") or ""):
        return None  # a switch (--no-bias, --match-params): off unless given
    return value


def check_fields(shown: dict, owner: type, names=None, task_defaults: dict | None = None) -> int:
    fields = [f for f in dataclasses.fields(owner) if f.metadata.get("flag") != "" and "help" in f.metadata]
    if names is not None:
        fields = [f for f in fields if f.name in names]
    for f in fields:
        flag = flag_of(f)
        expected = expected_default(f)
        per_task = {task: d[f.name] for task, d in (task_defaults or {}).items() if f.name in d}
        if per_task:  # compare-variants: 'corpus 256, long-gap 64'
            tasks = dict(part.split(" ", 1) for part in shown[flag].split(", "))
            for task in CompareConfig.TASK_DEFAULTS:
                want = per_task.get(task, expected)
                got = tasks[task]
                assert (got == "none" and want is None) or parsed(got, want) == want, (flag, task, got, want)
        elif expected is None:
            assert flag not in shown, f"{flag} shows a default it does not have: {shown.get(flag)}"
        elif isinstance(expected, str) and f.metadata.get("shown"):
            assert shown.get(flag) == expected, (flag, shown.get(flag), expected)
        else:
            assert flag in shown, f"{flag}: no default in --help"
            assert parsed(shown[flag], expected) == expected, (flag, shown[flag], expected)
    return len(fields)


def test_train_help_shows_every_default_of_the_dataclasses():
    shown = rendered_defaults("train")
    n = check_fields(shown, ModelConfig) + check_fields(shown, TrainConfig)
    assert n >= 40
    assert shown["--hidden"] == "256" and shown["--lr"] == "0.003" and shown["--bf16"] == "--bf16"


def test_compare_and_bench_help_show_the_dataclasses_defaults():
    shown = rendered_defaults("compare-variants")
    check_fields(shown, CompareConfig)
    check_fields(shown, ModelConfig, CompareConfig.MODEL_OPTIONS, CompareConfig.TASK_DEFAULTS)
    check_fields(shown, TrainConfig, CompareConfig.TRAIN_OPTIONS, CompareConfig.TASK_DEFAULTS)
    assert shown["--hidden"] == "corpus 256, long-gap 64" and shown["--variants"] == ",".join(VARIANTS)
    shown = rendered_defaults("bench")
    check_fields(shown, BenchConfig)
    assert shown["--device"] == "auto" and shown["--hidden"] == str(ModelConfig.hidden)


@pytest.mark.parametrize("command", ["sample", "eval", "info", "visualize"])
def test_other_commands_show_their_defaults(command):
    shown = rendered_defaults(command)
    click_command = typer.main.get_command(cli.app).commands[command]
    for param in click_command.params:
        if param.param_type_name != "option" or param.is_flag or param.default is None:
            continue
        assert param.opts[0] in shown, f"{command} {param.opts[0]}: no default in --help"
        assert shown[param.opts[0]] in (str(param.default), repr(param.default))


def test_train_help_says_what_each_preset_changes():
    result = invoke("train", "--help", env={"COLUMNS": "1000"})
    text = " ".join(result.stdout.split())
    assert set(PRESETS) == {"demo", "shakespeare"}
    recipe = PRESETS["shakespeare"]
    assert "shakespeare (" in text and f"--hidden {recipe['hidden']}" in text and f"--lr {recipe['lr']}" in text
    assert "demo (" in text and "--batch-size 16" in text and "--max-time 120s" in text
    # a preset value equal to the default is not listed as a change
    demo = text.split("demo (", 1)[1].split("shakespeare (", 1)[0]
    assert "--hidden" not in demo


# --------------------------------------------------------------------------- errors

def test_debug_shows_the_traceback_of_a_commands_error(tmp_path):
    missing = str(tmp_path / "no-such-run")
    plain = invoke("info", missing)
    assert plain.exit_code == 1
    assert plain.stderr.startswith("error: ") and plain.stderr.count("\n") == 1
    assert "Traceback" not in plain.output
    for args in (["--debug", "info", missing], ["info", missing, "--debug"]):
        result = invoke(*args)
        assert result.exit_code == 1
        assert "Traceback" in result.stderr and "CharlstmError" in result.stderr


def test_usage_error_raised_by_a_command_exits_2(extra_command):
    extra_command("bad-usage", UsageError("--thing must be > 0 (got -1)"))
    result = invoke("bad-usage")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --thing must be > 0 (got -1)"


@pytest.mark.parametrize("args,message", [
    (["train", "--hidden", "abc"], "error: --hidden: 'abc' is not an integer"),
    (["train", "--lr", "fast"], "error: --lr: 'fast' is not a number"),
    (["bench", "--embed", "1.5"], "error: --embed: '1.5' is not an integer"),
    (["compare-variants", "--keys", "x"], "error: --keys: 'x' is not an integer"),
    (["sample", "--length", "x"], "error: --length: 'x' is not an integer"),
    (["no-such-command"], "error: no such command 'no-such-command'"),
    (["train", "--no-such-option"], "error: no such option: --no-such-option"),
    (["train", "--hiden", "3"], "error: no such option: --hiden (did you mean --help, --hidden, --init?)"),
    (["--bogus"], "error: no such option: --bogus"),
    (["sample", "--length"], "error: option '--length' requires an argument"),
    (["train", "--batch-size", "many"], "error: --batch-size: 'many' is not an integer"),
    (["eval", "a", "b"], "error: got unexpected extra argument(s) (b)"),
])
def test_parser_errors_are_one_line_and_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr == message + "\n"
    assert result.stdout == "" and "Traceback" not in result.output


@pytest.mark.parametrize("message, expected", [
    ("'abc' is not a valid integer.", "--hidden: 'abc' is not an integer"),   # click 8
    ("'abc' is not a valid int", "--hidden: 'abc' is not an integer"),       # typer 0.27 (seen on a GPU machine)
    ("'fast' is not a valid float.", "--hidden: 'fast' is not a number"),
    ("'x' is not a valid boolean.", "--hidden: 'x' is not true or false"),
    ("'x' is not one of 'a', 'b'.", "--hidden: 'x' is not one of 'a', 'b'"),
])
def test_the_parsers_older_type_errors_read_the_same(message, expected):
    """typer >= 0.12 is allowed; before it converted values with pydantic, click's types said it."""
    from types import SimpleNamespace

    from charlstm.cli_options import parser_message
    param = SimpleNamespace(opts=["--hidden"], param_type_name="option", human_readable_name="--hidden")
    assert parser_message(typer.BadParameter(message, param=param)) == expected


def test_version_and_completion():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"charlstm {charlstm.__version__} (torch {torch.__version__})\n"
    help_text = invoke("--help", env={"COLUMNS": "200"}).stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text


# --------------------------------------------------------------------------- --device, the same everywhere

DEVICE_COMMANDS = {
    "train": ["--data", "tiny.txt", "--max-steps", "1"],
    "compare-variants": ["--data", "tiny.txt", "--max-steps", "1"],
    "bench": ["--repeats", "1"],
    "sample": ["run", "--length", "5"],
    "eval": ["run"],
    "visualize": ["run", "--text", "abc"],
}


@pytest.mark.parametrize("device", ["mps", "gpu", "cuda:0"])
@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
def test_an_unknown_device_is_one_line_and_exit_2_in_every_command(tmp_path, monkeypatch, command, device):
    """runtime.resolve_device is every command's check: one line, the choices, exit 2 (no traceback)."""
    from conftest import save_run, tiny_text

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    save_run(tmp_path / "run")
    result = invoke(command, *DEVICE_COMMANDS[command], "--device", device)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: --device must be one of auto, cpu, cuda (got '{device}')\n"
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
def test_cuda_without_a_cuda_device_is_one_line_and_exit_2_in_every_command(tmp_path, monkeypatch, command):
    from conftest import save_run, tiny_text

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(tiny_text(), encoding="utf-8")
    save_run(tmp_path / "run")
    result = invoke(command, *DEVICE_COMMANDS[command], "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --device cuda: no CUDA device") and result.stderr.count("\n") == 1

"""The CLI frame: every command listed, 'not implemented yet' path, --debug, usage errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import charlstm
from charlstm import cli
from charlstm.errors import NotImplementedYet, UsageError

CLI_MD = Path(__file__).resolve().parents[1].parent / "shared" / "CLI.md"
# The commands of ../shared/CLI.md, for machines where that file is absent.
CONTRACT_COMMANDS = ["train", "sample", "eval", "info", "compare-variants", "bench"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli.app, list(args), prog_name="charlstm")


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


def test_help_lists_every_contract_command():
    result = runner.invoke(cli.app, ["--help"], prog_name="charlstm", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    names = contract_commands()
    assert set(CONTRACT_COMMANDS) <= set(names)
    for name in names:
        assert re.search(rf"\b{re.escape(name)}\b", result.stdout), f"{name} missing from charlstm --help"
        assert invoke(name, "--help").exit_code == 0


def test_not_implemented_yet_is_one_line_and_status_1(extra_command):
    extra_command("not-built", NotImplementedYet("charlstm not-built"))
    result = invoke("not-built")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: charlstm not-built is not implemented yet"
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(extra_command, where):
    extra_command("not-built", NotImplementedYet("charlstm not-built"))
    args = ["--debug", "not-built"] if where == "before" else ["not-built", "--debug"]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "NotImplementedYet" in result.stderr


def test_usage_error_raised_by_a_command_exits_2(extra_command):
    extra_command("bad-usage", UsageError("--thing must be > 0 (got -1)"))
    result = invoke("bad-usage")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --thing must be > 0 (got -1)"


@pytest.mark.parametrize("args", [
    ["no-such-command"],
    ["train", "--no-such-option"],
    ["train", "--batch-size", "many"],
    ["sample", "--length"],
])
def test_click_usage_errors_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# Commands whose block imports its library module lazily (module names of docs/architecture.md).
LAZY_COMMANDS = [("train", "train"), ("sample", "sample"), ("eval", "evaluate"), ("info", "info")]


@pytest.mark.parametrize("command,module", LAZY_COMMANDS)
def test_command_without_its_module_says_not_implemented_yet(command, module, monkeypatch):
    source = Path(cli.__file__).read_text(encoding="utf-8")
    if f"from . import {module} as" not in source:
        pytest.skip(f"the {command} block no longer imports charlstm.{module} lazily")
    monkeypatch.setitem(sys.modules, f"charlstm.{module}", None)  # makes the import fail
    monkeypatch.delattr(charlstm, module, raising=False)
    result = invoke(command)
    assert result.exit_code == 1
    assert f"charlstm {command} is not implemented yet" in result.stderr
    assert "Traceback" not in result.output


def test_debug_does_not_leak_into_the_next_test():
    # --debug sets CHARLSTM_DEBUG in this process; conftest removes it after each test
    import os

    assert "CHARLSTM_DEBUG" not in os.environ

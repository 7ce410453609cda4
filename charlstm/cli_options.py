"""The command line's machinery: options generated from config.py's dataclasses (``field_options``,
``with_options``, ``given``; name, type, default and help live in the dataclasses), ``opt`` for a
command's own options, help with every default shown, and CharlstmGroup: a user's mistake and the
parser's own errors as one line on stderr, ``--debug`` anywhere. cli.py holds the commands."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
import traceback
import typing
from dataclasses import dataclass
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from .config import PRESET_HELP, PRESETS, parse_duration, parse_list, preset_changes
from .console import DEBUG_ENV, debug_enabled, note
from .errors import CharlstmError, environment_message
from .memory import out_of_memory_message

# --------------------------------------------------------------------------- errors: one line on stderr

def report_error(err: BaseException, code: int) -> int:
    """Print one line for a user's mistake (or the traceback under --debug); return the exit code."""
    if debug_enabled():
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    else:
        note(f"error: {err}")
    return code


# --------------------------------------------------------------------------- the parser's errors

def _sentence(text: str) -> str:
    """'No such command 'x'.' -> 'no such command 'x'' (a clause after 'error: ')."""
    text = text.strip().rstrip(".")
    return text[:1].lower() + text[1:]


def parser_message(e: typer.TyperException) -> str:
    """The parser's error as one clause: "--hidden: 'abc' is not an integer"."""
    param = getattr(e, "param", None)
    if getattr(e, "possibilities", None):          # no such option, with the close ones
        return f"no such option: {e.option_name} (did you mean {', '.join(sorted(e.possibilities))}?)"
    if param is None or type(e).__name__ == "MissingParameter":
        return _sentence(e.format_message())
    name = param.opts[0] if getattr(param, "opts", None) and param.param_type_name == "option" \
        else param.human_readable_name
    errors = getattr(e.__cause__, "errors", None)   # typer converts values with pydantic
    if callable(errors) and errors():
        first = errors()[0]
        kind = first.get("type", "")
        what = _WHAT.get(kind.split("_")[0])
        if what and "input" in first:
            return f"{name}: {first['input']!r} is not {what}"
        return f"{name}: {_sentence(first.get('msg', e.message))}"
    older = _CLICK_TYPE_ERROR.match(e.message)       # typer before pydantic: click's own conversion
    if older and older.group(2) in _WHAT:
        return f"{name}: {older.group(1)} is not {_WHAT[older.group(2)]}"
    return f"{name}: {_sentence(e.message)}"


_CLICK_TYPE_ERROR = re.compile(r"('.*') is not a valid (\w+)")
_WHAT = {"int": "an integer", "integer": "an integer", "float": "a number", "bool": "true or false",
         "boolean": "true or false"}


class CharlstmGroup(TyperGroup):
    """Click group that turns CharlstmError and the parser's errors into one line on stderr.

    Living in the group (not only in ``main``) means ``CliRunner`` tests see the
    same behaviour as the console script. ``--debug`` is accepted anywhere.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if "--debug" in args:
            args = [x for x in args if x != "--debug"]
            os.environ[DEBUG_ENV] = "1"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            note("aborted")
            sys.exit(1)
        except typer.TyperException as e:        # click's UsageError and kin (exit 2)
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                if debug_enabled():
                    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
                note(f"error: {parser_message(e)}")
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)   # typer returns the status of an Exit

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CharlstmError as e:
            ctx.exit(report_error(e, e.exit_code))
        except (MemoryError, RuntimeError) as e:          # an allocation failure: one line, not a traceback
            message = out_of_memory_message(e)
            if message is None:
                raise
            ctx.exit(report_error(e if debug_enabled() else CharlstmError(message), 1))
        except OSError as e:                                # permissions, a read-only or full disk: one line
            message = environment_message(e)
            if message is None:
                raise
            ctx.exit(report_error(e if debug_enabled() else CharlstmError(message), 1))
        except KeyboardInterrupt:
            note("interrupted")
            ctx.exit(130)


# --------------------------------------------------------------------------- options from the dataclasses

def shown(value: Any) -> str | None:
    """A default as --help shows it (None: no default to show)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def help_text(text: str, default: str | None) -> str:
    """Help with its default, escaped: rich would take '[default: 256]' for markup and drop it."""
    return escape(text + (f"  [default: {default}]" if default is not None else ""))


def opt(default: Any, *decls: str, help: str, show: str | None = None, **kw) -> Any:
    """typer.Option with the default in the help (``show`` where the value alone would mislead)."""
    text = show if show is not None else (None if isinstance(default, bool) else shown(default))
    return typer.Option(default, *decls, help=help_text(help, text), show_default=False, **kw)


TEXT_PARSERS = {
    "duration": lambda text, option: parse_duration(text),
    "names": lambda text, option: parse_list(text, option, "names"),
    "ints": lambda text, option: parse_list(text, option, "ints"),
}


@dataclass(frozen=True)
class FieldOption:
    """A command-line option generated from a config dataclass field.

    Every generated option defaults to None (or off, for a switch): "not given", so
    that a preset, a resumed run or a task default can fill in what was not given.
    ``--help`` shows the field's default.
    """

    field: str                 # the dataclass field
    param: inspect.Parameter   # what typer reads: name, type, typer.Option(None, '--flag', help=...)
    text: str | None = None    # how the option's text becomes the field's value (TEXT_PARSERS)
    inverted: bool = False     # a switch that sets the field False (--no-bias)

    @property
    def flag(self) -> str:
        return self.param.default.param_decls[0].split("/")[0]

    def value(self, raw: Any) -> Any:
        """The field's value for what the command line gave."""
        if self.inverted:
            return not raw
        if self.text:
            return TEXT_PARSERS[self.text](raw, self.flag)
        return raw


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _option_type(owner: type, f: dataclasses.Field) -> type:
    """The type the option parses: the field's (int, float, str, bool, Path), str for text options."""
    if f.metadata.get("text"):
        return str
    hint = typing.get_type_hints(owner)[f.name]
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def field_option(owner: type, f: dataclasses.Field, *, help: str | None = None, show: str | None = None,
                 panel: str | None = None) -> FieldOption:
    """The option of one field: ``--hidden`` from ``hidden``, its type, its help and its default shown
    (``help``, ``show``: instead of the field's, e.g. compare-variants' per-task defaults)."""
    meta = f.metadata
    decl = meta.get("flag") or "--" + f.name.replace("_", "-")
    kind = _option_type(owner, f)
    value = _field_default(f)
    show = show or meta.get("shown") or shown(value)
    if kind is bool and "/" in decl:                 # --bf16/--no-bf16
        show = meta.get("shown") or decl.split("/")[0 if value else 1]
        annotation, initial = bool | None, None
    elif kind is bool:                               # a switch: --match-params, or --no-bias (inverted)
        show, annotation, initial = None, bool, False
    else:
        annotation, initial = kind | None, None
    option = typer.Option(initial, decl, help=help_text(help or meta.get("help", ""), show), show_default=False,
                          rich_help_panel=panel)
    name = decl.split("/")[0].lstrip("-").replace("-", "_")
    param = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
    return FieldOption(f.name, param, meta.get("text"), inverted=kind is bool and name != f.name)


def field_options(owner: type, names=None, *, panel: str | None = None, help: dict | None = None,
                  show: dict | None = None) -> list[FieldOption]:
    """Options for the fields of ``owner`` that have one (``names``: these, in this order; ``help``
    and ``show``: {field: text} where the command says more than the field's own help and default)."""
    fields = {f.name: f for f in dataclasses.fields(owner) if f.metadata.get("flag") != "" and "help" in f.metadata}
    chosen = list(fields) if names is None else list(names)
    return [field_option(owner, fields[n], help=(help or {}).get(n), show=(show or {}).get(n), panel=panel)
            for n in chosen]


def with_options(options: list[FieldOption]):
    """Decorator: the command takes its own parameters and, in its ``**options``, the generated ones."""
    def decorate(func):
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        func.__signature__ = sig.replace(parameters=[*own, *(o.param for o in options)])
        return func

    return decorate


def given(options: list[FieldOption], values: dict) -> dict:
    """{field: value} of the options the command line gave (a switch left off is not given)."""
    out = {}
    for o in options:
        raw = values.get(o.param.name)
        if raw is None or (raw is False and o.param.annotation is bool):
            continue
        out[o.field] = o.value(raw)
    return out


# --------------------------------------------------------------------------- help: presets, the data directory

def _flags(settings: dict) -> str:
    """{'hidden': 384, 'max_time': 600.0} -> '--hidden 384 --max-time 600s'."""
    parts = []
    for key, value in settings.items():
        if key == "max_time":
            value = f"{value:g}s"
        parts.append(f"--{key.replace('_', '-')} {shown(value)}")
    return " ".join(parts)


def presets_epilog() -> str:
    lines = ["Presets (--preset NAME): the options each one changes from the defaults above; options "
             "given on the command line override them."]
    lines += [f"{name} ({PRESET_HELP.get(name, '')}): {_flags(preset_changes(name))}" for name in PRESETS]
    return escape("\n\n".join(lines))


DATA_DIR_HELP = ("Where downloads and token caches are kept (shared by every working directory; "
                 "also CHARLSTM_DATA_DIR). See `charlstm cache`.")
DATA_DIR_SHOWN = "the user cache, ~/.cache/charlstm/data on Linux"


def data_dir_option() -> Any:
    return opt(None, "--data-dir", help=DATA_DIR_HELP, show=DATA_DIR_SHOWN)

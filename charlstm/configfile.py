"""Settings in TOML files: what `--config FILE` reads, `--print-config` prints and each run's config.toml holds.

A train file has the sections [model] and [train] (and may name a preset at the top); a
compare-variants file has the comparison's own settings at the top, then [model] and [train].
Keys are the config dataclasses' field names (config.json's). Files are read with the standard
library's tomllib (tomli before Python 3.11) and written here: every value is flat (a string,
number, boolean or list; None is left out). docs/training.md, "Config files".
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from pathlib import Path

from . import __version__
from .config import (
    PRESETS,
    CompareConfig,
    ModelConfig,
    TrainConfig,
    parse_duration,
    parse_list,
)
from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RUN_CONFIG = "config.toml"        # the settings file in every run directory
RUN_OMITS = ("name", "out")       # left out of it: `--config` of it starts a new run beside it

# --------------------------------------------------------------------------- what a file may hold


def _fields(owner: type, names=None) -> dict[str, dataclasses.Field]:
    """{name: field} of ``owner``'s settings that have an option (``names``: these only)."""
    fields = {f.name: f for f in dataclasses.fields(owner) if f.metadata.get("flag") != "" and "help" in f.metadata}
    return fields if names is None else {n: fields[n] for n in names}


def train_schema() -> dict[str | None, dict]:
    """{section (None: the top): {key: (owner, field)}} of a train file."""
    return {None: {}, "model": {n: (ModelConfig, f) for n, f in _fields(ModelConfig).items()},
            "train": {n: (TrainConfig, f) for n, f in _fields(TrainConfig).items()}}


def compare_schema() -> dict[str | None, dict]:
    """{section (None: the top): {key: (owner, field)}} of a compare-variants file."""
    return {None: {n: (CompareConfig, f) for n, f in _fields(CompareConfig).items()},
            "model": {n: (ModelConfig, f) for n, f in _fields(ModelConfig, CompareConfig.MODEL_OPTIONS).items()},
            "train": {n: (TrainConfig, f) for n, f in _fields(TrainConfig, CompareConfig.TRAIN_OPTIONS).items()}}


def _kind(owner: type, f: dataclasses.Field) -> str:
    """What the value must be: int, float, str, bool, path, names, ints or duration."""
    if f.metadata.get("text"):
        return f.metadata["text"]
    hint = typing.get_type_hints(owner)[f.name]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    return {int: "int", float: "float", str: "str", bool: "bool", Path: "path"}[base]


KIND_TEXT = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "path": "a path (a string)", "names": 'a list of names, e.g. ["lstm", "gru"]',
             "ints": "a list of integers, e.g. [1, 2, 3]",
             "duration": 'a number of seconds or a duration such as "10m"'}


def convert(value, kind: str, where: str):
    """The field's value for what the file holds; UsageError naming ``where`` (file and key) otherwise."""
    def bad():
        return UsageError(f"{where} must be {KIND_TEXT[kind]} (got {_show(value)})")

    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool" and isinstance(value, bool) or kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and is_num:
        if not math.isfinite(value):
            raise UsageError(f"{where} must be a finite number (got {_show(value)})")
        return float(value)
    if kind == "path" and isinstance(value, str):
        return Path(value)
    if kind == "duration" and (is_num or isinstance(value, str)):
        try:
            seconds = float(value) if is_num else parse_duration(value)
        except UsageError:
            raise bad() from None
        if not math.isfinite(seconds):
            raise bad()
        return seconds
    if kind in ("names", "ints"):
        item = str if kind == "names" else int
        if isinstance(value, str):
            return parse_list(value, where, kind)
        if isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return list(value)
    raise bad()


def _show(value) -> str:
    """A value as the file spells it, for error messages."""
    if isinstance(value, (str, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    try:
        return _toml_value(value)
    except TypeError:                           # a date or time
        return str(value)


# --------------------------------------------------------------------------- reading

def read_toml(path: Path) -> dict:
    """The table of a TOML file; UsageError (one line) for a missing, unreadable or malformed file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--config {path} does not exist")
    if not path.is_file():
        raise UsageError(f"--config {path} is not a file; give a TOML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path} is not UTF-8 text: undecodable byte at offset {e.start}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path} is not valid TOML: {e}") from None


def read_settings(path: Path, schema: dict[str | None, dict], *, top_extra: tuple[str, ...] = ()) -> dict:
    """{field: value} of a settings file, checked against ``schema`` (see train_schema); the keys of
    ``top_extra`` (e.g. preset) are returned as they are. UsageError names the file and the key."""
    table = read_toml(path)
    out: dict = {}
    for key, value in table.items():
        if key in schema and key is not None:
            if not isinstance(value, dict):
                raise UsageError(f"{path}: {key} must be a section [{key}]")
            for name, item in value.items():
                out[name] = _setting(path, schema, key, name, item)
        elif key in top_extra:
            out[key] = value
        else:
            out[key] = _setting(path, schema, None, key, value)
    return out


def _setting(path: Path, schema: dict, section: str | None, key: str, value):
    where = f"{path}: {f'[{section}] ' if section else ''}{key}"
    known = schema[section]
    if key not in known and section is None and isinstance(value, dict):
        sections = ", ".join(f"[{s}]" for s in schema if s)
        raise UsageError(f"{path}: unknown section [{key}]; the sections are {sections}")
    if key not in known:
        home = next((s for s, keys in schema.items() if s != section and key in keys), False)
        if home is not False:
            place = f"in [{home}]" if home else "at the top of the file, before any section"
            raise UsageError(f"{where}: this setting belongs {place}")
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"{where}: unknown setting{hint}; `--print-config` shows every key")
    if isinstance(value, dict):
        raise UsageError(f"{where} must be a value, not a section")
    owner, f = known[key]
    value = convert(value, _kind(owner, f), where)
    _check(owner, key, value, where)
    return value


def _check(owner: type, name: str, value, where: str) -> None:
    """The dataclass's own check of one value (the others at their defaults), blamed on the file.
    Checks of several settings together are left to the run, where all of them are known."""
    if owner is CompareConfig:
        return
    try:
        owner(**{name: value})
    except UsageError as e:
        if str(e).startswith(f"--{name.replace('_', '-')} "):
            raise UsageError(f"{where}: {e}") from None


def read_train_config(path: Path) -> tuple[str | None, dict]:
    """(preset or None, {field: value}) of a `charlstm train --config` file."""
    values = read_settings(path, train_schema(), top_extra=("preset",))
    preset = values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"{path}: preset must be one of {', '.join(PRESETS)} (got {_show(preset)})")
    return preset, values


def read_compare_config(path: Path) -> dict:
    """{field: value} of a `charlstm compare-variants --config` file."""
    return read_settings(path, compare_schema())


# --------------------------------------------------------------------------- writing

def _toml_string(s: str) -> str:
    # JSON's escapes are TOML's (\" \\ \n \t \uXXXX ...); TOML also wants DEL escaped.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, Path)):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def dumps(top: dict, sections: dict[str, dict], header: str = "") -> str:
    """A TOML text of flat values: ``top``'s keys, then each section's; None values are left out."""
    def lines(d: dict) -> list[str]:
        return [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None]

    out = [f"# {line}".rstrip() for line in header.splitlines()]
    out += lines(top)
    for name, d in sections.items():
        out += ["", f"[{name}]", *lines(d)]
    return "\n".join(out).lstrip("\n") + "\n"


def _values(cfg, names) -> dict:
    return {n: getattr(cfg, n) for n in names}


def train_toml(model_cfg: ModelConfig, train_cfg: TrainConfig, preset: str | None = None, *,
               omit: tuple[str, ...] = ()) -> str:
    """The settings of a training run as `charlstm train --config` reads them back."""
    header = (f"charlstm {__version__} train settings; run them with: charlstm train --config FILE\n"
              "Options given on the command line override this file; the file overrides the preset.")
    model = _values(model_cfg, _fields(ModelConfig))
    train = {k: v for k, v in _values(train_cfg, _fields(TrainConfig)).items() if k not in omit}
    return dumps({"preset": preset}, {"model": model, "train": train}, header)


def compare_toml(cfg: CompareConfig) -> str:
    """The settings of a comparison as `charlstm compare-variants --config` reads them back."""
    header = (f"charlstm {__version__} compare-variants settings; run them with: "
              "charlstm compare-variants --config FILE\n"
              "Options given on the command line override this file.")
    train = _values(cfg.train, CompareConfig.TRAIN_OPTIONS)
    if cfg.task == "long-gap":                  # settings the long-gap task refuses
        train = {k: v for k, v in train.items() if k not in CompareConfig.CORPUS_ONLY}
    own = _values(cfg, _fields(CompareConfig))
    return dumps(own, {"model": _values(cfg.model, CompareConfig.MODEL_OPTIONS), "train": train}, header)


def write_run_config(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     preset: str | None = None) -> Path:
    """Write ``run_dir``/config.toml: the run's settings, without its name and directory, so that
    `charlstm train --config RUN/config.toml` trains the same run again into a new directory.
    Written atomically (a temporary file renamed over it)."""
    path = Path(run_dir) / RUN_CONFIG
    tmp = path.with_name(f".{RUN_CONFIG}.tmp-{os.getpid()}")
    tmp.write_text(train_toml(model_cfg, train_cfg, preset, omit=RUN_OMITS), encoding="utf-8")
    os.replace(tmp, path)
    return path

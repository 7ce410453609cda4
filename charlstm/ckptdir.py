"""One checkpoint directory: its files (config.json, the model's weights, the optimizer's and the
trainer's state, MANIFEST.json), written into a hidden directory and renamed into place, verified
against the manifest, read back. A run's checkpoints (names, pointers, retention) are checkpoint.py's;
docs/checkpoint-format.md describes the files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch

from .config import ModelConfig, TrainConfig
from .datacache import format_bytes
from .diskfiles import fsync_dir, load_tensors, save_tensors, write_json
from .errors import CharlstmError, UsageError
from .model import build_model, convert_state_dict
from .vocab import Vocab

FORMAT_NAME = "charlstm-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
CKPT_FILES = (
    "config.json",
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "trainer_state.safetensors",
    "trainer_state.json",
)


class NoSpaceError(CharlstmError):
    """A checkpoint did not fit on its disk (the partial one is removed, the earlier ones are intact)."""


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    """Versions of the software that wrote a checkpoint (stored in config.json)."""
    from . import __version__

    return {
        "charlstm": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "safetensors": safetensors.__version__,
    }


# --------------------------------------------------------------------------- optimizer and trainer state <-> files

def optimizer_to_files(optimizer) -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into (tensors, JSON structure) with no pickle.

    Tensors are named ``state.<param index>.<key>``; the JSON holds the param
    groups and every non-tensor per-parameter value.
    """
    sd = optimizer.state_dict()
    tensors: dict = {}
    scalars: dict = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    structure = {
        "class": type(optimizer).__name__,
        "param_groups": groups,
        "state_keys": sorted({k for p in sd["state"].values() for k in p}),
        "scalars": scalars,
        "tensor_params": sorted({int(i) for i in sd["state"]}),
    }
    return tensors, structure


def optimizer_from_files(tensors: dict, structure: dict) -> dict:
    """Rebuild an optimizer ``state_dict`` from what :func:`optimizer_to_files` wrote."""
    state: dict = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, values in structure.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in structure["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _split_tensors(obj, prefix: str, tensors: dict):
    """Replace tensors inside a nested dict/list by {"__tensor__": name}; collect them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {k: _split_tensors(v, f"{prefix}.{k}" if prefix else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj, tensors: dict):
    """Inverse of :func:`_split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------- write

def checkpoint_files(*, step: int, model, optimizer, model_cfg, train_cfg, vocab, corpus_meta: dict,
                     trainer_state: dict, extra_config: dict | None = None) -> dict:
    """The contents of a checkpoint's files: {file name: JSON object, or (tensors, metadata)}.

    ``trainer_state`` is a JSON-safe dict that may hold tensors anywhere inside
    (carried hidden state, RNG states): those go to trainer_state.safetensors."""
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "vocab": vocab.to_json(),
        "corpus": corpus_meta,
        "versions": versions(),
        **(extra_config or {}),
    }
    opt_tensors, opt_structure = _optimizer_files(optimizer, model)
    state_tensors: dict = {}
    state_json = _split_tensors(trainer_state, "", state_tensors)
    return {
        "config.json": config,
        # One metadata key: the library writes them in no fixed order, and a state's files stay byte-identical.
        "model.safetensors": (dict(model.state_dict()), {"format": FORMAT_NAME}),
        "optimizer.safetensors": (opt_tensors, None),
        "optimizer.json": opt_structure,
        "trainer_state.safetensors": (state_tensors, None),
        "trainer_state.json": state_json,
    }


def _optimizer_files(optimizer, model) -> tuple[dict, dict]:
    """The optimizer's tensors and structure (empty without an optimizer), with the names of the
    parameters it trains."""
    if optimizer is not None:
        tensors, structure = optimizer_to_files(optimizer)
    else:
        tensors, structure = {}, {"class": None, "param_groups": [], "scalars": {}}
    structure["param_names"] = [n for n, p in model.named_parameters() if p.requires_grad]
    return tensors, structure


def write_checkpoint_dir(run_dir: Path, name: str, files: dict) -> None:
    """Write the files into a hidden directory, MANIFEST.json last, fsync, rename it to ``name``.
    NoSpaceError when the disk is full, with the space it needed; nothing is left behind on failure."""
    tmp = run_dir / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.mkdir()
        for fname, content in files.items():
            if fname.endswith(".safetensors"):
                save_tensors(tmp / fname, *content)
            else:
                write_json(tmp / fname, content)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in CKPT_FILES},
        }
        write_json(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        os.rename(tmp, run_dir / name)
        fsync_dir(run_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise NoSpaceError(f"no space left in {run_dir} for checkpoint {name}: it needs about "
                               f"{format_bytes(_checkpoint_bytes(files))}, {format_bytes(free_bytes(run_dir))} "
                               "are free (the partial checkpoint was removed, the earlier ones are intact)") from None
        raise


def _checkpoint_bytes(files: dict) -> int:
    """About the size of a checkpoint on disk: the tensors' bytes and the JSON files."""
    total = 0
    for fname, content in files.items():
        if fname.endswith(".safetensors"):
            total += 1024 + sum(t.numel() * t.element_size() + 100 for t in content[0].values())
        else:
            total += len(json.dumps(content, indent=1, default=str)) + 1
    return total


# --------------------------------------------------------------------------- verify and load

@dataclass
class Checkpoint:
    """A loaded checkpoint: configs, vocabulary, corpus description, the model (eval mode) and state."""

    path: Path
    model_cfg: object
    train_cfg: object
    vocab: object
    corpus_meta: dict
    model: object
    trainer_state: dict
    metrics: dict
    config: dict = field(default_factory=dict)   # the whole config.json
    step: int = 0

    @property
    def versions(self) -> dict:
        return self.config.get("versions", {})


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` looks like a checkpoint directory (it holds a config.json; verified on loading)."""
    return path.is_dir() and (path / "config.json").is_file()


def _read_json(path: Path, ckpt: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CharlstmError(f"checkpoint {ckpt} is incomplete: {path.name} is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CharlstmError(f"checkpoint {ckpt} is damaged: {path.name} is not readable JSON") from e


def verify_checkpoint(path: Path) -> dict:
    """Check that ``path`` is a complete, undamaged charlstm checkpoint of a supported version.

    Returns its config.json. CharlstmError says what is wrong: foreign, newer
    format, missing or truncated or altered files.
    """
    path = Path(path)
    config = _read_config(path)
    _check_files(path)
    return config


def _read_config(path: Path) -> dict:
    """config.json of a charlstm checkpoint of a format version this charlstm reads."""
    if not path.is_dir():
        raise CharlstmError(f"{path} is not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise CharlstmError(f"{path} is not a charlstm checkpoint (no config.json); "
                            "give a run or ckpt-* directory written by `charlstm train`")
    config = _read_json(path / "config.json", path)
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CharlstmError(f"{path} is not a charlstm checkpoint "
                            f"(its config.json has no \"format\": \"{FORMAT_NAME}\")")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CharlstmError(
            f"{path} has checkpoint format version {version!r}; "
            f"this charlstm reads up to {FORMAT_VERSION}: upgrade charlstm"
        )
    return config


def _check_files(path: Path) -> None:
    """Every file MANIFEST.json lists is there with its size and sha256, and it lists them all."""
    manifest = _read_json(path / MANIFEST, path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CharlstmError(f"checkpoint {path} is damaged: {MANIFEST} lists no files")
    for name, entry in files.items():
        f = path / name
        try:
            size, digest = f.stat().st_size, _sha256(f)
        except OSError as e:
            if f.exists() or not isinstance(e, FileNotFoundError):
                raise CharlstmError(f"cannot read {f}: {e.strerror or e}") from e
            raise CharlstmError(f"checkpoint {path} is incomplete: {name} is missing") from None
        if size != entry.get("bytes"):
            raise CharlstmError(f"checkpoint {path} is damaged: {name} has {size} bytes, "
                                f"{entry.get('bytes')} expected (truncated?)")
        if digest != entry.get("sha256"):
            raise CharlstmError(f"checkpoint {path} is damaged: {name} does not match its sha256 in {MANIFEST} "
                                "(changed or corrupted)")
    for name in CKPT_FILES:
        if name not in files:
            raise CharlstmError(f"checkpoint {path} is damaged: {MANIFEST} does not list {name}")


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint (JSON with its tensors put back in place, on CPU)."""
    path = Path(path)
    tensors, _ = load_tensors(path / "trainer_state.safetensors")
    state = _read_json(path / "trainer_state.json", path)
    try:
        return _join_tensors(state, tensors)
    except KeyError as e:
        raise CharlstmError(f"checkpoint {path} is damaged: trainer state refers to a missing tensor {e}") from e


def load_optimizer_state(path: Path, optimizer) -> None:
    """Load a checkpoint's optimizer state into ``optimizer`` (same parameters, same order)."""
    path = Path(path)
    tensors, _ = load_tensors(path / "optimizer.safetensors")
    structure = _read_json(path / "optimizer.json", path)
    if structure.get("class") != type(optimizer).__name__:
        raise CharlstmError(
            f"checkpoint {path} holds {structure.get('class')} state, not {type(optimizer).__name__}; "
            "use --init-from for a fresh optimizer"
        )
    try:
        optimizer.load_state_dict(optimizer_from_files(tensors, structure))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CharlstmError(f"checkpoint {path}: its optimizer state does not fit this model ({e})") from e


def load_checkpoint_dir(path: Path, map_location="cpu", backend: str | None = None) -> Checkpoint:
    """Verify and load the checkpoint directory ``path``: its configs, the model (weights loaded
    strictly, in eval mode, on ``map_location``; rebuilt on ``backend`` with converted weights when
    that differs) and its trainer state. CharlstmError for a damaged, foreign or incompatible one."""
    config = verify_checkpoint(path)
    model_cfg, train_cfg, vocab = _read_configs(path, config)
    model, model_cfg = _load_model(path, model_cfg, backend)
    model.to(map_location)
    model.eval()
    trainer_state = load_trainer_state(path)
    metrics = trainer_state.get("metrics", {}) if isinstance(trainer_state, dict) else {}
    return Checkpoint(
        path=path,
        model_cfg=model_cfg,
        train_cfg=train_cfg,
        vocab=vocab,
        corpus_meta=config.get("corpus", {}),
        model=model,
        trainer_state=trainer_state,
        metrics=metrics,
        config=config,
        step=int(config.get("step", 0)),
    )


def _read_configs(path: Path, config: dict) -> tuple[ModelConfig, TrainConfig, Vocab]:
    """The model and training configs and the vocabulary of config.json, consistent with each other."""
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
        train_cfg = TrainConfig.from_dict(config["train"])
        vocab = Vocab.from_json(config["vocab"])
    except (KeyError, TypeError, ValueError, UsageError) as e:
        raise CharlstmError(f"checkpoint {path} is incompatible with this charlstm: "
                            f"its config.json does not parse ({e})") from e
    if len(vocab) != model_cfg.vocab_size:
        raise CharlstmError(
            f"checkpoint {path} is inconsistent: {len(vocab)} characters in its vocabulary, "
            f"model built for {model_cfg.vocab_size}"
        )
    return model_cfg, train_cfg, vocab


def _load_model(path: Path, model_cfg: ModelConfig, backend: str | None) -> tuple:
    """The model ``model_cfg`` describes (on ``backend`` if given) with the checkpoint's weights, and
    its config."""
    weights, _ = load_tensors(path / "model.safetensors")
    if backend is not None and backend != model_cfg.backend:
        weights = convert_state_dict(weights, model_cfg, backend)
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "backend": backend})
    try:
        model = build_model(model_cfg)
    except CharlstmError as e:
        raise CharlstmError(f"checkpoint {path} cannot be rebuilt by this charlstm: {e}") from e
    _check_weights(path, model.state_dict(), weights, model_cfg)
    model.load_state_dict(weights, strict=True)
    return model, model_cfg


def _check_weights(path: Path, expected: dict, weights: dict, model_cfg: ModelConfig) -> None:
    """The checkpoint's weights have the names and shapes of the model's."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CharlstmError(
            f"checkpoint {path} is incompatible: its weights do not match the {model_cfg.variant} model "
            "its config describes"
            f" (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, t in weights.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CharlstmError(
                f"checkpoint {path} is incompatible: {name} has shape {tuple(t.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )

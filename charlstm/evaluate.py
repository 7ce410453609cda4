"""`charlstm eval`: the loss of a checkpoint, in nats and bits per character, on a split of its
corpus or on a UTF-8 file; characters outside its vocabulary are left out and counted (docs/sampling.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import DynamicConfig
from .console import note
from .corpus import encode_text, load_corpus
from .dynamic import dynamic_evaluate, gradient_rms
from .errors import CharlstmError, UsageError
from .evaluation import evaluate_loss
from .runtime import resolve_device, torch_threads

LN2 = math.log(2.0)
SPLITS = ("train", "val", "test")


def read_text_file(path: Path) -> str:
    """The text of a UTF-8 file; CharlstmError naming the byte offset of undecodable bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CharlstmError(f"--text-file {path} does not exist") from None
    except IsADirectoryError:
        raise CharlstmError(f"--text-file {path} is a directory; give one text file") from None
    except OSError as e:
        raise CharlstmError(f"cannot read --text-file {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CharlstmError(f"--text-file {path} is not UTF-8 text: undecodable byte at offset {e.start}") from None


def split_tokens(ckpt, split: str, *, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The token ids (N,) of one split of the checkpoint's corpus, in the checkpoint's vocabulary,
    cut as the trainer cut them; and notes (corpus sha256, whether it changed, unknown characters)."""
    train_cfg = ckpt.train_cfg
    corpus = load_corpus(train_cfg.data, invalid_utf8=train_cfg.invalid_utf8, progress=progress)
    stored_sha = (ckpt.corpus_meta or {}).get("sha256")
    changed = stored_sha is not None and stored_sha != corpus.sha256
    if changed:
        note(f"warning: the corpus {train_cfg.data} has changed since {ckpt.path} was trained "
             f"(sha256 {corpus.sha256[:12]}..., trained on {str(stored_sha)[:12]}...); "
             "the figure is for the text as it is now")
    tokens = corpus.split(train_cfg.val_frac, train_cfg.test_frac)[split]
    tokens, n_unknown, unknown = _reencode(tokens, corpus.vocab, ckpt.vocab)
    if tokens.numel() < 2:
        fix = {"test": "the run was trained without a test split (--test-frac 0)",
               "val": "the run was trained without a validation split (--val-frac 0)",
               "train": "the training split is empty"}[split]
        raise CharlstmError(f"the {split} split of {train_cfg.data} has {tokens.numel()} character(s): {fix}; "
                            "choose another --split or give --text-file")
    return tokens, {"corpus_sha256": corpus.sha256, "corpus_changed": changed,
                    "unknown_chars": n_unknown, "unknown": unknown}


def _reencode(tokens: torch.Tensor, corpus_vocab, model_vocab) -> tuple[torch.Tensor, int, list[str]]:
    """Tokens (N,) of the corpus's vocabulary in the model's ids, characters the model lacks left out;
    with how many were left out and which (a run started --init-from another model, or a changed corpus)."""
    if corpus_vocab == model_vocab:
        return tokens, 0, []
    table = torch.tensor([model_vocab.stoi.get(c, -1) for c in corpus_vocab.chars], dtype=torch.long)
    ids = table[tokens.long()]
    known = ids >= 0
    n_unknown = int((~known).sum())
    unknown = [corpus_vocab.chars[i] for i in torch.unique(tokens.long()[~known]).tolist()] if n_unknown else []
    return ids[known], n_unknown, unknown


def file_tokens(ckpt, path: Path) -> tuple[torch.Tensor, dict]:
    """The token ids (N,) of a text file in the checkpoint's vocabulary, unknown characters left out."""
    text = read_text_file(path)
    ids = encode_text(text, ckpt.vocab, "skip")
    n_unknown = len(text) - ids.numel()
    if ids.numel() < 2:
        raise CharlstmError(f"--text-file {path} has {ids.numel()} character(s) of the model's vocabulary; "
                            "evaluation needs at least 2")
    return ids, {"unknown_chars": n_unknown, "unknown": ckpt.vocab.unknown(text) if n_unknown else []}


def evaluate_checkpoint(ckpt, *, split: str = "val", text_file: Path | None = None, batch_size: int | None = None,
                        device=None, progress: bool = True, dynamic: DynamicConfig | None = None) -> dict:
    """The loss of a loaded checkpoint on a split of its corpus or on a text file, as a JSON-safe dict:
    loss_nats, bpc, chars (characters scored), and where the text came from; with ``dynamic``, also
    the dynamic evaluation's figure under "dynamic" (the static one stays beside it)."""
    check_split(split)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")
    if text_file is not None:
        tokens, notes = file_tokens(ckpt, Path(text_file))
    else:
        tokens, notes = split_tokens(ckpt, split, progress=progress)
    device = device if device is not None else ckpt.model.head.weight.device
    B = batch_size or ckpt.train_cfg.batch_size
    T = ckpt.train_cfg.seq_len
    ckpt.model.to(device)
    loss, count = evaluate_loss(ckpt.model, tokens, batch_size=B, seq_len=T, device=device)
    result = {
        "loss_nats": loss,
        "bpc": loss / LN2,
        "chars": count,
        "split": None if text_file is not None else split,
        "text_file": None if text_file is None else str(text_file),
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "batch_size": B,
        "seq_len": T,
        "device": str(device),
        **notes,
    }
    if text_file is None and split == "val":
        stored = (ckpt.trainer_state or {}).get("val_loss")
        result["trainer_val_loss"] = stored if isinstance(stored, (int, float)) else None
    if dynamic is not None:
        result["dynamic"] = evaluate_dynamic(ckpt, tokens, dynamic, batch_size=B, device=device, progress=progress)
    return result


def evaluate_dynamic(ckpt, tokens: torch.Tensor, cfg: DynamicConfig, *, batch_size: int, device,
                     progress: bool = True) -> dict:
    """Dynamic evaluation of a checkpoint on tokens (the same streams as the static figure): its loss
    and settings. The rms rule's statistics come from the checkpoint's training split, never from the
    text being scored. The model (in memory and on disk) is not changed."""
    grad_rms = None
    if cfg.rule == "rms" and cfg.lr > 0:
        train_tokens, _ = split_tokens(ckpt, "train", progress=progress)
        grad_rms = gradient_rms(ckpt.model, train_tokens, seq_len=cfg.segment, device=device,
                                max_segments=cfg.stat_segments or None)
    loss, count = dynamic_evaluate(ckpt.model, tokens, batch_size=batch_size, seq_len=cfg.segment, lr=cfg.lr,
                                   decay=cfg.decay, rule=cfg.rule if grad_rms is not None else "sgd",
                                   epsilon=cfg.epsilon, grad_rms=grad_rms, device=device)
    return {"loss_nats": loss, "bpc": loss / LN2, "chars": count, **cfg.to_dict()}


def check_split(split: str) -> None:
    """UsageError unless ``split`` is one of SPLITS."""
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")


def evaluate_run(run: Path | None, *, split: str = "val", text_file: Path | None = None, batch_size: int | None = None,
                 device: str = "auto", checkpoints: Path = Path("checkpoints"),
                 dynamic: DynamicConfig | None = None) -> dict:
    """Load the checkpoint RUN names (the most recent run under ``checkpoints`` when None) and evaluate it:
    the dict of :func:`evaluate_checkpoint`."""
    check_split(split)
    dev = resolve_device(device)
    path = resolve_checkpoint(run, checkpoints)
    if run is None:
        note(f"evaluating {path} (the most recent run under {checkpoints}/)")
    ckpt = load_checkpoint(path, map_location=dev)
    return evaluate_checkpoint(ckpt, split=split, text_file=text_file, batch_size=batch_size, device=dev,
                               dynamic=dynamic)


def format_result(result: dict) -> str:
    """The result as `charlstm eval` prints it: the loss, then the characters left out, if any."""
    where = f"--text-file {result['text_file']}" if result["text_file"] is not None else f"its {result['split']} split"
    lines = [f"{result['checkpoint']} on {where}: {result['loss_nats']:.4f} nats/char, {result['bpc']:.4f} bpc "
             f"over {result['chars']:,} characters"]
    dyn = result.get("dynamic")
    if dyn is not None:
        lines.append(f"dynamic evaluation ({dyn['rule']}, segments of {dyn['segment']}, lr {dyn['lr']:g}, "
                     f"decay {dyn['decay']:g}): {dyn['loss_nats']:.4f} nats/char, {dyn['bpc']:.4f} bpc "
                     f"({dyn['loss_nats'] - result['loss_nats']:+.4f} nats/char against the static figure above)")
    if result["unknown_chars"]:
        shown = ", ".join(f"{c!r}" for c in result["unknown"][:20])
        more = f" and {len(result['unknown']) - 20} more" if len(result["unknown"]) > 20 else ""
        lines.append(f"{result['unknown_chars']:,} character(s) outside the model's vocabulary were left out "
                     f"({len(result['unknown'])} distinct: {shown}{more})")
    return "\n".join(lines)


def run_from_cli(*, run: Path | None, split: str, text_file: Path | None, batch_size: int | None, device: str,
                 json_out: bool, threads: int | None = None, checkpoints: Path = Path("checkpoints"),
                 dynamic: DynamicConfig | None = None) -> dict:
    """`charlstm eval`: print the loss of the checkpoint RUN names (one JSON object with --json); with
    ``dynamic``, the dynamic evaluation's figure beside it."""
    with torch_threads(threads):
        result = evaluate_run(run, split=split, text_file=text_file, batch_size=batch_size, device=device,
                              checkpoints=checkpoints, dynamic=dynamic)
    print(json.dumps(result) if json_out else format_result(result))
    return result

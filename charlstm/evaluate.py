"""`charlstm eval`: the loss of a checkpoint, in nats per character and bits per character.

The text is a split of the checkpoint's own corpus (validation by default,
cut exactly as the trainer cut it) or any UTF-8 file. The figure comes from
:func:`charlstm.evaluation.evaluate_loss`, the routine the trainer evaluates with,
with the run's batch size and window length, so ``eval`` on the validation
split repeats the trainer's validation loss for that checkpoint.
Characters outside the model's vocabulary cannot be scored: they are left out
of the text, counted and listed, never a crash.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .errors import CharlstmError, UsageError
from .evaluation import evaluate_loss
from .runtime import resolve_device, torch_threads

LN2 = math.log(2.0)
SPLITS = ("train", "val", "test")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
    from .corpus import load_corpus

    train_cfg = ckpt.train_cfg
    corpus = load_corpus(train_cfg.data, invalid_utf8=train_cfg.invalid_utf8, progress=progress)
    stored_sha = (ckpt.corpus_meta or {}).get("sha256")
    changed = stored_sha is not None and stored_sha != corpus.sha256
    if changed:
        _warn(f"the corpus {train_cfg.data} has changed since {ckpt.path} was trained "
              f"(sha256 {corpus.sha256[:12]}..., trained on {str(stored_sha)[:12]}...); "
              "the figure is for the text as it is now")
    tokens = corpus.split(train_cfg.val_frac, train_cfg.test_frac)[split]
    unknown: list[str] = []
    n_unknown = 0
    if corpus.vocab != ckpt.vocab:
        # A run started --init-from another model, or a changed corpus: re-encode in the model's ids.
        table = torch.tensor([ckpt.vocab.stoi.get(c, -1) for c in corpus.vocab.chars], dtype=torch.long)
        ids = table[tokens.long()]
        known = ids >= 0
        n_unknown = int((~known).sum())
        if n_unknown:
            seen = torch.unique(tokens.long()[~known]).tolist()
            unknown = [corpus.vocab.chars[i] for i in seen]
        tokens = ids[known]
    if tokens.numel() < 2:
        fix = {"test": "the run was trained without a test split (--test-frac 0)",
               "val": "the run was trained without a validation split (--val-frac 0)",
               "train": "the training split is empty"}[split]
        raise CharlstmError(f"the {split} split of {train_cfg.data} has {tokens.numel()} character(s): {fix}; "
                            "choose another --split or give --text-file")
    return tokens, {"corpus_sha256": corpus.sha256, "corpus_changed": changed,
                    "unknown_chars": n_unknown, "unknown": unknown}


def file_tokens(ckpt, path: Path) -> tuple[torch.Tensor, dict]:
    """The token ids (N,) of a text file in the checkpoint's vocabulary, unknown characters left out."""
    from .corpus import encode_text

    text = read_text_file(path)
    ids = encode_text(text, ckpt.vocab, "skip")
    n_unknown = len(text) - ids.numel()
    if ids.numel() < 2:
        raise CharlstmError(f"--text-file {path} has {ids.numel()} character(s) of the model's vocabulary; "
                            "evaluation needs at least 2")
    return ids, {"unknown_chars": n_unknown, "unknown": ckpt.vocab.unknown(text) if n_unknown else []}


def evaluate_checkpoint(ckpt, *, split: str = "val", text_file: Path | None = None, batch_size: int | None = None,
                        device=None, progress: bool = True) -> dict:
    """The loss of a loaded checkpoint on a split of its corpus or on a text file, as a JSON-safe dict:
    loss_nats, bpc, chars (characters scored), and where the text came from."""

    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
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
    return result


def run_from_cli(*, run: Path | None, split: str, text_file: Path | None, batch_size: int | None, device: str,
                 json_out: bool, threads: int | None = None, checkpoints: Path = Path("checkpoints")) -> dict:
    """`charlstm eval`: print the loss of the checkpoint RUN names (one JSON object with --json)."""
    with torch_threads(threads):
        return _eval_command(run=run, split=split, text_file=text_file, batch_size=batch_size, device=device,
                             json_out=json_out, checkpoints=checkpoints)


def _eval_command(*, run, split, text_file, batch_size, device, json_out, checkpoints) -> dict:
    from .checkpoint import load_checkpoint, resolve_checkpoint

    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    dev = resolve_device(device)
    path = resolve_checkpoint(run, checkpoints)
    if run is None:
        print(f"evaluating {path} (the most recent run under {checkpoints}/)", file=sys.stderr, flush=True)
    ckpt = load_checkpoint(path, map_location=dev)
    result = evaluate_checkpoint(ckpt, split=split, text_file=text_file, batch_size=batch_size, device=dev)
    if json_out:
        print(json.dumps(result))
        return result
    where = f"--text-file {text_file}" if text_file is not None else f"its {split} split"
    print(f"{ckpt.path} on {where}: {result['loss_nats']:.4f} nats/char, {result['bpc']:.4f} bpc "
          f"over {result['chars']:,} characters")
    if result["unknown_chars"]:
        shown = ", ".join(f"{c!r}" for c in result["unknown"][:20])
        more = f" and {len(result['unknown']) - 20} more" if len(result["unknown"]) > 20 else ""
        print(f"{result['unknown_chars']:,} character(s) outside the model's vocabulary were left out "
              f"({len(result['unknown'])} distinct: {shown}{more})")
    return result

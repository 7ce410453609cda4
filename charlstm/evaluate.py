"""`charlstm eval`: the loss of a checkpoint, in nats and bits per character, on a split of its
corpus or on a UTF-8 file; characters outside its vocabulary are left out and counted (docs/sampling.md).

A text file is read and encoded in bounded chunks into a temporary ids file that is memory-mapped,
so that any size is scored in constant memory with the figure of the whole text in memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from . import datacache
from .checkpoint import load_checkpoint
from .config import DynamicConfig
from .console import note
from .corpus import load_corpus, locate_data
from .dynamic import dynamic_evaluate, gradient_rms
from .errors import CharlstmError, UsageError
from .evaluation import eval_slice, evaluate_loss
from .runtime import resolve_device, torch_threads
from .textfiles import check_regular, iter_text, read_text
from .tokencache import map_tokens, tensor_bytes
from .vocab import encode_text

LN2 = math.log(2.0)
SPLITS = ("train", "val", "test")


def read_text_file(path: Path) -> str:
    """The text of a regular UTF-8 file; CharlstmError naming the byte offset of undecodable bytes."""
    return read_text(Path(path), "--text-file")


def split_tokens(ckpt, split: str, *, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The token ids (N,) of one split of the checkpoint's corpus, in the checkpoint's vocabulary,
    cut as the trainer cut them; and notes (corpus sha256, whether it changed, unknown characters).
    The corpus is found from any working directory (``corpus.locate_data``)."""
    train_cfg = ckpt.train_cfg
    corpus = load_corpus(locate_data(train_cfg.data, ckpt.corpus_meta), invalid_utf8=train_cfg.invalid_utf8,
                         progress=progress)
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


def _ids_file() -> tuple[object, Path | None]:
    """A new temporary file for a text's ids: in the data cache, else in the temporary directory,
    else in memory (path None)."""
    for folder in (datacache.data_dir() / datacache.TOKENS, Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="eval-", suffix=f".tmp-{os.getpid()}", dir=folder)
        except OSError:
            continue
        return os.fdopen(fd, "wb"), Path(name)
    return io.BytesIO(), None


def _first_known(text: str, vocab, wanted: int) -> str:
    """The shortest prefix of ``text`` holding ``wanted`` characters of the vocabulary (or all of it)."""
    cut = wanted
    while cut < len(text):
        have = encode_text(text[:cut], vocab, "skip").numel()
        if have >= wanted:
            break
        cut += wanted - have
    return text[:cut]


def file_tokens(ckpt, path: Path, *, limit: int = 0) -> tuple[torch.Tensor, dict]:
    """The token ids (N,) of a text file in the checkpoint's vocabulary, unknown characters left out;
    only its first ``limit`` + 1 where ``limit`` > 0 (the first ``limit`` characters scored).

    Read and encoded chunk by chunk into a temporary ids file that is memory-mapped and removed at
    once (the mapping outlives the name), so memory does not grow with the file."""
    vocab = ckpt.vocab
    out, ids_path = _ids_file()
    n, n_unknown, unknown = 0, 0, set()
    try:
        with out:
            for text in iter_text(Path(path), "--text-file"):
                if limit:
                    text = _first_known(text, vocab, limit + 1 - n)
                ids = encode_text(text, vocab, "skip")                    # (n,) int64
                if ids.numel() < len(text):
                    n_unknown += len(text) - ids.numel()
                    unknown.update(vocab.unknown(text))
                try:
                    out.write(tensor_bytes(ids.to(vocab.dtype)))
                except OSError as e:
                    raise CharlstmError(f"cannot write the encoded --text-file to {ids_path}: "
                                        f"{e.strerror or e}") from e
                n += ids.numel()
                if limit and n >= limit + 1:
                    break
            if n < 2:
                raise CharlstmError(f"--text-file {path} has {n} character(s) of the model's vocabulary; "
                                    "evaluation needs at least 2")
            data = out.getvalue() if ids_path is None else None
        tokens = (map_tokens(ids_path, n, vocab.dtype) if ids_path is not None
                  else torch.frombuffer(bytearray(data), dtype=vocab.dtype))
    finally:
        if ids_path is not None:
            with contextlib.suppress(OSError):   # where a mapped file cannot be removed, `charlstm cache` will
                ids_path.unlink()
    return tokens, {"unknown_chars": n_unknown, "unknown": sorted(unknown, key=ord)}


def evaluate_checkpoint(ckpt, *, split: str = "val", text_file: Path | None = None, batch_size: int | None = None,
                        device=None, progress: bool = True, dynamic: DynamicConfig | None = None,
                        eval_chars: int = 0) -> dict:
    """The loss of a loaded checkpoint on a split of its corpus or on a text file, as a JSON-safe dict:
    loss_nats, bpc, chars (characters scored), and where the text came from; with ``dynamic``, also
    the dynamic evaluation's figure under "dynamic" (the static one stays beside it). ``eval_chars``
    > 0 scores only the first that many characters of the split or file (``evaluation.eval_slice``)."""
    check_split(split)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")
    if eval_chars < 0:
        raise UsageError(f"--eval-chars must be >= 0 (got {eval_chars}; 0 scores the whole text)")
    if text_file is not None:
        tokens, notes = file_tokens(ckpt, Path(text_file), limit=eval_chars)
    else:
        tokens, notes = split_tokens(ckpt, split, progress=progress)
        tokens = eval_slice(tokens, eval_chars)
    device = device if device is not None else ckpt.model.head.weight.device
    B = batch_size or ckpt.train_cfg.batch_size
    T = ckpt.train_cfg.seq_len
    ckpt.model.to(device)
    loss, count = evaluate_loss(ckpt.model, tokens, batch_size=B, seq_len=T, device=device, progress=progress)
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
        "eval_chars": eval_chars,
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
                 dynamic: DynamicConfig | None = None, eval_chars: int = 0) -> dict:
    """Load the checkpoint RUN names (the most recent run under ``checkpoints`` when None) and evaluate it:
    the dict of :func:`evaluate_checkpoint`."""
    check_split(split)
    dev = resolve_device(device)
    if text_file is not None:
        check_regular(Path(text_file), "--text-file")     # before the checkpoint: a FIFO is refused at once
    ckpt = load_checkpoint(run, map_location=dev, root=checkpoints)   # resolved again if retention removes it
    if run is None:
        note(f"evaluating {ckpt.path} (the most recent run under {checkpoints}/)")
    return evaluate_checkpoint(ckpt, split=split, text_file=text_file, batch_size=batch_size, device=dev,
                               dynamic=dynamic, eval_chars=eval_chars)


def format_result(result: dict) -> str:
    """The result as `charlstm eval` prints it: the loss, then the characters left out, if any."""
    where = f"--text-file {result['text_file']}" if result["text_file"] is not None else f"its {result['split']} split"
    if result.get("eval_chars") and result["chars"] == result["eval_chars"]:
        where = f"the first {result['eval_chars']:,} characters of {where} (--eval-chars)"
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
                 dynamic: DynamicConfig | None = None, eval_chars: int = 0) -> dict:
    """`charlstm eval`: print the loss of the checkpoint RUN names (one JSON object with --json); with
    ``dynamic``, the dynamic evaluation's figure beside it."""
    with torch_threads(threads):
        result = evaluate_run(run, split=split, text_file=text_file, batch_size=batch_size, device=device,
                              checkpoints=checkpoints, dynamic=dynamic, eval_chars=eval_chars)
    print(json.dumps(result) if json_out else format_result(result))
    return result

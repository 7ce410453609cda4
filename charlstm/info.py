"""`charlstm info`: what a checkpoint is (model, vocabulary, corpus, training, options, versions), as a
table or one JSON object (docs/sampling.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .checkpoint import list_checkpoints, load_checkpoint, read_pointer
from .console import note
from .model import describe_backend

LN2 = math.log(2.0)


def _bpc(loss):
    return None if not isinstance(loss, (int, float)) else loss / LN2


def _model_section(ckpt) -> dict:
    mc = ckpt.model_cfg
    model = {
        "variant": mc.variant,
        "backend": mc.backend,
        "runs": describe_backend(ckpt.model),      # what runs its layers here (the fast path, or why not)
        "layers": mc.layers,
        "hidden": mc.hidden,
        "embed": mc.embed,
        "vocab_size": mc.vocab_size,
        "dropout": mc.dropout,
        "bias": mc.bias,
        "init": mc.init,
        "parameters": ckpt.model.num_parameters(),
    }
    if mc.variant == "peephole":
        model.update(peephole_form=mc.peephole_form, peepholes=mc.peepholes)
    if mc.variant == "gru":
        model["gru_form"] = mc.gru_form
    if mc.variant in ("lstm", "peephole", "coupled") and mc.init != "chrono":
        model["forget_bias"] = mc.forget_bias
    if mc.init == "chrono":
        model["chrono_tmax"] = mc.chrono_tmax
    return model


def _training_section(ckpt) -> dict:
    ts = ckpt.trainer_state if isinstance(ckpt.trainer_state, dict) else {}
    metrics = ckpt.metrics if isinstance(ckpt.metrics, dict) else {}
    best_val = ts.get("best_val_loss", metrics.get("best_val_loss"))
    val = ts.get("val_loss", metrics.get("val_loss"))
    return {
        "steps": ckpt.step,
        "epochs": ts.get("epochs_done", metrics.get("epochs")),
        "train_time": ts.get("train_time", metrics.get("train_time")),
        "chars_seen": ts.get("chars_seen"),
        "chars_per_sec": metrics.get("chars_per_sec"),
        "train_loss": metrics.get("train_loss"),
        "val_loss": val,
        "val_bpc": _bpc(val),
        "best_val_loss": best_val,
        "best_val_bpc": _bpc(best_val),
        "best_step": ts.get("best_step", metrics.get("best_step")),
    }


def describe_checkpoint(ckpt) -> dict:
    """Everything `charlstm info` reports about a loaded checkpoint, JSON-safe."""
    run_dir = ckpt.path.parent
    best, latest = read_pointer(run_dir, "best"), read_pointer(run_dir, "latest")
    return {
        "checkpoint": str(ckpt.path),
        "run_dir": str(run_dir),
        "step": ckpt.step,
        "created": ckpt.config.get("created"),
        "model": _model_section(ckpt),
        "vocab": {"size": len(ckpt.vocab), "chars": "".join(ckpt.vocab.chars)},
        "corpus": dict(ckpt.corpus_meta or {}),
        "training": _training_section(ckpt),
        "train_options": ckpt.train_cfg.to_dict(),
        "preset": ckpt.config.get("preset"),
        "init_from": ckpt.config.get("init_from"),
        "run_checkpoints": [p.name for _, p in list_checkpoints(run_dir)],
        "best": None if best is None else best.name,
        "latest": None if latest is None else latest.name,
        "versions": ckpt.versions,
    }


def describe_run(run: Path | None, checkpoints: Path = Path("checkpoints")) -> dict:
    """Describe the checkpoint RUN names (the most recent run under ``checkpoints`` when None)."""
    ckpt = load_checkpoint(run, map_location="cpu", root=checkpoints)   # resolved again if retention removes it
    if run is None:
        note(f"describing {ckpt.path} (the most recent run under {checkpoints}/)")
    return describe_checkpoint(ckpt)


def _fmt_loss(loss) -> str:
    return "-" if not isinstance(loss, (int, float)) else f"{loss:.4f} nats/char  ({loss / LN2:.4f} bpc)"


def _fmt_chars(chars: str, limit: int = 60) -> str:
    shown = repr(chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def _model_rows(d: dict) -> list[tuple[str, str]]:
    m, c = d["model"], d["corpus"]
    variant = m["variant"]
    if variant == "peephole":
        variant += f" ({m['peephole_form']}, gates {m['peepholes'] or 'none'})"
    elif variant == "gru":
        variant += f" ({m['gru_form']} form)"
    rows = [
        ("variant", variant),
        ("backend", m["backend"]),
        ("layers run by", m["runs"]),
        ("size", f"{m['layers']} layers x {m['hidden']} hidden, embedding {m['embed']}, "
                 f"dropout {m['dropout']:g}" + ("" if m["bias"] else ", no biases")),
        ("parameters", f"{m['parameters']:,}"),
        ("vocabulary", f"{d['vocab']['size']} characters: {_fmt_chars(d['vocab']['chars'])}"),
        ("corpus", f"{c.get('name', '?')}: {c.get('source', '?')}"),
        ("corpus sha256", str(c.get("sha256", "?"))),
    ]
    if c.get("n_chars") is not None:
        rows.append(("corpus size", f"{c['n_chars']:,} characters"))
    return rows


def _training_rows(d: dict) -> list[tuple[str, str]]:
    t, o, v = d["training"], d["train_options"], d["versions"] or {}
    epochs = t["epochs"]
    steps = f"{t['steps']:,}" + (f" ({epochs:.2f} epochs)" if isinstance(epochs, (int, float)) else "")
    rows = [("steps trained", steps)]
    if isinstance(t["train_time"], (int, float)):
        speed = f", {t['chars_per_sec']:,.0f} chars/s" if isinstance(t["chars_per_sec"], (int, float)) else ""
        rows.append(("training time", f"{t['train_time']:.0f} s{speed}"))
    rows.append(("val loss", _fmt_loss(t["val_loss"])))
    best = _fmt_loss(t["best_val_loss"])
    if t["best_step"] is not None and t["best_val_loss"] is not None:
        best += f" at step {t['best_step']:,}"
    rows.append(("best val loss", best))
    rows.append(("training", f"data {o.get('data')}, seq-len {o.get('seq_len')}, batch {o.get('batch_size')}, "
                             f"lr {o.get('lr'):g} ({o.get('schedule')}), seed {o.get('seed')}"
                             + (f", preset {d['preset']}" if d.get("preset") else "")))
    marks = [n + (" (best)" if n == d["best"] else "") + (" (latest)" if n == d["latest"] else "")
             for n in d["run_checkpoints"]]
    rows.append(("run", f"{d['run_dir']}: " + (", ".join(marks) if marks else "-")))
    rows.append(("written by", ", ".join(f"{k} {val}" for k, val in v.items() if val) + f"; {d['created'] or ''}"))
    return rows


def description_table(d: dict) -> Table:
    """The description as a two-column table."""
    table = Table(title=d["checkpoint"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in _model_rows(d) + _training_rows(d):
        table.add_row(name, value)
    return table


def run_from_cli(*, run: Path | None, json_out: bool, checkpoints: Path = Path("checkpoints")) -> dict:
    """`charlstm info`: describe the checkpoint RUN names (one JSON object with --json)."""
    d = describe_run(run, checkpoints)
    if json_out:
        print(json.dumps(d))
    else:
        Console(soft_wrap=False, highlight=False).print(description_table(d))
    return d

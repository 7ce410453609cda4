"""`charlstm visualize`: check the options, record a checkpoint over a text, write and print what was asked."""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor

from ..checkpoint import load_checkpoint
from ..console import note
from ..errors import CharlstmError, UsageError
from ..plots import PlottingUnavailable, have_matplotlib
from ..runtime import resolve_device
from ..textfiles import read_text
from ..vocab import encode_text
from .analysis import SATURATION_HIGH, SATURATION_LOW, colour_value, plot_saturation, rank_units, rgb, saturation
from .page import build_page
from .quantities import QUANTITY_HELP, quantities_for
from .recording import Recording, record

# ---------------------------------------------------------------------------- options


def parse_unit(spec: str) -> tuple[int, int]:
    """'LAYER:INDEX' (both counted from 0) -> (layer, index); UsageError otherwise."""
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        layer, index = int(parts[0]), int(parts[1])
    except ValueError:
        raise UsageError(f"--unit takes LAYER:INDEX, both counted from 0, e.g. 0:17 (got {spec!r})") from None
    if layer < 0 or index < 0:
        raise UsageError(f"--unit takes LAYER:INDEX counted from 0, not negative (got {spec!r})")
    return layer, index


def check_options(*, unknown: str, scale: str, quantity: str | None, top: int, max_chars: int, json_out: bool,
                  find_units: bool, saturation_table: bool, unit: str | None, plot, html) -> tuple[int, int] | None:
    """UsageError/CharlstmError for options wrong before any checkpoint is read; the parsed --unit, if any."""
    if unknown not in ("error", "skip"):
        raise UsageError(f"--unknown must be error or skip (got {unknown!r})")
    if scale not in ("unit", "fixed"):
        raise UsageError(f"--scale must be unit or fixed (got {scale!r})")
    if quantity is not None and quantity not in QUANTITY_HELP:
        raise UsageError(f"--quantity must be one of {', '.join(QUANTITY_HELP)} (got {quantity!r})")
    if top < 1:
        raise UsageError(f"--top must be at least 1 (got {top})")
    if max_chars < 2:
        raise UsageError(f"--max-chars must be at least 2 (got {max_chars})")
    if json_out and not (find_units or saturation_table):
        raise UsageError("--json goes with --find-units and/or --saturation (it prints their results as JSON)")
    if json_out and unit is not None:
        raise UsageError("--unit prints coloured text; it cannot be combined with --json")
    if plot is not None and not saturation_table:
        raise UsageError("--plot draws the gate saturation: add --saturation")
    layer_unit = parse_unit(unit) if unit is not None else None
    if html is not None and Path(html).is_dir():
        raise UsageError(f"--html {html} is a directory; give a file name such as {Path(html) / 'visualize.html'}")
    if html is not None and not Path(html).parent.is_dir():
        raise CharlstmError(f"--html {html}: the directory {Path(html).parent} does not exist")
    return layer_unit


def check_against_model(cfg, quantity: str | None, unit: str | None, layer_unit: tuple[int, int] | None) -> None:
    """UsageError where --quantity or --unit names something the model does not have."""
    quantities = quantities_for(cfg.variant)
    if quantity is not None and quantity not in quantities:
        raise UsageError(f"a {cfg.variant} model has no {quantity!r}; its quantities are {', '.join(quantities)}")
    if layer_unit is not None:
        layer, index = layer_unit
        width = cfg.embed if (quantity == "x_mod" and layer == 0) else cfg.hidden
        if layer >= cfg.layers or index >= width:
            raise UsageError(f"--unit {unit}: the model has layers 0..{cfg.layers - 1} and units 0..{width - 1}"
                             + (" (x_mod of layer 0 has one per embedding dimension)" if width != cfg.hidden else ""))


def read_text_arg(text: str | None, text_file: Path | None) -> str:
    """The text to visualise, from --text or --text-file (UTF-8); UsageError/CharlstmError for a user's mistake."""
    if (text is None) == (text_file is None):
        raise UsageError("give the text to visualise with exactly one of --text TEXT or --text-file FILE")
    if text_file is not None:
        text = read_text(Path(text_file), "--text-file")   # a regular UTF-8 file: one line for anything else
    if not text:
        raise CharlstmError("the text to visualise is empty")
    return text


def encode_for_model(raw: str, vocab, unknown: str, max_chars: int) -> Tensor:
    """The text's token ids (N,) in the model's vocabulary, at most max_chars of them (notes when cut)."""
    ids = encode_text(raw, vocab, unknown, hint="remove them or pass --unknown skip to drop them")
    dropped = len(raw) - ids.numel()
    if dropped:
        note(f"note: dropped {dropped} character(s) outside the model's vocabulary: "
             f"{', '.join(repr(c) for c in vocab.unknown(raw)[:20])}")
    if ids.numel() > max_chars:
        note(f"note: visualising the first {max_chars} of {ids.numel()} characters (raise --max-chars for more)")
        ids = ids[:max_chars]
    if ids.numel() < 2:
        raise CharlstmError("the text has fewer than 2 characters the model knows: nothing to predict")
    return ids


# ---------------------------------------------------------------------------- files


def free_path(directory: Path, stem: str, suffix: str) -> Path:
    """``directory/stem+suffix``, or ``stem-2``, ``stem-3``... when taken: never an existing file."""
    path = directory / f"{stem}{suffix}"
    n = 2
    while path.exists() or any(path.with_suffix(s).exists() for s in (".png", ".svg") if suffix == ""):
        path = directory / f"{stem}-{n}{suffix}"
        n += 1
    return path


def write_saturation_plot(sat: list[dict], plot: Path | None, default_dir: Path) -> list[Path]:
    """Draw the saturation plot where the user asked: ``x.png`` or ``x.svg`` writes that file only,
    a name without those suffixes writes name.png and name.svg; no name writes
    default_dir/saturation.png and .svg under a name not yet taken."""
    if plot is None:
        return plot_saturation(sat, free_path(default_dir, "saturation", ""))
    plot = Path(plot)
    if plot.suffix.lower() not in (".png", ".svg"):
        return plot_saturation(sat, plot)
    if not plot.parent.is_dir():
        raise CharlstmError(f"--plot {plot}: the directory {plot.parent} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        written = plot_saturation(sat, Path(tmp) / "saturation")
        chosen = next(p for p in written if p.suffix == plot.suffix.lower())
        shutil.move(str(chosen), str(plot))
    return [plot]


# ---------------------------------------------------------------------------- the work


@dataclass
class Visualization:
    """What `visualize` made: the recording, the unit ranking, the gate saturation and the page written."""

    rec: Recording
    ranking: list[dict]
    saturation: list[dict]  # [] for rnn
    html: Path | None


def visualize(ckpt, ids: Tensor, *, quantity: str | None = None, top: int = 5, html: Path | None = None,
              source: str = "--text") -> Visualization:
    """Record the checkpoint's model over the token ids (N,), rank its units by text feature, measure
    its gate saturation, and write the page to ``html`` when given."""
    rec = record(ckpt.model, ids, ckpt.vocab.chars, progress=True)
    ranking = rank_units(rec, top=top, quantities=(quantity,) if quantity is not None else None)
    sat = saturation(rec) if rec.variant != "rnn" else []
    if html is not None:
        meta = {"checkpoint": str(ckpt.path), "backend": ckpt.model_cfg.backend, "step": ckpt.step,
                "source": source}
        Path(html).write_text(build_page(rec, ranking, meta=meta), encoding="utf-8")
    return Visualization(rec, ranking, sat, None if html is None else Path(html))


# ---------------------------------------------------------------------------- the command


def run_from_cli(*, run, text, text_file, html, unit, quantity, scale, find_units, top, saturation_table,
                 plot, json_out, unknown, max_chars, device) -> dict:
    """`charlstm visualize`: record the model over a text and write or print what was asked."""
    layer_unit = check_options(unknown=unknown, scale=scale, quantity=quantity, top=top, max_chars=max_chars,
                               json_out=json_out, find_units=find_units, saturation_table=saturation_table,
                               unit=unit, plot=plot, html=html)
    raw = read_text_arg(text, text_file)
    ckpt = load_checkpoint(run, map_location=resolve_device(device))   # resolved again if retention removes it
    ids = encode_for_model(raw, ckpt.vocab, unknown, max_chars)
    check_against_model(ckpt.model_cfg, quantity, unit, layer_unit)
    html_path = Path(html) if html is not None else None
    if html_path is None and layer_unit is None and not find_units and not saturation_table:
        html_path = free_path(ckpt.path.parent, "visualize", ".html")
    source = str(text_file) if text_file is not None else "--text"
    vis = visualize(ckpt, ids, quantity=quantity, top=top, html=html_path, source=source)
    rec = vis.rec

    out = sys.stderr if json_out else sys.stdout
    console = Console(file=out, highlight=False, soft_wrap=True)
    for n in rec.notes:
        if not n.startswith("recorded through"):  # that one is for the page
            note(f"note: {n}")
    if vis.html is not None:
        print(f"wrote {vis.html} ({vis.html.stat().st_size / 1024:.0f} KB): open it in a browser", file=out)
    if layer_unit is not None:
        print_unit(console, rec, layer_unit, quantity, scale)
    result: dict = {"checkpoint": str(ckpt.path), "variant": rec.variant, "chars": len(rec.text),
                    "bpc": rec.bits_per_char()}
    if find_units:
        result["features"] = vis.ranking
        if not json_out:
            console.print(ranking_table(rec, vis.ranking))
    if saturation_table:
        result.update(report_saturation(console, out, vis.saturation, plot=plot, json_out=json_out,
                                        run_dir=ckpt.path.parent))
    if json_out:
        if math.isnan(result["bpc"]):
            result["bpc"] = None
        print(json.dumps(result, indent=1))
    return result


def render_terminal(rec: Recording, layer: int, unit: int, quantity: str, scale: str = "unit") -> Text:
    """The text as a rich ``Text``, each character's background coloured by the unit's value."""
    vals = colour_value(rec, layer, unit, quantity, scale).tolist()
    out = Text()
    for ch, s in zip(rec.text, vals):
        r, g, b = rgb(s)
        style = f"rgb(0,0,0) on rgb({r},{g},{b})"
        if ch == "\n":
            out.append(" ", style=style)
            out.append("\n")
        elif ch == "\t" or ch.isprintable():
            out.append(ch, style=style)
        else:
            out.append(" ", style=style)  # control characters would move the cursor
    return out


def print_unit(console: Console, rec: Recording, layer_unit: tuple[int, int], quantity: str | None,
               scale: str) -> None:
    """The text coloured by one unit, under a line saying which unit and how it is coloured."""
    q = quantity or ("c" if "c" in rec.quantities else "h")
    layer, index = layer_unit
    console.print(f"layer {layer}, unit {index}, {q}: {QUANTITY_HELP[q]} "
                  f"(blue low, white middle, red high; scale {scale})", style="bold")
    console.print(render_terminal(rec, layer, index, q, scale))


def _fmt_unit(u: dict) -> str:
    return f"{u['layer']}:{u['unit']} {u['quantity']} r={u['r']:+.2f}"


def ranking_table(rec: Recording, ranking: list[dict]) -> Table:
    """--find-units as a table: each feature and its best units."""
    table = Table(title=f"units that follow text features ({len(rec.text)} characters, Pearson r)")
    table.add_column("feature")
    table.add_column("best units (layer:unit quantity r)")
    for f in ranking:
        table.add_row(f["feature"], "constant in this text" if f["constant"]
                      else ", ".join(_fmt_unit(u) for u in f["units"]))
    return table


def saturation_table(sat: list[dict]) -> Table:
    """--saturation as a table: one row per layer and gate."""
    table = Table(title=f"gate saturation: fraction of steps x units below {SATURATION_LOW} / above {SATURATION_HIGH}")
    columns = ("layer", "gate", f"< {SATURATION_LOW}", f"> {SATURATION_HIGH}", "units mostly low", "units mostly high")
    for col in columns:
        table.add_column(col, justify="right")
    for d in sat:
        table.add_row(str(d["layer"]), d["gate"], f"{d['left']:.3f}", f"{d['right']:.3f}",
                      str(d["units_mostly_left"]), str(d["units_mostly_right"]))
    return table


def report_saturation(console: Console, out, sat: list[dict], *, plot, json_out: bool, run_dir: Path) -> dict:
    """Print the saturation table (unless --json) and draw the plot where matplotlib is present;
    the result's 'saturation' (and 'plots') entries."""
    extra: dict = {"saturation": [{k: v for k, v in d.items() if not k.startswith("per_unit")} for d in sat]}
    if not sat:
        note("note: rnn has no gates: no saturation to report")
        return extra
    if not json_out:
        console.print(saturation_table(sat))
    if have_matplotlib():
        written = write_saturation_plot(sat, plot, run_dir)
        extra["plots"] = [str(p) for p in written]
        print("wrote " + ", ".join(str(p) for p in written), file=out)
    elif plot is not None:
        raise PlottingUnavailable()
    else:
        note("note: the saturation plot needs matplotlib: pip install 'charlstm[plot]'")
    return extra

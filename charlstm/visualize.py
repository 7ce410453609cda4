"""`charlstm visualize`: what every unit and gate of a trained model does over a text.

The model reads the text once, as one stream from a zero state with the state
carried throughout, and we record for every character and layer: the hidden
state h, the cell state C (LSTM family), every gate (f, i, o for the LSTM
family; z, r for gru; none for rnn), and the model's prediction of the next
character (its probability of the actual one and its top five).

From a recording this module makes:

- a self-contained HTML page (inline script and style, data embedded as JSON,
  nothing loaded from anywhere) that colours each character by a chosen unit;
- the text coloured in the terminal with rich, for one unit;
- a ranking of units by their Pearson correlation with simple text features
  (:mod:`charlstm.features`), after Karpathy, Johnson and Fei-Fei (2015);
- gate saturation: the fraction of steps where a gate is below 0.1 or above
  0.9, the statistic of the same paper, as a table and a plot.

``torch.nn.LSTM``/``GRU``/``RNN`` do not expose their gates, so a cuDNN-backed
model is recorded through its custom twin: the same cell equations loaded with
the same weights (the tests check that the twin's h equals the module's).
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import CharlstmError, UsageError
from .features import FEATURE_HELP, pearson, text_features
from .model import LSTM_FAMILY, CharModel
from .runtime import resolve_device

QUANTITY_HELP = {
    "h": "hidden state h_t (the layer's output)",
    "c": "cell state C_t",
    "f": "forget gate f_t",
    "i": "input gate i_t",
    "o": "output gate o_t",
    "z": "update gate z_t",
    "r": "reset gate r_t",
}
GATES = {"rnn": (), "lstm": ("f", "i", "o"), "peephole": ("f", "i", "o"), "coupled": ("f", "i", "o"), "gru": ("z", "r")}
SATURATION_LOW, SATURATION_HIGH = 0.1, 0.9
DEFAULT_TOP_K = 5          # predictions shown on hover
CHUNK = 256                # characters per forward call (state carried between calls)


def quantities_for(variant: str) -> tuple[str, ...]:
    """The quantities recorded for a variant, in display order."""
    states = ("h", "c") if variant in LSTM_FAMILY else ("h",)
    return states + GATES[variant]


def quantity_notes(cfg) -> list[str]:
    """What a quantity means for this particular variant, where it is not the obvious."""
    notes = []
    if cfg.variant == "coupled":
        notes.append("coupled has no input gate of its own: its i is 1 - f, shown for comparison with the LSTM")
    if cfg.variant == "gru":
        if cfg.gru_form == "cudnn":
            notes.append("gru (cudnn form): z is the share of the old state kept, h = (1 - z) * n + z * h_prev")
        else:
            notes.append("gru (cho form): z is the share of the new candidate taken, h = (1 - z) * h_prev + z * n")
    if cfg.variant == "rnn":
        notes.append("rnn has no gates: only h is recorded")
    return notes


# ---------------------------------------------------------------------------- recording

@dataclass
class Recording:
    """Everything the model did over one text, one row per character."""

    text: str                        # the characters read (T of them)
    vocab: list[str]                 # token id -> character
    variant: str
    quantities: tuple[str, ...]      # recorded per layer, e.g. ('h', 'c', 'f', 'i', 'o')
    layers: list[dict[str, Tensor]]  # per layer: quantity -> (T, H) float32, on the CPU
    p_next: Tensor                   # (T,) probability of the actual next character; NaN at the last step
    top_ids: Tensor                  # (T, K) the K most probable next characters, best first
    top_probs: Tensor                # (T, K)
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden(self) -> int:
        return self.layers[0]["h"].shape[1]

    def bits_per_char(self) -> float:
        """Mean -log2 p(actual next character) over the text (T - 1 predictions)."""
        p = self.p_next[:-1].double()
        if p.numel() == 0:
            return float("nan")
        return float(-(p.clamp_min(1e-30).log2()).mean())

    def unit_matrix(self, quantities: tuple[str, ...] | None = None) -> tuple[Tensor, list[tuple[int, str, int]]]:
        """Every unit's trace side by side: (T, N) and the (layer, quantity, unit) of each column."""
        quantities = quantities or self.quantities
        cols, index = [], []
        for k, layer in enumerate(self.layers):
            for q in quantities:
                if q in layer:
                    cols.append(layer[q])
                    index.extend((k, q, u) for u in range(layer[q].shape[1]))
        return torch.cat(cols, dim=1), index


def gate_model(model):
    """A model whose forward exposes its gates: the model itself, or (cuDNN backend) its custom
    twin with the same weights."""
    if model.cfg.backend != "cudnn":
        return model
    twin = CharModel(dataclasses.replace(model.cfg, backend="custom"))
    twin.load_state_dict(model.state_dict())  # converts the cuDNN layout
    w = model.head.weight
    return twin.to(device=w.device, dtype=w.dtype).eval()


def record(model, ids: Tensor, vocab: list[str], *, top_k: int = DEFAULT_TOP_K, progress: bool = False) -> Recording:
    """Run ``model`` over the token ids (T,) as one stream with the state carried, and record
    h, C, every gate and the next-character predictions at every step.

    On the CPU this runs on one thread: one stream means one small matrix product
    per step, which extra threads only slow down (more than tenfold on a busy
    machine, measured)."""
    threads = torch.get_num_threads()
    on_cpu = model.head.weight.device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _record(model, ids, vocab, top_k=top_k, progress=progress)
    finally:
        if on_cpu:
            torch.set_num_threads(threads)


def _record(model, ids: Tensor, vocab: list[str], *, top_k: int, progress: bool) -> Recording:
    model.eval()
    twin = gate_model(model)
    cfg = model.cfg
    device = model.head.weight.device
    ids = ids.to(device=device, dtype=torch.long)
    T = ids.numel()
    quantities = quantities_for(cfg.variant)
    chunks = [ids[s:s + CHUNK] for s in range(0, T, CHUNK)]
    bar = None
    if progress and len(chunks) > 1:
        from tqdm import tqdm

        bar = tqdm(total=T, desc="recording", unit="char", file=sys.stderr, leave=False)
    own_state = gate_state = None
    logits_all, twin_logits_all, per_layer = [], [], [[] for _ in range(cfg.layers)]
    for chunk in chunks:
        x = chunk.view(-1, 1)  # (t, 1)
        logits, own_state = model(x, own_state)  # the model's own forward: (t, 1, V)
        twin_logits, gate_state, gates = twin.forward_with_gates(x, gate_state)
        logits_all.append(logits[:, 0].float().cpu())
        twin_logits_all.append(twin_logits[:, 0].float().cpu())
        for k, g in enumerate(gates):
            per_layer[k].append({name: t[:, 0].float().cpu() for name, t in g.items()})  # each (t, H)
        if bar is not None:
            bar.update(chunk.numel())
    if bar is not None:
        bar.close()

    layers = []
    for steps in per_layer:
        g = {name: torch.cat([s[name] for s in steps]) for name in steps[0]}  # each (T, H)
        if cfg.variant == "coupled":
            g["i"] = 1.0 - g["f"]  # no input gate of its own: the coupled cell takes 1 - f
        layers.append({q: g[q].contiguous() for q in quantities})

    logits = torch.cat(logits_all)  # (T, V)
    probs = torch.softmax(logits.double(), dim=-1).float()  # (T, V)
    k = min(top_k, probs.shape[1])
    top_probs, top_ids = probs.topk(k, dim=-1)  # (T, K)
    p_next = torch.full((T,), float("nan"))
    if T > 1:
        nxt = ids[1:].cpu()
        p_next[:-1] = probs[torch.arange(T - 1), nxt]

    notes = quantity_notes(cfg)
    if twin is not model:
        notes.append("recorded through the custom cells loaded with the cuDNN module's weights")
        gap = (torch.cat(twin_logits_all) - logits).abs().max().item() if T else 0.0
        if gap > 1e-3 * max(1.0, logits.abs().max().item()):
            notes.append(f"warning: the custom twin's logits differ from the model's by up to {gap:.2g}")
    text = "".join(vocab[i] for i in ids.tolist())
    return Recording(text=text, vocab=list(vocab), variant=cfg.variant, quantities=quantities, layers=layers,
                     p_next=p_next, top_ids=top_ids, top_probs=top_probs, notes=notes)


# ---------------------------------------------------------------------------- analysis

def rank_units(rec: Recording, *, top: int = 5, quantities: tuple[str, ...] | None = None,
               features: dict[str, Tensor] | None = None) -> list[dict]:
    """For each text feature, the ``top`` units whose trace correlates most (|Pearson r|) with it.

    Returns one dict per feature: name, help, constant (True when the feature
    never changes in this text: nothing to correlate with) and units, a list of
    {layer, unit, quantity, r} best first. ``features`` defaults to
    :func:`charlstm.features.text_features` of the recorded text.
    """
    feats = features if features is not None else text_features(rec.text)
    names = list(feats)
    acts, index = rec.unit_matrix(quantities)  # (T, N)
    F = torch.stack([feats[n] for n in names], dim=1)  # (T, F)
    r = pearson(acts, F)  # (F, N)
    out = []
    for j, name in enumerate(names):
        constant = bool((F[:, j] == F[0, j]).all())
        units = []
        if not constant:
            order = r[j].abs().argsort(descending=True, stable=True)[:top]
            for n in order.tolist():
                layer, q, unit = index[n]
                units.append({"layer": layer, "unit": unit, "quantity": q, "r": round(float(r[j, n]), 4)})
        out.append({"feature": name, "help": FEATURE_HELP.get(name, ""), "constant": constant, "units": units})
    return out


def saturation(rec: Recording, low: float = SATURATION_LOW, high: float = SATURATION_HIGH) -> list[dict]:
    """For each layer and gate: the fraction of (step, unit) pairs below ``low`` (left-saturated)
    and above ``high`` (right-saturated), and the same fractions per unit (lists of H)."""
    out = []
    for k, layer in enumerate(rec.layers):
        for gate in GATES[rec.variant]:
            g = layer[gate]  # (T, H)
            left_u = (g < low).float().mean(0)  # (H,)
            right_u = (g > high).float().mean(0)  # (H,)
            out.append({
                "layer": k, "gate": gate,
                "left": round(float(left_u.mean()), 4), "right": round(float(right_u.mean()), 4),
                "units_mostly_left": int((left_u > 0.5).sum()), "units_mostly_right": int((right_u > 0.5).sum()),
                "per_unit_left": [round(v, 4) for v in left_u.tolist()],
                "per_unit_right": [round(v, 4) for v in right_u.tolist()],
            })
    return out


def plot_saturation(sat: list[dict], stem: Path, *, title: str = "") -> list[Path]:
    """The paper's saturation figure: one point per unit, fraction of steps left-saturated (x)
    against right-saturated (y), one series per layer and gate. Writes stem.png and stem.svg
    (PlottingUnavailable when matplotlib is missing)."""
    from .plots import Series, plot_lines

    series = [
        Series(f"layer {d['layer']} {d['gate']}", d["per_unit_left"], d["per_unit_right"],
               style={"linestyle": "none", "marker": "o", "markersize": 3, "alpha": 0.6})
        for d in sat
    ]
    return plot_lines(series, stem, title=title or "gate saturation (one point per unit)",
                      xlabel=f"fraction of steps left-saturated (< {SATURATION_LOW})",
                      ylabel=f"fraction of steps right-saturated (> {SATURATION_HIGH})",
                      ylim=(-0.02, 1.02), size=(5.5, 5.0))


def write_saturation_plot(sat: list[dict], plot: Path | None, default_dir: Path) -> list[Path]:
    """Draw the saturation plot where the user asked: ``x.png`` or ``x.svg`` writes that file only,
    a name without those suffixes writes name.png and name.svg; no name writes
    default_dir/saturation.png and .svg under a name not yet taken."""
    import shutil
    import tempfile

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


# ---------------------------------------------------------------------------- colours

def colour_value(rec: Recording, layer: int, unit: int, quantity: str, scale: str = "unit") -> Tensor:
    """A unit's trace mapped to [-1, 1] for colouring: (T,).

    Gates: 0 -> -1, 0.5 -> 0, 1 -> +1 (both scales). h and C: divided by the
    unit's largest |value| over the text (``scale='unit'``), or taken as is for
    h and through tanh for C (``scale='fixed'``).
    """
    v = rec.layers[layer][quantity][:, unit]  # (T,)
    if quantity in ("h", "c"):
        if scale == "fixed":
            return torch.tanh(v) if quantity == "c" else v.clamp(-1, 1)
        m = v.abs().max()
        return v / m if m > 0 else torch.zeros_like(v)
    return (2 * v - 1).clamp(-1, 1)


def rgb(s: float) -> tuple[int, int, int]:
    """Blue (-1) through white (0) to red (+1); the same map as the HTML page."""
    s = max(-1.0, min(1.0, float(s)))
    if s >= 0:
        return 255, round(255 - 190 * s), round(255 - 200 * s)
    a = -s
    return round(255 - 200 * a), round(255 - 130 * a), 255


def render_terminal(rec: Recording, layer: int, unit: int, quantity: str, scale: str = "unit"):
    """The text as a rich ``Text``, each character's background coloured by the unit's value."""
    from rich.text import Text

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


# ---------------------------------------------------------------------------- HTML page

def _quantize(x: Tensor) -> dict:
    """A (T, H) trace as one byte per value, unit-major, with each unit's min and max:
    {'lo': [H], 'hi': [H], 'b64': base64url of H*T bytes}."""
    lo = x.min(0).values  # (H,)
    hi = x.max(0).values  # (H,)
    span = (hi - lo).clamp_min(1e-12)
    q = ((x - lo) / span * 255).round().clamp(0, 255).to(torch.uint8)  # (T, H)
    q = q.T.contiguous()  # (H, T): one unit's trace is contiguous
    data = ctypes.string_at(q.data_ptr(), q.numel())  # raw bytes without numpy
    return {
        "lo": [round(v, 6) for v in lo.tolist()],
        "hi": [round(v, 6) for v in hi.tolist()],
        "b64": base64.urlsafe_b64encode(data).decode("ascii"),
    }


def page_data(rec: Recording, ranking: list[dict], *, meta: dict, initial: dict | None = None) -> dict:
    """The JSON object embedded in the page."""
    if initial is None:
        initial = {"layer": 0, "unit": 0, "quantity": "c" if "c" in rec.quantities else "h"}
        best = max((u for f in ranking for u in f["units"][:1]), key=lambda u: abs(u["r"]), default=None)
        if best is not None:
            initial = {"layer": best["layer"], "unit": best["unit"], "quantity": best["quantity"]}
    p_next = [None if math.isnan(p) else round(p, 4) for p in rec.p_next.tolist()]
    return {
        "meta": {**meta, "bpc": round(rec.bits_per_char(), 4) if len(rec.text) > 1 else None},
        "text_b64": base64.urlsafe_b64encode(rec.text.encode("utf-8")).decode("ascii"),  # no user text in the page
        "vocab": rec.vocab,
        "variant": rec.variant,
        "quantities": list(rec.quantities),
        "quantity_help": {q: QUANTITY_HELP[q] for q in rec.quantities},
        "layers": [{q: _quantize(layer[q]) for q in rec.quantities} for layer in rec.layers],
        "hidden": rec.hidden,
        "p_next": p_next,
        "top_ids": rec.top_ids.tolist(),
        "top_probs": [[round(p, 4) for p in row] for row in rec.top_probs.tolist()],
        "features": ranking,
        "initial": initial,
        "notes": rec.notes,
    }


def _embed_json(obj) -> str:
    """JSON safe inside a <script> element: no '<', '>', '&' and no '/' (so no '//' either)."""
    s = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return s.replace("/", "\\/").replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_page(rec: Recording, ranking: list[dict], *, meta: dict, initial: dict | None = None) -> str:
    """The self-contained HTML page: inline style and script, the recording embedded as JSON."""
    title = f"charlstm visualize: {meta.get('checkpoint', '')}"
    esc = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
    title = "".join(esc.get(ch, ch) for ch in title).replace("/", "&#47;")
    return (_PAGE.replace("__TITLE__", title)
            .replace("__DATA__", _embed_json(page_data(rec, ranking, meta=meta, initial=initial))))


# The page must load nothing from anywhere: no URLs, no '//' at all (the tests check), so the
# script below uses only /* */ comments.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; background: #fafafa; }
  h1 { font-size: 1.2em; margin: 0 0 0.3em 0; }
  .meta, .notes { color: #555; font-size: 0.9em; margin: 0.2em 0; }
  .controls { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: center; margin: 0.8em 0;
              padding: 0.5em 0.7em; background: #fff; border: 1px solid #ddd; border-radius: 6px; }
  .controls label { font-size: 0.9em; }
  .controls input[type=number] { width: 5em; }
  .legend { display: inline-block; width: 160px; height: 12px; vertical-align: middle; border: 1px solid #ccc;
            background: linear-gradient(to right, rgb(55,125,255), rgb(255,255,255), rgb(255,65,55)); }
  #text { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 14px; line-height: 1.45;
          white-space: pre-wrap; word-break: break-all; background: #fff; border: 1px solid #ddd;
          border-radius: 6px; padding: 0.7em; margin: 0; }
  #text span { cursor: default; }
  #text span.sel { outline: 1px solid #000; }
  #tip { position: fixed; display: none; pointer-events: none; background: #fff; border: 1px solid #888;
         border-radius: 4px; padding: 0.4em 0.6em; font-size: 12px; box-shadow: 0 2px 6px rgba(0,0,0,0.2);
         font-family: ui-monospace, "DejaVu Sans Mono", monospace; z-index: 10; min-width: 14em; }
  #tip .bar { display: inline-block; height: 8px; background: #6a8; vertical-align: middle; margin-left: 0.4em; }
  #tip .actual { font-weight: bold; }
  table.features { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0; background: #fff; }
  table.features td, table.features th { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; }
  table.features button { font-family: ui-monospace, monospace; font-size: 0.95em; margin: 1px; cursor: pointer; }
  table.features td.help { color: #666; }
  h2 { font-size: 1em; margin: 1.2em 0 0.2em 0; }
  .best { font-size: 0.88em; margin: 0 0 0.6em 0; }
  .best button { font-family: ui-monospace, monospace; font-size: 0.95em; margin: 1px 2px; cursor: pointer; }
</style>
</head>
<body>
<h1>charlstm visualize</h1>
<div class="meta" id="meta"></div>
<div class="notes" id="notes"></div>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>unit <button id="prev" type="button">&lsaquo;</button><input id="unit" type="number" min="0" value="0"><button id="next" type="button">&rsaquo;</button></label>
  <label>quantity <select id="quantity"></select></label>
  <label>scale <select id="scale"><option value="unit">per unit (max |value|)</option><option value="fixed">fixed</option></select></label>
  <span><span id="lo">-1</span> <span class="legend"></span> <span id="hi">+1</span></span>
  <span class="meta" id="what"></span>
</div>
<div class="best" id="best"></div>
<pre id="text"></pre>
<h2>Units that follow features of the text</h2>
<p class="meta">Pearson correlation r between a unit's trace over this text and the feature; click a unit to show it.</p>
<table class="features" id="features"></table>
<div id="tip"></div>
<script type="application/json" id="charlstm-data">__DATA__</script>
<script>
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("charlstm-data").textContent);
  var $ = function (id) { return document.getElementById(id); };

  /* base64url -> bytes */
  function decode(s) {
    var bin = atob(s.split("-").join("+").split("_").join("\\x2f"));
    var out = new Uint8Array(bin.length);
    for (var k = 0; k < bin.length; k++) { out[k] = bin.charCodeAt(k); }
    return out;
  }
  /* the text is embedded as UTF-8 bytes, so that nothing it says can act as markup or an address */
  var chars = Array.from(new TextDecoder("utf-8").decode(decode(D.text_b64)));
  var T = chars.length;
  var H = D.hidden;

  /* every trace: one byte per value, unit-major */
  var traces = D.layers.map(function (layer) {
    var m = {};
    Object.keys(layer).forEach(function (q) { m[q] = { lo: layer[q].lo, hi: layer[q].hi, bytes: decode(layer[q].b64) }; });
    return m;
  });
  function values(layer, q, unit) {
    var t = traces[layer][q], lo = t.lo[unit], span = t.hi[unit] - t.lo[unit];
    var out = new Float32Array(T);
    for (var k = 0; k < T; k++) { out[k] = lo + span * t.bytes[unit * T + k] / 255; }
    return out;
  }
  function toColourScale(v, q, scale) {
    var s = new Float32Array(v.length), m = 0, k;
    if (q === "h" || q === "c") {
      if (scale === "fixed") {
        for (k = 0; k < v.length; k++) { s[k] = q === "c" ? Math.tanh(v[k]) : Math.max(-1, Math.min(1, v[k])); }
      } else {
        for (k = 0; k < v.length; k++) { m = Math.max(m, Math.abs(v[k])); }
        for (k = 0; k < v.length; k++) { s[k] = m > 0 ? v[k] / m : 0; }
      }
    } else {
      for (k = 0; k < v.length; k++) { s[k] = Math.max(-1, Math.min(1, 2 * v[k] - 1)); }
    }
    return { s: s, max: m };
  }
  function rgb(s) {
    s = Math.max(-1, Math.min(1, s));
    if (s >= 0) { return "rgb(255," + Math.round(255 - 190 * s) + "," + Math.round(255 - 200 * s) + ")"; }
    var a = -s;
    return "rgb(" + Math.round(255 - 200 * a) + "," + Math.round(255 - 130 * a) + ",255)";
  }
  function show(ch) {
    if (ch === " ") { return "' '"; }
    return JSON.stringify(ch);
  }

  /* header */
  var m = D.meta, parts = [];
  parts.push(D.variant + (m.backend ? " (" + m.backend + ")" : ""));
  parts.push(D.layers.length + " layer" + (D.layers.length > 1 ? "s" : "") + " x " + H + " units");
  parts.push(T + " characters");
  if (m.bpc !== null && m.bpc !== undefined) { parts.push(m.bpc.toFixed(3) + " bits/char on this text"); }
  if (m.checkpoint) { parts.push("checkpoint " + m.checkpoint); }
  $("meta").textContent = parts.join(" \\u00b7 ");
  $("notes").textContent = D.notes.join("; ");

  /* text */
  var pre = $("text"), spans = new Array(T);
  var frag = document.createDocumentFragment();
  for (var t = 0; t < T; t++) {
    var sp = document.createElement("span");
    sp.textContent = chars[t] === "\\n" ? " \\n" : chars[t];
    sp.setAttribute("data-t", String(t));
    spans[t] = sp;
    frag.appendChild(sp);
  }
  pre.appendChild(frag);

  /* controls */
  D.layers.forEach(function (_, k) {
    var o = document.createElement("option"); o.value = String(k); o.textContent = String(k); $("layer").appendChild(o);
  });
  D.quantities.forEach(function (q) {
    var o = document.createElement("option"); o.value = q; o.textContent = q + ": " + D.quantity_help[q]; $("quantity").appendChild(o);
  });
  $("unit").max = String(H - 1);

  var current = null;
  function select(layer, unit, q, scale) {
    layer = Math.max(0, Math.min(D.layers.length - 1, layer | 0));
    unit = Math.max(0, Math.min(H - 1, unit | 0));
    if (D.quantities.indexOf(q) < 0) { q = D.quantities[0]; }
    if (scale !== "fixed") { scale = "unit"; }
    $("layer").value = String(layer); $("unit").value = String(unit); $("quantity").value = q; $("scale").value = scale;
    var v = values(layer, q, unit);
    var c = toColourScale(v, q, scale);
    for (var k = 0; k < T; k++) { spans[k].style.backgroundColor = rgb(c.s[k]); }
    current = { layer: layer, unit: unit, q: q, v: v };
    var gate = !(q === "h" || q === "c");
    $("lo").textContent = gate ? "0" : (scale === "fixed" ? (q === "c" ? "tanh -1" : "-1") : (-c.max).toPrecision(3));
    $("hi").textContent = gate ? "1" : (scale === "fixed" ? (q === "c" ? "tanh +1" : "+1") : (c.max).toPrecision(3));
    $("what").textContent = "layer " + layer + ", unit " + unit + ", " + D.quantity_help[q];
    var hash = "#layer=" + layer + "&unit=" + unit + "&q=" + q + "&scale=" + scale;
    if (window.location.hash !== hash && window.history && window.history.replaceState) {
      try { window.history.replaceState(null, "", hash); } catch (e) { /* some browsers refuse on file: pages */ }
    }
  }
  function fromControls() { select(+$("layer").value, +$("unit").value, $("quantity").value, $("scale").value); }
  ["layer", "unit", "quantity", "scale"].forEach(function (id) { $(id).addEventListener("change", fromControls); });
  $("unit").addEventListener("input", fromControls);
  $("prev").addEventListener("click", function () { $("unit").value = String(+$("unit").value - 1); fromControls(); });
  $("next").addEventListener("click", function () { $("unit").value = String(+$("unit").value + 1); fromControls(); });

  /* the best unit of each feature, above the text; every ranked unit in the table below */
  function unitButton(u, bold) {
    var btn = document.createElement("button"); btn.type = "button";
    btn.textContent = u.layer + ":" + u.unit + " " + u.quantity + " r=" + (u.r >= 0 ? "+" : "") + u.r.toFixed(2);
    if (bold) { btn.style.fontWeight = "bold"; }
    btn.addEventListener("click", function () { select(u.layer, u.unit, u.quantity, $("scale").value); });
    return btn;
  }
  var best = $("best");
  if (D.features.length) { best.appendChild(document.createTextNode("best unit per feature: ")); }
  D.features.forEach(function (f) {
    var label = document.createElement("span");
    label.textContent = " " + f.feature + " ";
    label.title = f.help;
    best.appendChild(label);
    if (f.units.length) { best.appendChild(unitButton(f.units[0], false)); }
    else { best.appendChild(document.createTextNode("(constant) ")); }
  });
  var table = $("features");
  var head = document.createElement("tr");
  ["feature", "meaning", "best units"].forEach(function (s) { var th = document.createElement("th"); th.textContent = s; head.appendChild(th); });
  table.appendChild(head);
  D.features.forEach(function (f) {
    var tr = document.createElement("tr");
    var a = document.createElement("td"); a.textContent = f.feature; tr.appendChild(a);
    var b = document.createElement("td"); b.className = "help"; b.textContent = f.help; tr.appendChild(b);
    var c = document.createElement("td");
    if (f.constant) { c.textContent = "constant in this text"; }
    f.units.forEach(function (u, k) { c.appendChild(unitButton(u, k === 0)); });
    tr.appendChild(c);
    table.appendChild(tr);
  });

  /* hover: the unit's value and the model's next-character predictions */
  var tip = $("tip");
  function line(text, cls) { var d = document.createElement("div"); d.textContent = text; if (cls) { d.className = cls; } return d; }
  pre.addEventListener("mouseover", function (e) {
    var at = e.target.getAttribute && e.target.getAttribute("data-t");
    if (at === null || at === undefined || current === null) { return; }
    var t = +at;
    tip.textContent = "";
    tip.appendChild(line("#" + t + "  " + show(chars[t]) + "   " + current.q + " = " + current.v[t].toFixed(3)));
    if (t + 1 < T) {
      tip.appendChild(line("next " + show(chars[t + 1]) + "  p = " + D.p_next[t].toFixed(3), "actual"));
    }
    tip.appendChild(line("top " + D.top_ids[t].length + " predictions:"));
    D.top_ids[t].forEach(function (id, k) {
      var p = D.top_probs[t][k];
      var row = line(show(D.vocab[id]) + "  " + p.toFixed(3));
      if (t + 1 < T && D.vocab[id] === chars[t + 1]) { row.className = "actual"; }
      var bar = document.createElement("span"); bar.className = "bar"; bar.style.width = Math.round(80 * p) + "px";
      row.appendChild(bar);
      tip.appendChild(row);
    });
    tip.style.display = "block";
    e.target.classList.add("sel");
  });
  pre.addEventListener("mousemove", function (e) {
    var x = e.clientX + 14, y = e.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) { x = e.clientX - tip.offsetWidth - 8; }
    if (y + tip.offsetHeight > window.innerHeight) { y = e.clientY - tip.offsetHeight - 8; }
    tip.style.left = x + "px"; tip.style.top = y + "px";
  });
  pre.addEventListener("mouseout", function (e) {
    tip.style.display = "none";
    if (e.target.classList) { e.target.classList.remove("sel"); }
  });

  /* initial selection: the address (#layer=..&unit=..&q=..&scale=..), else the best-correlated unit */
  var init = D.initial, scale = "unit";
  window.location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
    var p = kv.split("=");
    if (p[0] === "layer") { init = Object.assign({}, init, { layer: +p[1] }); }
    if (p[0] === "unit") { init = Object.assign({}, init, { unit: +p[1] }); }
    if (p[0] === "q") { init = Object.assign({}, init, { quantity: p[1] }); }
    if (p[0] === "scale") { scale = p[1]; }
  });
  select(init.layer, init.unit, init.quantity, scale);
})();
</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------- command line

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


def free_path(directory: Path, stem: str, suffix: str) -> Path:
    """``directory/stem+suffix``, or ``stem-2``, ``stem-3``... when taken: never an existing file."""
    path = directory / f"{stem}{suffix}"
    n = 2
    while path.exists() or any(path.with_suffix(s).exists() for s in (".png", ".svg") if suffix == ""):
        path = directory / f"{stem}-{n}{suffix}"
        n += 1
    return path


def read_text_arg(text: str | None, text_file: Path | None) -> str:
    """The text to visualise, from --text or --text-file (UTF-8); UsageError/CharlstmError for a user's mistake."""
    if (text is None) == (text_file is None):
        raise UsageError("give the text to visualise with exactly one of --text TEXT or --text-file FILE")
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise CharlstmError(f"--text-file {path}: no such file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise CharlstmError(f"--text-file {path} is not valid UTF-8 (byte {e.start}); save it as UTF-8") from e
        except OSError as e:
            raise CharlstmError(f"cannot read --text-file {path}: {e.strerror or e}") from e
    if not text:
        raise CharlstmError("the text to visualise is empty")
    return text


def _fmt_unit(u: dict) -> str:
    return f"{u['layer']}:{u['unit']} {u['quantity']} r={u['r']:+.2f}"


def run_from_cli(*, run, text, text_file, html, unit, quantity, scale, find_units, top, saturation_table,
                 plot, json_out, unknown, max_chars, device) -> None:
    """`charlstm visualize`: record the model over a text and write or print what was asked."""
    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .corpus import encode_text

    # --- options that need no checkpoint
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
    raw = read_text_arg(text, text_file)

    # --- the checkpoint and the text it can read
    dev = resolve_device(device)
    ckpt = load_checkpoint(resolve_checkpoint(run), map_location=dev)
    model, cfg, vocab = ckpt.model, ckpt.model_cfg, ckpt.vocab
    ids = encode_text(raw, vocab, unknown, hint="remove them or pass --unknown skip to drop them")
    dropped = len(raw) - ids.numel()
    if dropped:
        print(f"note: dropped {dropped} character(s) outside the model's vocabulary: "
              f"{', '.join(repr(c) for c in vocab.unknown(raw)[:20])}", file=sys.stderr)
    if ids.numel() > max_chars:
        print(f"note: visualising the first {max_chars} of {ids.numel()} characters (raise --max-chars for more)",
              file=sys.stderr)
        ids = ids[:max_chars]
    if ids.numel() < 2:
        raise CharlstmError("the text has fewer than 2 characters the model knows: nothing to predict")
    quantities = quantities_for(cfg.variant)
    if quantity is not None and quantity not in quantities:
        raise UsageError(f"a {cfg.variant} model has no {quantity!r}; its quantities are {', '.join(quantities)}")
    if layer_unit is not None:
        layer, index = layer_unit
        if layer >= cfg.layers or index >= cfg.hidden:
            raise UsageError(f"--unit {unit}: the model has layers 0..{cfg.layers - 1} and units 0..{cfg.hidden - 1}")

    rec = record(model, ids, vocab.chars, progress=True)
    rank_q = (quantity,) if quantity is not None else None
    ranking = rank_units(rec, top=top, quantities=rank_q)
    sat = saturation(rec) if rec.variant != "rnn" else []
    out = sys.stderr if json_out else sys.stdout
    from rich.console import Console

    console = Console(file=out, highlight=False, soft_wrap=True)
    for note in rec.notes:
        if not note.startswith("recorded through"):  # that one is for the page
            print(f"note: {note}", file=sys.stderr)

    # --- the page: where asked, or by default when nothing else was asked
    html_path = Path(html) if html is not None else None
    if html_path is None and layer_unit is None and not find_units and not saturation_table:
        html_path = free_path(ckpt.path.parent, "visualize", ".html")
    if html_path is not None:
        meta = {"checkpoint": str(ckpt.path), "backend": cfg.backend, "step": ckpt.step,
                "source": str(text_file) if text_file is not None else "--text"}
        html_path.write_text(build_page(rec, ranking, meta=meta), encoding="utf-8")
        print(f"wrote {html_path} ({html_path.stat().st_size / 1024:.0f} KB): open it in a browser", file=out)

    # --- the text coloured in the terminal
    if layer_unit is not None:
        q = quantity or ("c" if "c" in quantities else "h")
        layer, index = layer_unit
        console.print(f"layer {layer}, unit {index}, {q}: {QUANTITY_HELP[q]} "
                      f"(blue low, white middle, red high; scale {scale})", style="bold")
        console.print(render_terminal(rec, layer, index, q, scale))

    result: dict = {"checkpoint": str(ckpt.path), "variant": cfg.variant, "chars": len(rec.text),
                    "bpc": rec.bits_per_char()}
    if find_units:
        result["features"] = ranking
        if not json_out:
            from rich.table import Table

            table = Table(title=f"units that follow text features ({len(rec.text)} characters, Pearson r)")
            table.add_column("feature")
            table.add_column("best units (layer:unit quantity r)")
            for f in ranking:
                table.add_row(f["feature"], "constant in this text" if f["constant"]
                              else ", ".join(_fmt_unit(u) for u in f["units"]))
            console.print(table)
    if saturation_table:
        result["saturation"] = [{k: v for k, v in d.items() if not k.startswith("per_unit")} for d in sat]
        if not sat:
            print("note: rnn has no gates: no saturation to report", file=sys.stderr)
        elif not json_out:
            from rich.table import Table

            table = Table(title=f"gate saturation: fraction of steps x units below {SATURATION_LOW} / above {SATURATION_HIGH}")
            for col in ("layer", "gate", f"< {SATURATION_LOW}", f"> {SATURATION_HIGH}", "units mostly low", "units mostly high"):
                table.add_column(col, justify="right")
            for d in sat:
                table.add_row(str(d["layer"]), d["gate"], f"{d['left']:.3f}", f"{d['right']:.3f}",
                              str(d["units_mostly_left"]), str(d["units_mostly_right"]))
            console.print(table)
        if sat:
            from .plots import have_matplotlib

            if have_matplotlib():
                written = write_saturation_plot(sat, plot, ckpt.path.parent)
                result["plots"] = [str(p) for p in written]
                print("wrote " + ", ".join(str(p) for p in written), file=out)
            elif plot is not None:
                from .plots import PlottingUnavailable

                raise PlottingUnavailable()
            else:
                print("note: the saturation plot needs matplotlib: pip install 'charlstm[plot]'", file=sys.stderr)
    if json_out:
        if math.isnan(result["bpc"]):
            result["bpc"] = None
        print(json.dumps(result, indent=1))

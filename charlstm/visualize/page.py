"""The self-contained HTML page of a recording: charlstm/assets' HTML, CSS and JS inlined, the data as JSON."""

from __future__ import annotations

import base64
import ctypes
import functools
import json
import math
from importlib import resources

import torch
from torch import Tensor

from ..registry import gate_quantities
from .quantities import QUANTITY_HELP
from .recording import Recording

ASSETS = ("visualize.html", "visualize.css", "visualize.js")
# The template names its style and script as sibling files (so that it opens in an editor as a
# page); build_page puts their text in place of exactly these two tags.
STYLE_TAG = '<link rel="stylesheet" href="visualize.css">'
SCRIPT_TAG = '<script src="visualize.js"></script>'


def read_asset(name: str) -> str:
    """The text of charlstm/assets/NAME, wherever the package is installed."""
    return (resources.files("charlstm") / "assets" / name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def page_template() -> str:
    """visualize.html with visualize.css and visualize.js inlined; __TITLE__ and __DATA__ still to fill."""
    html, css, js = (read_asset(name) for name in ASSETS)
    for tag in (STYLE_TAG, SCRIPT_TAG):
        if html.count(tag) != 1:
            raise RuntimeError(f"charlstm/assets/visualize.html must hold {tag} exactly once")
    return html.replace(STYLE_TAG, f"<style>\n{css}</style>").replace(SCRIPT_TAG, f"<script>\n{js}</script>")


def quantize(x: Tensor) -> dict:
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


def initial_view(rec: Recording, ranking: list[dict]) -> dict:
    """The unit the page opens on: the best-correlated unit of any feature, else layer 0 unit 0."""
    best = max((u for f in ranking for u in f["units"][:1]), key=lambda u: abs(u["r"]), default=None)
    if best is None:
        return {"layer": 0, "unit": 0, "quantity": "c" if "c" in rec.quantities else "h"}
    return {"layer": best["layer"], "unit": best["unit"], "quantity": best["quantity"]}


def page_data(rec: Recording, ranking: list[dict], *, meta: dict, initial: dict | None = None) -> dict:
    """The JSON object embedded in the page."""
    p_next = [None if math.isnan(p) else round(p, 4) for p in rec.p_next.tolist()]
    return {
        "meta": {**meta, "bpc": round(rec.bits_per_char(), 4) if len(rec.text) > 1 else None},
        "text_b64": base64.urlsafe_b64encode(rec.text.encode("utf-8")).decode("ascii"),  # no user text in the page
        "vocab": rec.vocab,
        "variant": rec.variant,
        "quantities": list(rec.quantities),
        "gates": list(gate_quantities(rec.variant)),
        "quantity_help": {q: QUANTITY_HELP[q] for q in rec.quantities},
        "layers": [{q: quantize(layer[q]) for q in rec.quantities} for layer in rec.layers],
        "hidden": rec.hidden,
        "p_next": p_next,
        "top_ids": rec.top_ids.tolist(),
        "top_probs": [[round(p, 4) for p in row] for row in rec.top_probs.tolist()],
        "features": ranking,
        "initial": initial if initial is not None else initial_view(rec, ranking),
        "notes": rec.notes,
    }


def embed_json(obj) -> str:
    """JSON safe inside a <script> element: no '<', '>', '&' and no '/' (so no '//' either)."""
    s = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return s.replace("/", "\\/").replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_page(rec: Recording, ranking: list[dict], *, meta: dict, initial: dict | None = None) -> str:
    """The self-contained HTML page: inline style and script, the recording embedded as JSON."""
    title = f"charlstm visualize: {meta.get('checkpoint', '')}"
    esc = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
    title = "".join(esc.get(ch, ch) for ch in title).replace("/", "&#47;")
    return (page_template().replace("__TITLE__", title)
            .replace("__DATA__", embed_json(page_data(rec, ranking, meta=meta, initial=initial))))

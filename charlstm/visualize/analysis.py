"""Numbers from a recording: units ranked by text feature, gate saturation, colour values."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..features import FEATURE_HELP, pearson, text_features
from ..plots import Series, plot_lines
from ..registry import gate_quantities
from .quantities import GATES
from .recording import Recording

SATURATION_LOW, SATURATION_HIGH = 0.1, 0.9


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
    series = [
        Series(f"layer {d['layer']} {d['gate']}", d["per_unit_left"], d["per_unit_right"],
               style={"linestyle": "none", "marker": "o", "markersize": 3, "alpha": 0.6})
        for d in sat
    ]
    return plot_lines(series, stem, title=title or "gate saturation (one point per unit)",
                      xlabel=f"fraction of steps left-saturated (< {SATURATION_LOW})",
                      ylabel=f"fraction of steps right-saturated (> {SATURATION_HIGH})",
                      ylim=(-0.02, 1.02), size=(5.5, 5.0))


def colour_value(rec: Recording, layer: int, unit: int, quantity: str, scale: str = "unit") -> Tensor:
    """A unit's trace mapped to [-1, 1] for colouring: (T,).

    Gates: 0 -> -1, 0.5 -> 0, 1 -> +1 (both scales). The states (h, C, the mogrifier's
    modulated x and h): divided by the unit's largest |value| over the text
    (``scale='unit'``), or taken as is, C through tanh (``scale='fixed'``).
    """
    v = rec.layers[layer][quantity][:, unit]  # (T,)
    if quantity not in gate_quantities(rec.variant):
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

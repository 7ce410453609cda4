"""Line plots saved as PNG and SVG, with matplotlib as an optional extra.

matplotlib is not a dependency of charlstm: it comes with ``pip install
'charlstm[plot]'``. Commands that draw figures always write their data first,
then call ``plot_lines``; when matplotlib is missing they print
``INSTALL_HINT`` instead of failing. Only the object-oriented ``Figure`` API is
used (no ``pyplot``), so drawing never touches a global backend or opens a
window.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CharlstmError

INSTALL_HINT = "plots need matplotlib, an optional extra: pip install 'charlstm[plot]' (the data files were written)"
FORMATS = ("png", "svg")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


class PlottingUnavailable(CharlstmError):
    """matplotlib is not installed; the message says how to install it."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


def have_matplotlib() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib():
    """Return matplotlib's ``Figure`` class, or raise ``PlottingUnavailable`` with the install hint."""
    if not have_matplotlib():
        raise PlottingUnavailable()
    from matplotlib.figure import Figure

    return Figure


@dataclass
class Series:
    """One line of a plot: points (x, y), an optional ± band, and its legend label."""

    label: str
    x: list[float]
    y: list[float]
    spread: list[float] | None = None  # half-width of a shaded band around y (e.g. std over seeds)
    style: dict = field(default_factory=dict)  # extra matplotlib line keywords (marker, linestyle...)


def plot_lines(
    series: list[Series],
    stem: Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    xscale: str = "linear",
    xticks: list[float] | None = None,
    ylim: tuple[float | None, float | None] | None = None,
    hlines: list[tuple[float, str]] | None = None,
    size: tuple[float, float] = (6.4, 4.0),
    dpi: int = 100,
) -> list[Path]:
    """Draw one line per series and save ``stem.png`` and ``stem.svg``; return the paths written.

    ``hlines`` adds dashed reference lines (value, label), e.g. chance level;
    ``xticks`` puts ticks (labelled with plain numbers) at these x values only.
    Raises ``PlottingUnavailable`` when matplotlib is not installed.
    """
    Figure = require_matplotlib()
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    _draw_series(ax, series)
    for value, label in hlines or []:
        ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)
    ax.set_xscale(xscale)
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
        ax.minorticks_off()
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return save_figure(fig, stem)


def _draw_series(ax, series: list[Series]) -> None:
    """One line per series (its finite points), with its spread as a band where it has one."""
    n = max(len(series), 1)
    for k, s in enumerate(series):
        points = [(x, y) for x, y in zip(s.x, s.y) if _finite(x) and _finite(y)]
        if not points:
            continue
        xs, ys = zip(*points)
        # Earlier lines are drawn wider with larger markers, so that lines lying on top of
        # each other (e.g. several variants at 100%) stay visible as nested outlines.
        width = 1.0 + 1.4 * (n - 1 - k) / max(n - 1, 1)
        style = {"marker": MARKERS[k % len(MARKERS)] if len(xs) < 20 else None,
                 "markersize": 2.5 + 2 * width, "linewidth": width, **s.style}
        (line,) = ax.plot(xs, ys, label=s.label, **style)
        if s.spread is not None:
            band = [(x, y, d) for x, y, d in zip(s.x, s.y, s.spread) if _finite(x) and _finite(y) and _finite(d)]
            if band:
                bx, by, bd = zip(*band)
                ax.fill_between(bx, [y - d for y, d in zip(by, bd)], [y + d for y, d in zip(by, bd)],
                                color=line.get_color(), alpha=0.2, linewidth=0)


def save_figure(fig, stem: Path) -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.svg`` (the parent directory created); the paths written.

    Each file is written beside itself and renamed into place, so that a reader
    (or a crash mid-save) never sees half a figure.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        path = stem.with_name(stem.name + "." + fmt)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # Metadata without dates, so the same data gives the same file.
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        try:
            fig.savefig(tmp, format=fmt, metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)
    return written


def try_plot_lines(series: list[Series], stem: Path, **kwargs) -> tuple[list[Path], str | None]:
    """``plot_lines`` that returns ([], INSTALL_HINT) instead of raising when matplotlib is missing."""
    try:
        return plot_lines(series, stem, **kwargs), None
    except PlottingUnavailable as e:
        return [], str(e)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)

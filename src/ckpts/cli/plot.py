"""``ckpts plot``'s picture: metric curves of one or more runs, drawn with matplotlib's Agg.

Each run is one line. Kept checkpoints are filled dots; steps deleted by retention
(known from the run's metrics history) are faint hollow dots; the best kept
checkpoint is a star, pinned ones a diamond. matplotlib is an optional extra
(``pip install 'ckpts[plot]'``) imported only here, and only the Agg canvas is used,
so no display and no global backend switch is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ckpts.cli._common import printable
from ckpts.cli.curves import Curve
from ckpts.errors import CheckpointError, InvalidArgumentError

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def plot_curves(curves: Sequence[Curve], out: Path, *, title: str | None = None) -> Path:
    """Draw ``curves`` (the same metric, one per run) into a PNG, SVG or PDF file.

    Args:
        curves: from :func:`ckpts.cli.curves.metric_curve`.
        out: the image file; its suffix picks the format.
        title: the chart title (default: the metric's name).

    Returns:
        ``out``.

    Raises:
        CheckpointError: matplotlib is not installed.
        InvalidArgumentError: no curve has a point.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise CheckpointError("plotting needs matplotlib: pip install 'ckpts[plot]'") from e
    if not any(curve.points for curve in curves):
        raise InvalidArgumentError("nothing to plot: no run has a value of the metric")
    # names and labels come from the runs: drawn as they are, never parsed as TeX
    with matplotlib.rc_context({"text.parse_math": False}):
        return _draw(curves, out, title=title)


def _draw(curves: Sequence[Curve], out: Path, *, title: str | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, curve in enumerate(curves):
        color = f"C{index % 10}"
        finite = [p for p in curve.points if math.isfinite(p.value)]
        axes.plot([p.step for p in finite], [p.value for p in finite], color=color,
                  linewidth=1.4, alpha=0.85, label=printable(curve.label))
        deleted = [p for p in finite if not p.kept]
        if deleted:
            axes.scatter([p.step for p in deleted], [p.value for p in deleted], s=18,
                         facecolors="none", edgecolors=color, alpha=0.35, linewidths=0.9)
        kept = [p for p in finite if p.kept]
        axes.scatter([p.step for p in kept], [p.value for p in kept], s=26, color=color,
                     zorder=3)
        for marker, shape, size in (("best", "*", 190), ("pinned", "D", 60)):
            chosen = [p for p in kept if marker in p.markers]
            if chosen:
                axes.scatter([p.step for p in chosen], [p.value for p in chosen], s=size,
                             marker=shape, color=color, edgecolors="black", linewidths=0.7,
                             zorder=4)
    _legend(axes, several_runs=len(curves) > 1)
    axes.set_xlabel("step")
    metric = printable(curves[0].metric)
    axes.set_ylabel(metric)
    axes.set_title(printable(title) if title is not None else metric)
    axes.grid(alpha=0.25)
    figure.savefig(out)
    return out


def _legend(axes: Axes, *, several_runs: bool) -> None:
    """Runs (when several) plus what each marker means."""
    from matplotlib.lines import Line2D

    handles = list(axes.get_legend_handles_labels()[0]) if several_runs else []
    handles += [
        Line2D([], [], linestyle="none", marker="o", color="gray", label="kept"),
        Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", color="gray",
               alpha=0.4, label="deleted"),
        Line2D([], [], linestyle="none", marker="*", markersize=12, color="gray",
               markeredgecolor="black", label="best kept"),
        Line2D([], [], linestyle="none", marker="D", color="gray", markeredgecolor="black",
               label="pinned"),
    ]
    axes.legend(handles=handles, fontsize=8, loc="best")

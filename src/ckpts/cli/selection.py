"""``ckpts plot`` and ``ckpts report``: see a run's metric curves, and the checkpoint to ship.

``plot`` draws one metric for one or several runs with matplotlib (an optional
extra, imported only when the command runs); ``report`` writes a self-contained
HTML page (no matplotlib, no torch). Both read local runs and URLs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckpts._format.catalog import list_checkpoints
from ckpts.cli._common import (
    ModeOption,
    check_metric,
    fail,
    metric_direction,
    open_run,
    reports_errors,
    stdout,
)
from ckpts.storage._port import url_protocol


@reports_errors
def plot(
    runs: Annotated[list[str], typer.Argument(help="One or more runs: directories or URLs.")],
    metric: Annotated[str, typer.Option(help="The metric to draw against the step.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Image file (.png, .svg, .pdf).")
                      ] = Path("curve.png"),
    mode: ModeOption = None,
) -> None:
    """Draw a metric against the step for one or several runs, on one chart.

    Kept checkpoints are dots, the best a star (when ``--mode`` or the metric's name
    says which end is best), pinned ones diamonds; steps that retention deleted are
    faint, when the run's metrics history knows them.
    """
    from ckpts.cli.curves import metric_curve
    from ckpts.cli.plot import plot_curves

    listed = {run: list_checkpoints(open_run(run)) for run in runs}
    check_metric(metric, [c for found in listed.values() for c in found])
    labels = _labels(runs)
    better = mode or metric_direction(metric)  # None: no best to mark
    curves = [metric_curve(run, metric, better, checkpoints=found, label=labels[run])
              for run, found in listed.items()]
    plot_curves(curves, output)
    stdout.print(str(output))


@reports_errors
def report(
    run: Annotated[str, typer.Argument(help="A run: a directory or a URL.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")
                      ] = Path("report.html"),
    metric: Annotated[
        str | None,
        typer.Option(help="The metric that picks the recommended checkpoint "
                          "(default: val_loss, else eval_loss, else the first metric whose "
                          "name tells its better end)."),
    ] = None,
    mode: ModeOption = None,
) -> None:
    """Write a self-contained HTML report: curves, checkpoints table, recommendation, disk use."""
    from ckpts.cli.report import write_report

    storage = open_run(run)
    if not list_checkpoints(storage):
        fail(f"no checkpoints in {run}")
    write_report(storage, output, metric=metric, mode=mode)
    stdout.print(str(output))


def _labels(runs: list[str]) -> dict[str, str]:
    """Each run's legend label: its folder name, or its path (URL) when names repeat."""
    names = [run.rstrip("/").rsplit("/", 1)[-1] if url_protocol(run) is not None
             else Path(run).resolve().name for run in runs]
    return {run: name if names.count(name) == 1 else run
            for run, name in zip(runs, names, strict=True)}

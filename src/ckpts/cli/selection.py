"""``ckpts plot`` and ``ckpts report``: see a run's metric curves, and the checkpoint to ship.

``plot`` draws one metric for one or several runs with matplotlib (an optional
extra, imported only when the command runs); ``report`` writes a self-contained
HTML page (no matplotlib, no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckpts._catalog import list_checkpoints
from ckpts.cli._common import ModeOption, check_metric, fail, reports_errors, run_dir, stdout


@reports_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(help="One or more run directories.")],
    metric: Annotated[str, typer.Option(help="The metric to draw against the step.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Image file (.png, .svg, .pdf).")
                      ] = Path("curve.png"),
    mode: ModeOption = "min",
) -> None:
    """Draw a metric against the step for one or several runs, on one chart.

    Kept checkpoints are dots, the best a star, pinned ones diamonds; steps that
    retention deleted are faint, when the run's metrics history knows them.
    """
    from ckpts._curves import metric_curve
    from ckpts._plot import plot_curves

    listed = {run: list_checkpoints(run_dir(run)) for run in runs}
    check_metric(metric, [c for found in listed.values() for c in found])
    labels = _labels(runs)
    curves = [metric_curve(run, metric, mode, checkpoints=found, label=labels[run])
              for run, found in listed.items()]
    plot_curves(curves, output)
    stdout.print(str(output))


@reports_errors
def report(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")
                      ] = Path("report.html"),
    metric: Annotated[
        str | None,
        typer.Option(help="The metric that picks the recommended checkpoint "
                          "(default: val_loss if present, else the first one)."),
    ] = None,
    mode: ModeOption = "min",
) -> None:
    """Write a self-contained HTML report: curves, checkpoints table, recommendation, disk use."""
    from ckpts._report import write_report

    if not list_checkpoints(run_dir(run)):
        fail(f"no checkpoints in {run}")
    write_report(run, output, metric=metric, mode=mode)
    stdout.print(str(output))


def _labels(runs: list[Path]) -> dict[Path, str]:
    """Each run's legend label: its directory name, or its path when names repeat."""
    names = [run.resolve().name for run in runs]
    return {run: name if names.count(name) == 1 else str(run)
            for run, name in zip(runs, names, strict=True)}

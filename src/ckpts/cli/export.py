"""``ckpts export`` and ``ckpts evaluate``: ship a checkpoint, or score a run after the fact.

``export`` writes one checkpoint's weights (never optimizer bytes) as a Hugging
Face folder, safetensors or GGUF, with a progress bar. ``evaluate`` runs a user's
script on every checkpoint of a run and attaches the metrics it prints::

    ckpts evaluate runs/exp1 eval.py --metric val_acc

runs ``python eval.py CHECKPOINT`` (its directory, or its URL in a remote run, which
:func:`ckpts.load_weights` reads) for each checkpoint that lacks ``val_acc``
(so a rerun resumes), and reads the metrics from the last line the script prints
on stdout, a JSON object such as ``{"val_acc": 0.91}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from ckpts.cli._common import (
    fail,
    format_number,
    open_checkpoint_arg,
    open_run,
    printable,
    reports_errors,
    stderr,
    stdout,
)
from ckpts.errors import CheckpointError

if TYPE_CHECKING:
    from ckpts._format.catalog import Checkpoint


@reports_errors
def export(
    checkpoint: Annotated[str, typer.Argument(
        help="A checkpoint (run/step-*): a directory or a URL.")],
    out: Annotated[Path, typer.Argument(help="Where to write (a new local folder or file).")],
    format: Annotated[
        Literal["hf", "safetensors", "gguf"], typer.Option(help="The output format.")],
    dtype: Annotated[
        Literal["fp32", "bf16", "fp16"] | None,
        typer.Option(help="Cast floating-point weights (default: as saved)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="The saved module to export "
                                                  "(default: model, or the only one).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="config.json (or its folder) for a checkpoint saved without a Hugging Face "
             "config; hf and gguf need one.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        help="tokenizer.json or a Hugging Face tokenizer folder, for hf and gguf.")] = None,
    max_shard_size: Annotated[str, typer.Option(
        help="Split safetensors output into files of at most this size.")] = "5GB",
) -> None:
    """Export a checkpoint's weights for deployment (reads no optimizer bytes)."""
    from ckpts.export import export as export_weights  # checks all it can before torch

    storage, folder = open_checkpoint_arg(checkpoint)

    columns = (TextColumn("exporting"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True,
                  disable=not stderr.is_terminal) as progress:
        task = progress.add_task("export", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        written = export_weights(storage.where(folder), out, format=format, dtype=dtype, name=name,
                                 config=config, tokenizer=tokenizer,
                                 max_shard_size=max_shard_size, progress=advance)
    stdout.print(str(written))


@reports_errors
def evaluate(
    run: Annotated[str, typer.Argument(help="A run: a directory or a URL.")],
    script: Annotated[Path, typer.Argument(
        help="A Python script run as `python SCRIPT CHECKPOINT` (a directory, or a URL for "
             "a remote run); its last stdout line is a JSON object of metrics.")],
    metric: Annotated[list[str], typer.Option(
        help="A metric the script prints (repeat for several); checkpoints that have them "
             "all are skipped.")],
    step: Annotated[list[int] | None, typer.Option(
        help="Evaluate only this step (repeat for several; default: every checkpoint).")
    ] = None,
) -> None:
    """Run an evaluation script over a run's checkpoints and attach the metrics it prints."""
    if not script.is_file():
        fail(f"evaluation script {script} does not exist")
    storage = open_run(run)
    from ckpts._run.manager import CheckpointManager  # imports torch: once the input is checked

    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with CheckpointManager(storage) as manager, Progress(
            *columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task("", total=None)

        def show(checkpoint: Checkpoint, metrics: Mapping[str, float] | None, done: int,
                 total: int) -> None:
            progress.update(task, completed=done, total=total,
                            description=f"step {checkpoint.step}")
            progress.console.print(printable(
                f"step {checkpoint.step}: "
                + ("already evaluated, skipped" if metrics is None
                   else ", ".join(f"{k} {format_number(v)}" for k, v in metrics.items()))))

        results = manager.evaluate(lambda c: _run_script(script, c), metrics=metric,
                                   steps=step, progress=show)
    stdout.print(f"evaluated {len(results)} checkpoint(s) of {run}")


def _run_script(script: Path, checkpoint: Checkpoint) -> dict[str, float]:
    """Run the user's script on one checkpoint; its last stdout line holds the metrics."""
    done = subprocess.run([sys.executable, str(script), str(checkpoint.path)],
                          stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise CheckpointError(
            f"{script} failed on step {checkpoint.step} ({checkpoint.path}) with exit code "
            f"{done.returncode}; its stderr is above. Metrics of earlier steps are kept, so "
            "rerun once it is fixed")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        metrics = json.loads(lines[-1])
    except (IndexError, ValueError) as e:
        raise CheckpointError(
            f"{script} on step {checkpoint.step}: its last stdout line must be a JSON object "
            f"of metrics such as {{\"val_acc\": 0.91}}, got {(lines or [''])[-1][:200]!r}") from e
    if not isinstance(metrics, dict):
        raise CheckpointError(
            f"{script} on step {checkpoint.step}: printed {metrics!r}, not a JSON object of "
            "metrics")
    return metrics

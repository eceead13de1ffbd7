"""``ckpts ls`` and ``ckpts best``: list a run's checkpoints, find the best one (no torch).

Both read only the manifests (through :func:`ckpts._format.catalog.list_checkpoints`), so
they start in a fraction of a second and list thousands of checkpoints quickly.
A checkpoint whose files no longer have the sizes its manifest records is marked
``damaged`` by ``ls``, never marked best, and skipped by ``best`` with a note.

Which end of a metric is best comes from ``--mode``, else from the metric's name
(:func:`ckpts.cli._common.metric_direction`: min for ``val_loss``, max for
``eval_accuracy``). ``ls`` marks no best for a metric whose name says nothing
(``eval_samples_per_second``); ``best`` and ``ls --metric`` rank such a metric by min.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.filesize import decimal
from rich.text import Text

from ckpts._format.catalog import Checkpoint, list_checkpoints
from ckpts._run.policy import Mode, rank_by
from ckpts.cli._common import (
    JsonOption,
    ModeOption,
    check_metric,
    epoch_cell,
    fail,
    format_number,
    json_metrics,
    metric_direction,
    open_run,
    print_json,
    print_table,
    printable,
    ranking_mode,
    reports_errors,
    stderr,
    stdout,
    table_metrics,
)
from ckpts.storage import Storage, open_storage
from ckpts.storage._shm import held_on_this_host

DEFAULT_TAG = "pinned"  # CheckpointManager.pin's default tag, shown as plain "pinned"


@reports_errors
def ls(
    run: Annotated[str, typer.Argument(
        help="A run (a directory or a URL such as s3://bucket/run), or a folder of runs.")],
    metric: Annotated[
        str | None,
        typer.Option(help="Mark the best checkpoint by this metric only (default: every metric "
                          "whose better end its name tells)."),
    ] = None,
    mode: ModeOption = None,
    as_json: JsonOption = False,
) -> None:
    """List a run's checkpoints: step, time, size, epoch, metrics; latest/best/pinned/damaged.

    Given a directory of runs (no checkpoints of its own), list each run in turn.
    """
    runs = find_runs(open_run(run))
    if metric is not None:
        check_metric(metric, [c for checkpoints in runs.values() for c in checkpoints])
    marked = {name: mark(checkpoints, metric, mode) for name, checkpoints in runs.items()}
    if as_json:
        rows = {name: [_json_row(c, m) for c, m in pairs] for name, pairs in marked.items()}
        print_json(rows.get("", rows))  # one run: its rows; a directory of runs: by name
        return
    if "" in marked and not marked[""]:
        stderr.print(f"no checkpoints in {run}")
    for i, (name, pairs) in enumerate(marked.items()):
        if name:  # a directory of runs: a blank line, then each run's name
            if i:
                stdout.print()
            stdout.print(Text(printable(name), style="bold"))
        if pairs:
            print_checkpoint_table(pairs)
    if "" in marked:
        print_memory_snapshots(open_run(run).location)


def print_memory_snapshots(location: str) -> None:
    """A line on the memory tier's snapshots of the run on this host, if it holds any."""
    folder, steps, held = held_on_this_host(location)
    if not any(steps.values()):
        return
    ranks = ", ".join(f"rank {rank}: {', '.join(map(str, found)) or 'none'}"
                      for rank, found in steps.items())
    stdout.print(printable(
        f"in host memory (memory tier, this host only, not in the run): steps by {ranks}; "
        f"{decimal(held)} in {folder} (a restart of the job restores from there; its close() "
        "frees it)"))


@reports_errors
def best(
    run: Annotated[str, typer.Argument(
        help="A run (a directory or a URL), or a folder of runs, such as a Lightning "
             "ModelCheckpoint dirpath of CkptsCheckpointIO .ckpt runs.")],
    metric: Annotated[str, typer.Option(help="The metric to rank checkpoints by.")],
    mode: ModeOption = None,
) -> None:
    """Print the path of the checkpoint with the best metric (and nothing else).

    Given a folder of runs (no checkpoints of its own, as ``ckpts ls`` lists it), the
    best over all of them: for a Lightning dirpath, the ``step-*`` folder inside the best
    ``.ckpt``, which ``ckpt_path=`` and ``ckpts.load_weights`` take.
    Ties go to the earlier step; NaN values rank last. A damaged checkpoint (a file
    missing or not the size its manifest records) is skipped, with a note on stderr.
    """
    runs = find_runs(open_run(run))  # a folder of runs: the best over all of them
    checkpoints = [c for found in runs.values() for c in found]
    check_metric(metric, checkpoints)
    for name, found in runs.items():
        where, of = (f"{run.rstrip('/')}/{name}", f" of {name}") if name else (run, "")
        for checkpoint in found:
            if checkpoint.damaged is not None and metric in checkpoint.metrics:
                stderr.print(printable(
                    f"note: skipping step {checkpoint.step}{of}, which is damaged "
                    f"({checkpoint.damaged}); `ckpts verify {where}` checks every file"))
    ranked = rank_by([c for c in checkpoints if c.damaged is None], metric,
                     ranking_mode(metric, mode))
    if not ranked:
        fail(f"every checkpoint with the metric {metric!r} in {run} is damaged; "
             f"run `ckpts verify {run}` for details")
    winner = ranked[0]
    if math.isnan(winner.metrics[metric]):
        fail(f"every checkpoint's {metric!r} in {run} is NaN; there is no best one")
    typer.echo(str(winner.path))


def find_runs(storage: Storage) -> dict[str, list[Checkpoint]]:
    """The runs to list: ``{"": checkpoints}`` for a run, ``{name: checkpoints}`` for each
    subfolder holding checkpoints when ``storage`` has none of its own."""
    checkpoints = list_checkpoints(storage)
    if checkpoints:
        return {"": checkpoints}
    runs = {}
    for child in storage.folders():
        found = list_checkpoints(open_storage(storage.where(child)))
        if found:
            runs[child] = found
    return runs or {"": []}


def mark(
    checkpoints: Sequence[Checkpoint], metric: str | None = None, mode: Mode | None = None
) -> list[tuple[Checkpoint, list[str]]]:
    """Pair each checkpoint with its markers: ``latest``, ``best(<metric>)``, ``pinned[:tag]``,
    ``damaged``.

    ``best`` goes to the best intact checkpoint of ``metric``, ranked by ``mode`` (by
    default the metric's known direction, else min, as ``ckpts best`` ranks it). With
    no ``metric``, each metric but ``epoch`` is marked, by ``mode`` if given, else by
    its known direction; a metric whose name tells none gets no ``best``. A metric
    that is NaN everywhere has no best.
    """
    markers: dict[int, list[str]] = {c.step: [] for c in checkpoints}
    if checkpoints:
        markers[checkpoints[-1].step].append("latest")
    intact = [c for c in checkpoints if c.damaged is None]
    if metric is not None:
        ranked_by: dict[str, Mode | None] = {metric: ranking_mode(metric, mode)}
    else:
        ranked_by = {name: mode or metric_direction(name) for name in table_metrics(checkpoints)}
    for name, direction in ranked_by.items():
        ranked = rank_by(intact, name, direction) if direction is not None else []
        if ranked and not math.isnan(ranked[0].metrics[name]):
            markers[ranked[0].step].append(f"best({name})")
    for c in checkpoints:
        markers[c.step] += ["pinned" if t == DEFAULT_TAG else f"pinned:{t}" for t in c.tags]
        if c.damaged is not None:
            markers[c.step].append("damaged")
    return [(c, markers[c.step]) for c in checkpoints]


def print_checkpoint_table(pairs: list[tuple[Checkpoint, list[str]]]) -> None:
    """Print one run's ``ckpts ls`` table on stdout, from :func:`mark`'s pairs."""
    metrics = table_metrics(c for c, _ in pairs)
    header = ["step", "created", "size", "epoch", *metrics, "markers"]
    rows = [
        [
            str(checkpoint.step),
            checkpoint.created.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            decimal(checkpoint.nbytes),
            epoch_cell(checkpoint),
            *(format_number(checkpoint.metrics[m]) if m in checkpoint.metrics else ""
              for m in metrics),
            ", ".join(markers),
        ]
        for checkpoint, markers in pairs
    ]
    print_table(rows, header=header, right={0, 2, 3, *range(4, 4 + len(metrics))})


def _json_row(checkpoint: Checkpoint, markers: list[str]) -> dict[str, Any]:
    return {
        "step": checkpoint.step,
        "path": str(checkpoint.path),
        "created": checkpoint.created.isoformat(),
        "nbytes": checkpoint.nbytes,
        "epoch": checkpoint.epoch,
        "metrics": json_metrics(checkpoint.metrics),
        "tags": list(checkpoint.tags),
        "markers": markers,
        "damaged": checkpoint.damaged,
    }

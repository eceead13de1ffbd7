"""``ckpts verify``, ``prune``, ``pin`` and ``unpin``: check a run and manage what it keeps.

``verify`` reads manifests, indexes, headers and hashes only: it never imports
torch. ``prune``, ``pin`` and ``unpin`` go through :class:`ckpts.CheckpointManager`,
imported inside the command once its arguments are checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated

import typer
from rich.filesize import decimal
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ckpts._checkpoint.verify import deleted_while_verifying, verify_listed
from ckpts._format.catalog import Checkpoint, list_checkpoints
from ckpts._format.index import read_manifest
from ckpts._run.policy import KeepBest, KeepEvery, KeepLast, KeepWithinBytes, Mode
from ckpts._run.usage import identity, physical_bytes
from ckpts.cli._common import (
    EXIT_CHECK_FAILED,
    check_metric,
    committed_checkpoint,
    fail,
    open_location,
    open_run,
    printable,
    ranking_mode,
    reports_errors,
    stderr,
    stdout,
)
from ckpts.errors import CheckpointError
from ckpts.storage._port import MANIFEST, Listed, Storage

if TYPE_CHECKING:
    from ckpts._run.manager import CheckpointManager
    from ckpts._run.policy import RetentionPolicy

RunArgument = Annotated[str, typer.Argument(help="A run: a directory or a URL.")]
StepArgument = Annotated[int, typer.Argument(help="The step of the checkpoint.")]


@reports_errors
def verify(
    path: Annotated[str, typer.Argument(
        help="A checkpoint or a run: a directory or a URL (s3://bucket/run/step-*).")],
) -> None:
    """Check every file of a checkpoint (or of each checkpoint in a run) against its manifest.

    Exits with code 1 when any checkpoint has a problem. A checkpoint of the run deleted
    while the command runs (a writer's retention, a prune) is noted, not a problem.
    """
    storage = open_location(path)
    found = committed_checkpoint(path)
    listed: list[tuple[str, Mapping[str, int] | None]]
    if found is not None:  # sizes None: verify_checkpoint lists the checkpoint itself
        storage, listed = found[0], [(found[1], None)]
    else:
        listed = [(entry.name, entry.sizes)
                  for entry in sorted(storage.committed(), key=lambda e: e.step)]
    names = [name for name, _ in listed]
    if not names:
        fail(f"{path} is not a checkpoint (no {MANIFEST}) nor a run holding any")
    failed = deleted = 0
    columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True,
                  disable=not stderr.is_terminal) as progress:
        for name, sizes in progress.track(listed):
            problems = verify_listed(storage, name, sizes)
            if problems is None:
                if found is not None:
                    fail(deleted_while_verifying(path))
                deleted += 1
                stdout.print(f"{name}  deleted while verifying (retention or prune?)")
                continue
            failed += bool(problems)
            stdout.print(f"{name}  {'FAILED' if problems else 'OK'}")
            _report_files(storage, name, problems)
    stdout.print(f"{len(names) - deleted} checkpoint(s) verified, {failed} with problems"
                 + (f", {deleted} deleted meanwhile" if deleted else ""))
    if failed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _report_files(storage: Storage, checkpoint: str, problems: list[str]) -> None:
    """One line per file of the manifest (size, OK or FAILED), then each problem."""
    try:
        files = read_manifest(storage, checkpoint)["files"]
    except (CheckpointError, OSError):
        files = {}  # the manifest itself is the problem; it is printed below
    for name, record in sorted(files.items()):
        bad = any(p.startswith(f"{storage.where(checkpoint)}/{name}:") for p in problems)
        stdout.print(printable(f"  {name}  {decimal(record['nbytes'])}  "
                               f"{'FAILED' if bad else 'OK'}"))
    for problem in problems:
        stdout.print(printable(f"  {problem}"))


@reports_errors
def prune(
    run: RunArgument,
    keep_last: Annotated[
        int | None, typer.Option(min=1, help="Keep the N most recent checkpoints.")
    ] = None,
    keep_best: Annotated[
        int | None, typer.Option(min=1, help="Keep the K best checkpoints by --metric.")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="The metric --keep-best ranks by.")] = None,
    mode: Annotated[Mode | None, typer.Option(
        help="For --keep-best: is lower (min) or higher (max) better (default: known from "
             "the metric's name, e.g. max for accuracy; else min).")] = None,
    keep_every: Annotated[
        int | None, typer.Option(min=1, help="Keep every checkpoint whose step is a multiple of S.")
    ] = None,
    keep_within: Annotated[str | None, typer.Option(
        metavar="SIZE", help="Cap the run's size on disk (shared files once), e.g. 200GB or "
        "1.5TiB: of what the other options keep, the oldest checkpoints go first.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print what would be removed.")
    ] = False,
) -> None:
    """Delete the checkpoints that none of the --keep options keeps.

    The newest checkpoint and pinned ones are always kept. At least one --keep
    option is required: prune never falls back to a default policy. --keep-within
    caps what the others keep (everything, when alone), never removing a
    --keep-best pick. The summary says what the deletion freed on disk: files that
    checkpoints share are freed only with the last checkpoint holding them.
    """
    if keep_best is None and (metric is not None or mode is not None):
        fail("--metric and --mode only apply with --keep-best K")
    if keep_best is not None and metric is None:
        fail("--keep-best needs --metric (the metric to rank checkpoints by)")
    if keep_last is None and keep_best is None and keep_every is None and keep_within is None:
        fail("give at least one of --keep-last N, --keep-best K --metric M, --keep-every S, "
             "--keep-within SIZE; prune never deletes with an implicit policy")
    try:
        budget = None if keep_within is None else KeepWithinBytes(keep_within)
    except CheckpointError as e:
        fail(f"--keep-within {keep_within}: {e}")
    storage = open_run(run)
    checkpoints = list_checkpoints(storage)
    if metric is not None:
        check_metric(metric, checkpoints)
    keep: list[RetentionPolicy] = []
    if keep_last is not None:
        keep.append(KeepLast(keep_last))
    if keep_best is not None and metric is not None:
        keep.append(KeepBest(keep_best, metric, ranking_mode(metric, mode)))
    if keep_every is not None:
        keep.append(KeepEvery(keep_every))
    if budget is not None:
        keep.append(budget)
    before = storage.committed()
    with _manager(storage, keep=keep) as manager:
        removed = manager.prune(dry_run=dry_run)
    gone = {checkpoint.name for checkpoint in removed}
    kept = [entry for entry in before if entry.name not in gone]
    after = kept if dry_run else storage.committed()
    freed = physical_bytes(before) - physical_bytes(after)
    verb, free_verb = ("would remove", "would free") if dry_run else ("removed", "freed")
    for checkpoint in removed:
        stdout.print(f"{verb} {checkpoint.name} ({decimal(checkpoint.nbytes)}"
                     f"{_shared_with(checkpoint.name, before, kept)})")
    stdout.print(f"{verb} {len(removed)} of {len(before)} checkpoint(s) ({free_verb} "
                 f"{decimal(freed)} on disk; {len(before) - len(removed)} kept)")
    if budget is not None and physical_bytes(after) > budget.nbytes:
        stderr.print(f"warning: {run} {'would still hold' if dry_run else 'still holds'} "
                     f"{decimal(physical_bytes(after))}, over --keep-within {keep_within}: what "
                     "is left is protected (the newest checkpoint, pinned ones, --keep-best "
                     "picks); unpin some or keep fewer best")


def _shared_with(name: str, before: Sequence[Listed], kept: Sequence[Listed]) -> str:
    """``"; 1.2 GB of it shared with kept checkpoints"`` for a removed checkpoint whose
    files kept ones hold too (deleting it does not free those), else ``""``."""
    entry = next((e for e in before if e.name == name), None)
    if entry is None:
        return ""
    held = {identity(other, file) for other in kept for file in other.sizes}
    shared = sum(size for file, size in entry.sizes.items() if identity(entry, file) in held)
    return f"; {decimal(shared)} of it shared with kept checkpoints" if shared else ""


@reports_errors
def pin(
    run: RunArgument,
    step: StepArgument,
    tag: Annotated[str, typer.Option(help="The pin's name.")] = "pinned",
) -> None:
    """Protect a checkpoint from pruning, under a tag, until it is unpinned."""
    storage = open_run(run)
    _checkpoint_at(storage, step)
    with _manager(storage) as manager:
        checkpoint = manager.pin(step, tag)
    stdout.print(printable(f"pinned {checkpoint.name} (tags: {', '.join(checkpoint.tags)})"))


@reports_errors
def unpin(
    run: RunArgument,
    step: StepArgument,
    tag: Annotated[
        str | None, typer.Option(help="Remove only this tag (default: every tag).")
    ] = None,
) -> None:
    """Remove a checkpoint's pin tags; once it has none, pruning treats it like any other."""
    storage = open_run(run)
    current = _checkpoint_at(storage, step)
    if tag is not None and tag not in current.tags:
        fail(f"step {step} has no tag {tag!r}; its tags: {', '.join(current.tags) or 'none'}")
    with _manager(storage) as manager:
        checkpoint = manager.unpin(step, tag)
    stdout.print(printable(f"unpinned {checkpoint.name} (tags left: "
                           f"{', '.join(checkpoint.tags) or 'none'})"))


def _checkpoint_at(run: Storage, step: int) -> Checkpoint:
    """The committed checkpoint of ``step``, or exit 2 listing the steps there are.

    Checked here, from the manifests alone, so a wrong step fails fast, before the
    command imports torch.
    """
    checkpoints = list_checkpoints(run)
    for checkpoint in checkpoints:
        if checkpoint.step == step:
            return checkpoint
    fail(f"{run.location} has no committed checkpoint for step {step}; steps: "
         f"{', '.join(str(c.step) for c in checkpoints) or 'none'}")


def _manager(run: Storage, *, keep: list[RetentionPolicy] | None = None) -> CheckpointManager:
    """A manager of ``run``, to use in a ``with`` block (closing releases the writer lock).

    keep=None for pin/unpin: unpin() applies retention, and with no policy it deletes
    nothing.
    """
    from ckpts._run.manager import CheckpointManager

    return CheckpointManager(run, keep=keep)

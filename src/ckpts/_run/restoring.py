"""Restoring a run: the checkpoints to try, newest first, the first intact one loaded
into the live state (by every process of the job together), and the branch the run
then goes on from."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ckpts._checkpoint.job import Job
from ckpts._checkpoint.restore import restore_into
from ckpts._checkpoint.verify import check_file_sizes
from ckpts._format.catalog import Checkpoint
from ckpts._format.index import Contents, read_manifest
from ckpts._run.steps import StepOrder
from ckpts._run.writer import RunWriter
from ckpts._state.train_state import TrainState
from ckpts.errors import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidArgumentError,
    NotACheckpointError,
)
from ckpts.storage._port import Listed, Storage, parse_step

log = logging.getLogger("ckpts")


def candidates(storage: Storage, step: int | None, *, missing_ok: bool
               ) -> tuple[list[Listed], list[int]]:
    """The committed checkpoints a restore tries, newest first (only ``step`` when given),
    and the steps newer than ``step`` (what a branch from it would discard).

    Raises:
        NotACheckpointError: ``step`` is not committed, or the run has no checkpoint
            and not ``missing_ok``.
    """
    available = sorted(storage.committed(), key=lambda entry: entry.step)
    if not available:
        _nothing_to_restore(storage, missing_ok)
        return [], []
    newer = [entry.step for entry in available if step is not None and entry.step > step]
    if step is not None:
        chosen = [entry for entry in available if entry.step == step]
        if not chosen:
            raise NotACheckpointError(
                f"{storage.location} has no committed checkpoint for step {step}; "
                f"available steps: {[entry.step for entry in available]}"
            )
        available = chosen
    return list(reversed(available)), newer


def _nothing_to_restore(storage: Storage, missing_ok: bool) -> None:
    """A run without checkpoints: say so if it holds other frameworks' checkpoints."""
    foreign = storage.foreign()
    hint = (f"; it holds checkpoints ckpts did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}): bring them in with "
            f"`ckpts import SRC {storage.location}`") if foreign else ""
    if not missing_ok:
        raise NotACheckpointError(
            f"{storage.location} has no committed checkpoint to restore{hint}; "
            "pass missing_ok=True to start a new run instead"
        )
    if foreign:
        log.warning("restore(): %s has no ckpts checkpoint, starting from scratch%s",
                    storage.location, hint)


def first_intact(storage: Storage, names: Sequence[str], sizes: Mapping[str, Mapping[str, int]],
                 state: TrainState, *, job: Job, step: int | None
                 ) -> tuple[str, Contents, list[int]]:
    """Load the first of ``names`` that passes every check into ``state``. Returns its
    name, its contents as read and the steps skipped as corrupt (each with a warning).

    Every process of ``job`` tries the same checkpoint and they all agree on the outcome
    before any moves on or raises: a rank never goes on alone.

    Raises:
        CorruptCheckpointError: ``step`` was asked for and fails, or every one fails.
        CheckpointError: the state does not fit (IncompatibleStateError, ...).
    """
    corrupt: list[int] = []
    for name in names:
        path = storage.where(name)
        error: BaseException | None = None
        try:
            manifest = read_manifest(storage, name, tensor_entries=False, sizes=sizes.get(name))
            if name in sizes:
                check_file_sizes(path, manifest, sizes[name])
            contents = restore_into(storage, name, manifest, state, job)  # all bytes hashed
        except Exception as e:
            error = e  # every rank learns of it before any raises
        problems, damaged = job.problems(error)
        if problems and not damaged:
            raise error if error is not None else CheckpointError(
                f"restoring {path} failed on another rank: {'; '.join(problems)}")
        if not problems:
            return name, contents, corrupt
        if step is not None:
            raise CorruptCheckpointError(
                f"{path} fails verification: {'; '.join(problems)}") from error
        log.warning("skipping corrupt checkpoint %s: %s", path, "; ".join(problems))
        corrupt.append(parse_step(name) or 0)
    raise CorruptCheckpointError(
        f"every checkpoint in {storage.location} fails verification, so nothing was "
        "restored (model tensors may hold partly read data); run "
        f"`ckpts verify {storage.location}` for details"
    )


def choose(writer: RunWriter, step: int | None, *, missing_ok: bool, discard_newer: bool,
           checkpoints: Callable[[], Sequence[Checkpoint]]) -> dict[str, Any]:
    """What a restore tries (on rank 0): the run's candidates (see :func:`candidates`),
    newest first, with their listed sizes, and the newer steps a branch discards; after
    taking the run's writer lock (the next save looks for damage in the run anew)."""
    writer.lock()
    writer.look_again()
    listed, newer = candidates(writer.storage, step, missing_ok=missing_ok)
    if discard_newer:
        refuse_pinned(checkpoints(), newer, writer.directory)
    return {"names": [entry.name for entry in listed], "newer": newer,
            "sizes": {entry.name: dict(entry.sizes) for entry in listed}}


def refuse_pinned(checkpoints: Sequence[Checkpoint], newer: Sequence[int],
                  directory: Path | str) -> None:
    """Refuse a branch (``discard_newer``) that would delete pinned checkpoints."""
    pinned = [c.step for c in checkpoints if c.step in newer and c.tags]
    if pinned:
        raise InvalidArgumentError(
            f"cannot branch: the newer steps {pinned} of {directory} are pinned and "
            "discard_newer would delete them; unpin them first (manager.unpin(step))"
        )


def branch_past_corrupt(order: StepOrder, checkpoints: Sequence[Checkpoint], step: int,
                        corrupt: Sequence[int], directory: Path | str) -> None:
    """The run goes on from ``step``; the newer, corrupt checkpoints (unless pinned)
    are deleted once its next checkpoint is committed."""
    pinned = {c.step for c in checkpoints if c.tags}
    doomed = tuple(sorted(s for s in corrupt if s not in pinned))
    order.branch_from(step, doomed)
    log.warning(
        "restored step %d of %s: the newer steps %s fail verification; the run goes on "
        "from step %d, and they are deleted once its next checkpoint is committed%s",
        step, directory, sorted(corrupt), step,
        " (pinned ones are kept)" if len(doomed) < len(corrupt) else "")

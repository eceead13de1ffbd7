"""What a run knows of its committed checkpoints after the fact: listing them, the best
by a metric, and metadata attached later (metrics, tags). None of it needs the writer
lock, so an evaluation job does it while training writes the run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from ckpts._format.catalog import Checkpoint, check_metrics, list_checkpoints
from ckpts._format.codec import encode
from ckpts._format.manifest import update_manifest
from ckpts._run import history
from ckpts._run.policy import Mode, check_mode, rank_by
from ckpts._run.steps import check_step
from ckpts.errors import NotACheckpointError
from ckpts.storage import Storage

log = logging.getLogger("ckpts")


class Records:
    """The committed checkpoints of the run in ``storage`` (``directory``: the run as
    messages name it), read from their manifests and annotated in place."""

    def __init__(self, storage: Storage, directory: Path | str) -> None:
        self.storage = storage
        self.directory = directory

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, ascending by step (reads only manifests)."""
        return list_checkpoints(self.storage)

    def best(self, metric: str, mode: Mode) -> Checkpoint | None:
        """The intact checkpoint with the best ``metric`` (NaN last, the earlier step
        among equals); a damaged one is skipped with a warning."""
        check_mode(mode)
        intact = []
        for checkpoint in self.checkpoints():
            if checkpoint.damaged is None:
                intact.append(checkpoint)
            else:
                log.warning("best(): skipping damaged %s: %s", checkpoint.path,
                            checkpoint.damaged)
        ranked = rank_by(intact, metric, mode)
        return ranked[0] if ranked else None

    def add_metrics(self, step: int, metrics: Mapping[str, float]) -> Checkpoint:
        """Merge ``metrics`` into step's manifest (replaced atomically) and the history."""
        checkpoint = self.find(step)
        added = check_metrics(metrics)
        manifest = update_manifest(self.storage, checkpoint.name,
                                   metrics=encode({**checkpoint.metrics, **added}, {}))
        history.append(self.storage, step, added)
        return Checkpoint.from_manifest(self.storage, checkpoint.name, manifest)

    def retag(self, step: int, change: Callable[[tuple[str, ...]], list[str]]) -> Checkpoint:
        """Replace step's tags with ``change(tags)`` (the manifest replaced atomically)."""
        checkpoint = self.find(step)
        manifest = update_manifest(self.storage, checkpoint.name,
                                   tags=change(tuple(checkpoint.tags)))
        return Checkpoint.from_manifest(self.storage, checkpoint.name, manifest)

    def find(self, step: int) -> Checkpoint:
        """The committed checkpoint of ``step``.

        Raises:
            NotACheckpointError: there is none; the message lists the steps there are.
        """
        check_step(step)
        checkpoints = self.checkpoints()
        for checkpoint in checkpoints:
            if checkpoint.step == step:
                return checkpoint
        raise NotACheckpointError(
            f"{self.directory} has no committed checkpoint for step {step}; available steps: "
            f"{[c.step for c in checkpoints] or 'none'}"
        )


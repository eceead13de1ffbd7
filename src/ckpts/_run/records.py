"""What a run knows of its committed checkpoints after the fact: listing them, the best
by a metric, and metadata attached later (metrics, tags). None of it needs the writer
lock, so an evaluation job does it while training writes the run."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ckpts._format.catalog import Checkpoint, check_metrics, list_checkpoints, metrics_of
from ckpts._format.codec import encode
from ckpts._format.manifest import update_manifest
from ckpts._run import history
from ckpts._run.policy import Mode, check_mode, rank_by
from ckpts._run.steps import check_step
from ckpts.errors import NotACheckpointError
from ckpts.storage import Storage, checkpoint_name

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

    def path_of(self, step: int) -> Path | str:
        """Where step ``step``'s checkpoint is (or will be), as the run is named."""
        where = self.storage.where(checkpoint_name(step))
        return Path(where) if isinstance(self.directory, Path) else where

    def pending(self, step: int, metrics: dict[str, float], epoch: int | None, nbytes: int
                ) -> Checkpoint:
        """The record of a checkpoint still being written (in the background)."""
        return Checkpoint(step=step, path=self.path_of(step), metrics=metrics,
                          created=datetime.datetime.now(datetime.timezone.utc), epoch=epoch,
                          nbytes=nbytes, storage=self.storage)

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
        """Merge ``metrics`` into step's manifest and the history. Merged into the manifest
        as it is at the update (see update_manifest), so concurrent updates all count."""
        name = self.find(step)
        added = check_metrics(metrics)

        def merge(manifest: dict[str, Any]) -> None:
            manifest["metrics"] = encode({**metrics_of(manifest), **added}, {})

        manifest = update_manifest(self.storage, name, merge)
        history.append(self.storage, step, added)
        return Checkpoint.from_manifest(self.storage, name, manifest)

    def retag(self, step: int, change: Callable[[tuple[str, ...]], list[str]]) -> Checkpoint:
        """Replace step's tags with ``change(tags)``, the tags as they are at the update."""
        name = self.find(step)

        def retagged(manifest: dict[str, Any]) -> None:
            manifest["tags"] = change(tuple(manifest.get("tags", ())))

        manifest = update_manifest(self.storage, name, retagged)
        return Checkpoint.from_manifest(self.storage, name, manifest)

    def find(self, step: int) -> str:
        """The name of ``step``'s committed checkpoint, from a listing (no manifest read).

        Raises:
            NotACheckpointError: there is none; the message lists the steps there are.
        """
        check_step(step)
        steps = sorted(entry.step for entry in self.storage.committed())
        if step not in steps:
            raise NotACheckpointError(
                f"{self.directory} has no committed checkpoint for step {step}; available "
                f"steps: {steps or 'none'}")
        return checkpoint_name(step)


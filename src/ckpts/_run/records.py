"""The committed checkpoints of a run as records: listing, picking the best, and what
can be added after the fact (metrics, pins). None of it needs the run's writer lock, so
an evaluation job does it while training writes the run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpts._format.catalog import Checkpoint, check_metrics, list_checkpoints
from ckpts._format.codec import encode
from ckpts._format.manifest import update_manifest
from ckpts._run import history as _history
from ckpts._run.policy import Mode, check_mode, rank_by
from ckpts._run.steps import check_step
from ckpts.errors import InvalidArgumentError, NotACheckpointError
from ckpts.storage._port import Storage

if TYPE_CHECKING:
    import torch

    from ckpts._run.evaluate import EvaluationProgress

log = logging.getLogger("ckpts")


class RunRecords:
    """Reading and annotating a run's committed checkpoints; :class:`CheckpointManager`
    is one, and adds saving, restoring and retention (which it re-applies here after a
    change of metrics or pins, through :meth:`_apply_retention`)."""

    storage: Storage
    directory: Path | str

    def _settle(self) -> None:
        """Let a save in flight finish first (a manager with async saves waits)."""

    def _apply_retention(self, *, dry_run: bool = False, if_unlocked: bool = False
                         ) -> list[Checkpoint]:
        """Delete what retention does not keep (a manager with policies does)."""
        return []

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, ascending by step (reads only manifests)."""
        return list_checkpoints(self.storage)

    def latest(self) -> Checkpoint | None:
        """The newest committed checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self, metric: str, mode: Mode = "min") -> Checkpoint | None:
        """The checkpoint with the best ``metric``; None if no checkpoint has it.

        NaN ranks last; among equal values the earlier step wins. A damaged
        checkpoint (a file missing or of the wrong size) is skipped with a warning.
        """
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
        """Attach metrics to a committed checkpoint (e.g. from a later evaluation job).

        The manifest is replaced atomically; existing metrics of the same name are
        overwritten. This needs no writer lock, so an evaluation process can attach
        metrics while training writes the run. Retention is applied again
        afterwards, since rankings change (by the training process on its next save
        if it holds the run); the returned record describes the checkpoint even if
        retention removed it.
        """
        self._settle()
        checkpoint = self._committed(step)
        added = check_metrics(metrics)
        manifest = update_manifest(self.storage, checkpoint.name,
                                   metrics=encode({**checkpoint.metrics, **added}, {}))
        _history.append(self.storage, step, added)
        updated = Checkpoint.from_manifest(self.storage, checkpoint.name, manifest)
        self._apply_retention(if_unlocked=True)
        return updated

    def evaluate(self, fn: Callable[[Any], Mapping[str, float]], *, metrics: Sequence[str],
                 steps: Iterable[int] | None = None, model: torch.nn.Module | None = None,
                 progress: EvaluationProgress | None = None) -> dict[int, dict[str, float]]:
        """Evaluate committed checkpoints after the fact and attach what ``fn`` returns.

        With ``model``, each checkpoint's weights (only) are loaded into it and
        ``fn(model)`` is called; without it, ``fn(checkpoint)`` is. The returned
        metrics are recorded with :meth:`add_metrics`, one checkpoint at a time, so
        an interrupted evaluation resumes: a checkpoint that already has every name
        in ``metrics`` is skipped. See :func:`ckpts._run.evaluate.evaluate`.

        Example:
            >>> manager.evaluate(lambda m: {"val_acc": accuracy(m)}, metrics=["val_acc"],
            ...                  model=build_model())                      # doctest: +SKIP
        """
        from ckpts._run.evaluate import evaluate

        return evaluate(self, fn, metrics=metrics, steps=steps, model=model, progress=progress)

    def pin(self, step: int, tag: str = "pinned") -> Checkpoint:
        """Protect a checkpoint from retention until :meth:`unpin`, under a tag.

        Like :meth:`add_metrics`, this works while another process writes the run.
        """
        if not isinstance(tag, str) or not tag:
            raise InvalidArgumentError(f"tag must be a non-empty str, got {tag!r}")
        self._settle()
        checkpoint = self._committed(step)
        tags = sorted({*checkpoint.tags, tag})
        manifest = update_manifest(self.storage, checkpoint.name, tags=tags)
        return Checkpoint.from_manifest(self.storage, checkpoint.name, manifest)

    def unpin(self, step: int, tag: str | None = None) -> Checkpoint:
        """Remove one tag (or all with ``tag=None``); retention then applies again.

        The returned record describes the checkpoint even if retention removed it.
        """
        self._settle()
        checkpoint = self._committed(step)
        tags = [] if tag is None else [t for t in checkpoint.tags if t != tag]
        manifest = update_manifest(self.storage, checkpoint.name, tags=tags)
        updated = Checkpoint.from_manifest(self.storage, checkpoint.name, manifest)
        self._apply_retention(if_unlocked=True)
        return updated

    def prune(self, *, dry_run: bool = False) -> list[Checkpoint]:
        """Apply the retention policies now. Returns the checkpoints removed (or that
        would be, with ``dry_run``)."""
        self._settle()
        return self._apply_retention(dry_run=dry_run)

    def _committed(self, step: int) -> Checkpoint:
        check_step(step)
        for checkpoint in self.checkpoints():
            if checkpoint.step == step:
                return checkpoint
        raise NotACheckpointError(
            f"{self.directory} has no committed checkpoint for step {step}; available steps: "
            f"{[c.step for c in self.checkpoints()] or 'none'}"
        )

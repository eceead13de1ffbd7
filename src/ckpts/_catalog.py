"""The committed checkpoints of a run, read from their manifests alone (no torch).

Listing a run (``CheckpointManager.checkpoints()``, ``ckpts ls``) reads only the
small ``manifest.json`` of each checkpoint, so it stays fast for thousands of
checkpoints and never imports torch.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpts._codec import decode
from ckpts._manifest import read_manifest
from ckpts._storage import committed_dirs, directory_size, parse_step
from ckpts.errors import CheckpointError, CorruptCheckpointError

log = logging.getLogger("ckpts")


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint, as its manifest describes it.

    Attributes:
        step: the training step it was saved at.
        path: its directory.
        metrics: every metric attached to it (NaN allowed).
        created: when it was committed (UTC).
        nbytes: bytes on disk, manifest included.
        epoch: the epoch passed to ``save``, if any.
        tags: pin tags.
    """

    step: int
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    created: datetime.datetime = datetime.datetime.min
    nbytes: int = 0
    epoch: int | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def from_directory(cls, path: Path) -> Checkpoint:
        """Read a committed checkpoint's manifest (and nothing else)."""
        return cls.from_manifest(path, read_manifest(path))

    @classmethod
    def from_manifest(cls, path: Path, manifest: dict[str, Any]) -> Checkpoint:
        """The record of the checkpoint at ``path`` whose checked manifest is given."""
        if parse_step(path.name) not in (None, manifest["step"]):
            raise CorruptCheckpointError(
                f"{path}: the manifest says step {manifest['step']}, the directory name another")
        try:
            return cls(
                step=manifest["step"],
                path=path,
                metrics=decode(manifest.get("metrics", {}), _no_tensors),
                created=datetime.datetime.fromisoformat(manifest["created"]),
                nbytes=directory_size(path),
                epoch=manifest.get("epoch"),
                tags=tuple(manifest.get("tags", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: malformed manifest field ({e})") from e


def list_checkpoints(run: Path) -> list[Checkpoint]:
    """Committed checkpoints of a run, ascending by step; unreadable ones are skipped."""
    if not run.is_dir():
        return []
    found = []
    for _, path in committed_dirs(run):
        try:
            found.append(Checkpoint.from_directory(path))
        except (CheckpointError, OSError) as e:
            log.warning("ignoring %s: %s", path, e)
    return found


def _no_tensors(key: str) -> Any:
    raise CorruptCheckpointError(f"metrics reference a tensor ({key!r}); the manifest is damaged")

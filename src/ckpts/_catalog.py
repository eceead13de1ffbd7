"""The committed checkpoints of a run, read from their manifests alone (no torch).

Listing a run (``CheckpointManager.checkpoints()``, ``ckpts ls``) reads only the
small ``manifest.json`` of each checkpoint and one directory scan, so it stays
fast for thousands of checkpoints and never imports torch. The scan that sums a
checkpoint's size also checks each file's size against the manifest, at no extra
cost: a checkpoint whose files were truncated, overwritten or removed is marked
``damaged`` (a full check of the contents is ``ckpts verify``).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpts._codec import decode
from ckpts._manifest import read_manifest
from ckpts._storage import committed_dirs, parse_step
from ckpts.errors import CheckpointError, CorruptCheckpointError, InvalidArgumentError

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
        damaged: None when every file has the size its manifest records; otherwise
            what is wrong with the first file that does not (missing, resized).
    """

    step: int
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    created: datetime.datetime = datetime.datetime.min
    nbytes: int = 0
    epoch: int | None = None
    tags: tuple[str, ...] = ()
    damaged: str | None = None

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
        sizes = _file_sizes(path)
        try:
            return cls(
                step=manifest["step"],
                path=path,
                metrics=decode(manifest.get("metrics", {}), _no_tensors),
                created=datetime.datetime.fromisoformat(manifest["created"]),
                nbytes=sum(sizes.values()),
                epoch=manifest.get("epoch"),
                tags=tuple(manifest.get("tags", ())),
                damaged=_size_mismatch(manifest["files"], sizes),
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


def _file_sizes(path: Path) -> dict[str, int]:
    """Name -> size of the regular files directly inside ``path`` (one stat each)."""
    with os.scandir(path) as entries:
        return {e.name: e.stat().st_size for e in entries if e.is_file(follow_symlinks=False)}


def _size_mismatch(files: dict[str, Any], sizes: dict[str, int]) -> str | None:
    """The first file of the manifest that is missing or not its recorded size, described."""
    for name, record in files.items():
        if name not in sizes:
            return f"{name} is missing (or not a regular file)"
        if sizes[name] != record["nbytes"]:
            return f"{name} has {sizes[name]} bytes, the manifest says {record['nbytes']}"
    return None


def _no_tensors(key: str) -> Any:
    raise CorruptCheckpointError(f"metrics reference a tensor ({key!r}); the manifest is damaged")


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as given to save() or add_metrics(), as a dict of str -> float (NaN kept)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError(f"metrics must be a dict of name -> number, got {metrics!r}")
    clean = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidArgumentError(
                f"metric {name!r} = {value!r} is not a number; pass e.g. loss.item()"
            ) from e
        if type(name) is not str:
            raise InvalidArgumentError(f"metric names must be str, got {name!r}")
        clean[name] = number if not math.isnan(number) else math.nan
    return clean

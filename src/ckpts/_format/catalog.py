"""The committed checkpoints of a run, read from their manifests alone (no torch).

Listing a run (``CheckpointManager.checkpoints()``, ``ckpts ls``) costs the
storage's listing and one read of each small ``manifest.json``, so it stays fast
for thousands of checkpoints, on a disk or an object store, and never imports
torch. The listing also gives each file's size, checked against the manifest at
no extra cost: a checkpoint whose files were truncated, overwritten or removed is
marked ``damaged`` (a full check of the contents is ``ckpts verify``).
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

from ckpts._format.codec import decode
from ckpts._format.index import read_manifest
from ckpts._format.manifest import INDEXED_FORMAT_VERSION
from ckpts.errors import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidArgumentError,
)
from ckpts.storage import LocalStorage, open_storage
from ckpts.storage._parallel import run_parallel
from ckpts.storage._port import (
    MANIFEST,
    Listed,
    Range,
    Storage,
    parse_step,
    split_checkpoint,
)

log = logging.getLogger("ckpts")


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint, as its manifest describes it.

    Attributes:
        step: the training step it was saved at.
        path: where it is: a local directory (a ``Path``), or a URL (a ``str``,
            e.g. ``"s3://bucket/run/step-00000500"``).
        metrics: every metric attached to it (NaN allowed).
        created: when it was committed (UTC).
        nbytes: bytes on disk, manifest included.
        epoch: the epoch passed to ``save``, if any.
        tags: pin tags.
        damaged: None when every file has the size its manifest records; otherwise
            what is wrong with the first file that does not (missing, resized).
        storage: the run's storage, which readers such as ``load_weights`` use.
    """

    step: int
    path: Path | str
    metrics: dict[str, float] = field(default_factory=dict)
    created: datetime.datetime = datetime.datetime.min
    nbytes: int = 0
    epoch: int | None = None
    tags: tuple[str, ...] = ()
    damaged: str | None = None
    storage: Storage | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """Its folder name in the run, e.g. ``step-00000500``."""
        return self.path.name if isinstance(self.path, Path) else self.path.rsplit("/", 1)[-1]

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """Read a committed checkpoint's manifest (and nothing else); a path or URL."""
        storage, name = open_checkpoint(path)
        sizes = storage.sizes(name)
        manifest = read_manifest(storage, name, tensor_entries=False, sizes=sizes)
        return cls.from_manifest(storage, name, manifest, sizes)

    @classmethod
    def from_manifest(cls, storage: Storage, name: str, manifest: dict[str, Any],
                      sizes: Mapping[str, int] | None = None) -> Checkpoint:
        """The record of checkpoint ``name`` whose checked manifest is given (``sizes``:
        its files' sizes, when a listing already has them)."""
        where = storage.where(name)
        if parse_step(name) not in (None, manifest["step"]):
            raise CorruptCheckpointError(
                f"{where}: the manifest says step {manifest['step']}, the folder name another")
        sizes = storage.sizes(name) if sizes is None else sizes
        try:
            return cls(
                step=manifest["step"],
                path=Path(where) if is_local(storage) else where,
                storage=storage,
                metrics=metrics_of(manifest),
                created=datetime.datetime.fromisoformat(manifest["created"]),
                nbytes=sum(sizes.values()),
                epoch=manifest.get("epoch"),
                tags=tuple(manifest.get("tags", ())),
                damaged=_size_mismatch(manifest["files"], sizes),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: malformed manifest field ({e})") from e


def committed_sizes(storage: Storage, name: str, manifest: Mapping[str, Any],
                    manifest_bytes: int) -> dict[str, int]:
    """The sizes of a checkpoint just committed: from its manifest, or (many ranks, format
    v4: the data files are in the ranks' indexes) from a listing."""
    if manifest["format_version"] >= INDEXED_FORMAT_VERSION and manifest.get("world_size", 1) > 1:
        return storage.sizes(name)
    sizes = {file: record["nbytes"] for file, record in manifest["files"].items()}
    return {**sizes, MANIFEST: manifest_bytes}


def list_checkpoints(run: Storage | str | os.PathLike[str]) -> list[Checkpoint]:
    """Committed checkpoints of a run, ascending by step; unreadable ones are skipped
    with a warning. Costs one listing and one manifest read per checkpoint (the
    reads run in parallel on an object store)."""
    storage = open_storage(run)
    listed = sorted(storage.committed(), key=lambda entry: entry.step)
    threads = 1 if is_local(storage) else 16

    def record(entry: Listed) -> Checkpoint | None:
        try:
            manifest = read_manifest(storage, entry.name, tensor_entries=False,
                                     sizes=entry.sizes)
            return Checkpoint.from_manifest(storage, entry.name, manifest, entry.sizes)
        except (CheckpointError, OSError) as e:
            log.warning("ignoring %s: %s", storage.where(entry.name), e)
            return None

    return [c for c in run_parallel(record, listed, threads=threads) if c is not None]


def open_checkpoint(checkpoint: Checkpoint | str | os.PathLike[str],
                    storage_options: Mapping[str, Any] | None = None) -> tuple[Storage, str]:
    """The storage and name of a checkpoint given as a record (which carries its
    storage), a path or a URL (opened with ``storage_options``)."""
    if isinstance(checkpoint, Checkpoint):
        if checkpoint.storage is not None:
            return checkpoint.storage, checkpoint.name
        checkpoint = checkpoint.path
    run, name = split_checkpoint(checkpoint)
    return open_storage(run, storage_options), name


def open_run(location: str | os.PathLike[str] | Storage,
             storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage of a run to write, refusing a file or a checkpoint given as the run.

    Raises:
        InvalidArgumentError: the location is a file, or a committed checkpoint.
    """
    storage = open_storage(location, storage_options)
    if isinstance(location, Storage):
        return storage
    if is_local(storage) and os.path.exists(location) and not os.path.isdir(location):
        raise InvalidArgumentError(f"{location} exists and is not a directory")
    parent, name = split_checkpoint(location)
    if name and is_committed(open_storage(parent, storage_options), name):
        raise InvalidArgumentError(
            f"{storage.location} is a checkpoint, not a run: new checkpoints would be nested "
            "inside it. Pass the run that holds the step-* checkpoints, "
            f"CheckpointManager({str(parent)!r})"
        )
    return storage


def is_committed(storage: Storage, name: str) -> bool:
    """Whether ``name`` is a committed checkpoint: a read of its manifest's first byte,
    not a listing (on an object store, listing the parent of a run would list the whole
    run), nor of the whole manifest (a damaged one may be huge)."""
    try:
        storage.read_ranges(name, [Range(MANIFEST, 0, memoryview(bytearray(1)))])
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False
    except CorruptCheckpointError:  # shorter than one byte: committed, and damaged
        pass
    return True


def is_local(storage: Storage) -> bool:
    """Whether the storage is a local directory (its records carry a ``Path``)."""
    return isinstance(storage, LocalStorage)


def _size_mismatch(files: dict[str, Any], sizes: Mapping[str, int]) -> str | None:
    """The first file of the manifest that is missing or not its recorded size, described."""
    for name, record in files.items():
        if name not in sizes:
            return f"{name} is missing (or not a regular file)"
        if sizes[name] != record["nbytes"]:
            return f"{name} has {sizes[name]} bytes, the manifest says {record['nbytes']}"
    return None


def metrics_of(manifest: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a checked manifest records, as floats (see :func:`metric_value`)."""
    metrics: dict[str, float] = decode(manifest.get("metrics", {}), _no_tensors)
    return {name: metric_value(value) for name, value in metrics.items()}


def metric_value(value: float) -> float:
    """A recorded metric (a JSON number) as a float: an integer too large for one, which
    only a hand-edited manifest holds, is infinite, as JSON's ``1e400`` already is."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


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
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise InvalidArgumentError(
                f"metric {name!r} = {value!r} is not a number that fits a float; pass e.g. "
                "loss.item()") from e
        if type(name) is not str:
            raise InvalidArgumentError(f"metric names must be str, got {name!r}")
        clean[name] = number if not math.isnan(number) else math.nan
    return clean

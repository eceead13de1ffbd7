"""The storage port: everything that touches a run's bytes at rest goes through a Storage.

A *run* is a directory or a URL prefix. Each checkpoint in it is a folder (or prefix)
named after its step, ``step-00000500``, holding the checkpoint's files and
``manifest.json``, written last: a checkpoint without its manifest does not exist.

Nothing above this port opens, maps, renames or deletes checkpoint files: the
manager, the catalogue, the readers and the CLI call a :class:`Storage`. Two
backends implement it:

- :class:`ckpts.storage._local.LocalStorage`: a local (or mounted) directory, with pwritev,
  early writeback, one fsync pass, atomic rename and flock;
- :class:`ckpts.storage._fsspec.FsspecStorage`: any fsspec URL (``s3://``, ``memory://``,
  ``gs://``...), with the manifest as the commit marker, parallel multipart uploads
  and ranged reads, and a lease object as the writer lock.

:func:`open_storage` picks one for a path or URL. A new backend implements the
methods of :class:`Storage` (docs/storage.md walks through the fsspec one).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, runtime_checkable

from ckpts.errors import CheckpointError, InvalidArgumentError

MANIFEST = "manifest.json"
HISTORY = ".ckpts-history.jsonl"
# What other frameworks leave in a run: torch.save, Lightning, Hugging Face Trainer.
FOREIGN_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

_STEP_NAME = re.compile(r"^step-(\d+)$")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def checkpoint_name(step: int) -> str:
    """A checkpoint's folder name: ``step-00000500``."""
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step in a checkpoint folder name, or None if it is not one."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def url_protocol(location: str | os.PathLike[str]) -> str | None:
    """``"s3"`` for ``"s3://bucket/run"``; None for a plain path."""
    match = _URL.match(location) if isinstance(location, str) else None
    return match.group(1).lower() if match else None


@dataclass(frozen=True)
class Listed:
    """A committed checkpoint as a listing finds it: its name and every file's size
    (the manifest's included), learned without reading any file."""

    name: str
    sizes: Mapping[str, int]
    shared: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """File -> an identity that another file of the run has too exactly when both are
    the same bytes at rest (a hard link's inode). A file missing here is its own: the
    default for backends whose copies are full copies."""

    @property
    def step(self) -> int:
        step = parse_step(self.name)
        if step is None:  # a backend's bug: committed() lists step-* names only
            raise InvalidArgumentError(f"{self.name!r} is not a checkpoint name (step-N)")
        return step


@dataclass(frozen=True)
class Range:
    """Bytes ``offset .. offset + len(view)`` of ``file``, to be read into ``view``."""

    file: str
    offset: int
    view: memoryview


@dataclass(frozen=True)
class Staged:
    """A checkpoint being written and not yet committed: ``where`` is the backend's
    place for it (a temporary folder, a prefix), opaque to callers."""

    name: str
    where: str


@runtime_checkable
class Storage(Protocol):
    """Where a run's checkpoints live. See the module docstring and docs/storage.md.

    Names are checkpoint folder names (``step-00000500``); files are plain names
    inside one checkpoint (``model.safetensors``), never paths.
    """

    location: str
    """The run, as users write it (a path or URL): for messages and :meth:`where`."""

    def where(self, name: str) -> str:
        """The location of one checkpoint of the run, as users would write it."""
        ...

    # --- reading (no lock needed) ---------------------------------------------------------

    def committed(self) -> list[Listed]:
        """Committed checkpoints (those with a manifest), in any order. A bounded number
        of requests: the listing alone, never a read per checkpoint. ``[]`` when the run
        does not exist."""
        ...

    def sizes(self, name: str) -> dict[str, int]:
        """Name -> size of every file of one checkpoint; ``{}`` when there is none."""
        ...

    def read(self, name: str, file: str) -> bytes:
        """One whole (small) file. Raises FileNotFoundError when it is absent."""
        ...

    def read_ranges(self, name: str, ranges: Sequence[Range]) -> None:
        """Fill every range's view from its file, in parallel.

        Raises:
            FileNotFoundError: a file is absent.
            CorruptCheckpointError: a file ends before a range does.
        """
        ...

    # --- writing (the run's one writer, holding the lock) ----------------------------------

    def stage(self, name: str) -> Staged:
        """Start writing checkpoint ``name``; nothing is visible until :meth:`commit`."""
        ...

    def write(self, staged: Staged, files: Sequence[tuple[str, Sequence[memoryview]]]) -> None:
        """Write every file (the concatenation of its parts) in parallel chunks. The
        parts must stay unchanged until this returns."""
        ...

    def write_stream(self, staged: Staged, file: str, pieces: Iterable[memoryview]) -> None:
        """Write one file from its pieces, in order. Each piece is written (or copied)
        before the next is asked for, so its memory may then be reused: a file that
        passes through a few host buffers (device tensors, ckpts._tensors.streaming). If the
        pieces raise, the error propagates and the file is left incomplete, for
        :meth:`abort` to remove."""
        ...

    def reuse(self, staged: Staged, source: str, file: str, nbytes: int) -> bool:
        """Put committed checkpoint ``source``'s ``file`` into ``staged`` as it is, without
        sending its bytes again (a hard link, a server-side copy), so that the new
        checkpoint holds the file whatever later happens to ``source``. False, with
        nothing staged, when the backend cannot, or the file is gone or is not
        ``nbytes`` long: the caller then writes the bytes itself."""
        ...

    def commit(self, staged: Staged, manifest: bytes) -> None:
        """Make the staged files durable, then publish the manifest: from then on the
        checkpoint is listed whole, never before. An older checkpoint of the same name
        is replaced, never mixed with the new one."""
        ...

    def abort(self, staged: Staged) -> None:
        """Remove what a failed save staged; never raises for what is already gone."""
        ...

    def delete(self, name: str) -> None:
        """Remove a committed checkpoint, manifest first, so no reader sees it half
        deleted. A checkpoint already gone counts as deleted."""
        ...

    def update(self, name: str, manifest: bytes) -> None:
        """Replace a committed checkpoint's manifest atomically (metrics, tags).

        Raises:
            FileNotFoundError: the checkpoint is not (or no longer) committed.
        """
        ...

    def clean(self, *, check_manifests: bool) -> list[str]:
        """Remove what killed saves and deletions left behind; return what was removed.
        With ``check_manifests=False`` skip looking for step folders that have no
        manifest (a cost per checkpoint on some backends)."""
        ...

    def lock(self) -> None:
        """Become the run's one writer (creating the run if needed).

        Raises:
            LockedError: another process is the writer; names it.
        """
        ...

    def unlock(self) -> None:
        """Give up being the writer."""
        ...

    def free_space(self) -> int | None:
        """Bytes that can still be written, or None when there is no such limit."""
        ...

    # --- the run's small files ---------------------------------------------------------

    def append_history(self, line: bytes) -> None:
        """Append one line to the run's metrics history (see ckpts._run.history)."""
        ...

    def read_history(self) -> bytes:
        """The run's metrics history; ``b""`` when there is none."""
        ...

    def foreign(self) -> list[str]:
        """Names in the run that look like another framework's checkpoints (a hint)."""
        ...


def coalesce(ranges: Sequence[Range], most: int) -> list[tuple[str, int, list[memoryview]]]:
    """The reads that fill ``ranges``: ``(file, offset, views)``, each of ``most`` bytes at
    most, for a backend that pays per request (a round trip, and money on a store).

    Ranges that follow each other in a file are read as one span, cut into pieces of
    ``most`` bytes whatever the tensor boundaries: a file's header and its many tensors
    take as few requests as its bytes need, not one per tensor.
    """
    reads: list[tuple[str, int, list[memoryview]]] = []
    end = size = 0
    for item in sorted(ranges, key=lambda r: (r.file, r.offset)):
        view, offset = memoryview(item.view).cast("B"), item.offset
        while view.nbytes:
            if not (reads and reads[-1][0] == item.file and offset == end
                    and size < most):
                reads.append((item.file, offset, []))
                size = 0
            take = min(view.nbytes, most - size)
            reads[-1][2].append(view[:take])
            view, offset, size = view[take:], offset + take, size + take
            end = offset
    return reads


_Backend = TypeVar("_Backend", bound=Storage)
_P = ParamSpec("_P")
_T = TypeVar("_T")


def as_os_errors(method: Callable[Concatenate[_Backend, _P], _T]
                 ) -> Callable[Concatenate[_Backend, _P], _T]:
    """Decorate a backend's method so that its client's own errors (botocore, aiohttp,
    ...) come out as OSError naming the run: the port's callers catch OSError only."""
    @functools.wraps(method)
    def wrapper(self: _Backend, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(self, *args, **kwargs)
        except (CheckpointError, OSError):
            raise
        except Exception as e:
            raise OSError(f"{self.location}: {type(e).__name__}: {e}") from e
    return wrapper


def open_storage(location: str | os.PathLike[str] | Storage,
                 storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage of a run: a Storage as it is, a path (or ``file://``) on the local
    disk, any other URL through fsspec.

    Raises:
        InvalidArgumentError: ``storage_options`` given for a local path, or an
            unusable location.
        CheckpointError: the URL's backend is not installed or refuses the URL
            (see :class:`ckpts.storage._fsspec.FsspecStorage`).
    """
    if isinstance(location, Storage):
        return location
    protocol = url_protocol(location)
    if protocol is None or (protocol == "file" and not storage_options):
        from ckpts.storage._local import LocalStorage

        if storage_options:
            raise InvalidArgumentError(
                f"storage_options only apply to URLs; {str(location)!r} is a local path")
        path = str(location)[len("file://"):] if protocol == "file" else location
        return LocalStorage(Path(path))
    from ckpts.storage._fsspec import FsspecStorage

    return FsspecStorage(str(location), storage_options or {})


def split_checkpoint(location: str | os.PathLike[str]) -> tuple[str | os.PathLike[str], str]:
    """``("s3://b/run", "step-00000500")`` for ``"s3://b/run/step-00000500"``; paths alike.
    A URL with no path (``"s3://bucket"``) is a run: ``(location, "")``."""
    if url_protocol(location) is not None:
        text = str(location).rstrip("/")
        run, _, name = text.rpartition("/")
        return (run, name) if not run.endswith(":/") else (text, "")
    path = Path(location).absolute()
    return path.parent, path.name

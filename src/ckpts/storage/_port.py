"""The storage port: everything that touches a run's bytes at rest goes through a Storage.

A *run* is a directory or a URL prefix. Each checkpoint in it is a folder (or prefix)
named after its step, ``step-00000500``, holding the checkpoint's files and
``manifest.json``, written last: a checkpoint without its manifest does not exist.

Nothing above this port opens, maps, links, renames or deletes a run's files: the
manager, the catalogue, the readers, the CLI and the integrations call a
:class:`Storage`. A backend subclasses it: the methods whose body is ``...`` are what
every backend must do; the others (optional capabilities: memory maps, an early fsync,
thread sizing, listing folders, exporting files to a local folder) have a default that a
backend overrides when it can do better. Two backends ship: ``LocalStorage``
(ckpts.storage._local) and ``FsspecStorage`` (ckpts.storage._fsspec); ``open_storage``
(ckpts.storage._open) picks one for a path or URL. docs/storage.md shows a third.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar, runtime_checkable

from ckpts.errors import CheckpointError, InvalidArgumentError
from ckpts.storage._parallel import threads_for

MANIFEST = "manifest.json"
HISTORY = ".ckpts-history.jsonl"
# What other frameworks leave in a run: torch.save, Lightning, Hugging Face Trainer.
FOREIGN_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

_STEP_NAME = re.compile(r"^step-([0-9]+)$")  # ASCII digits only, not any Unicode digit
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Bytes the default Storage.export copies at a time: one buffer of this size in memory.
_EXPORT_CHUNK = 64 * 2**20


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
    inside one checkpoint (``model.safetensors``), never paths. A backend subclasses
    this class and implements every method without a default; ``isinstance(x,
    Storage)`` holds for it (and for a class that has every member without subclassing).
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

    def update(self, name: str, edit: Callable[[bytes], bytes]) -> bytes:
        """Replace a committed checkpoint's manifest with ``edit(manifest)`` (metrics,
        tags), atomically, and serialized with every other update of it from any thread
        or process: two updates at once both count, neither is lost. ``edit`` may be
        called again on a newer manifest (a retry), so it must only compute. Returns the
        manifest written.

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

    def lock_token(self) -> str | None:
        """What an heir of this process needs to take the writer lock over once this
        process is dead (the memory tier's keeper), without waiting for the lock to lapse:
        None where the lock ends with its process (flock), or is not held."""
        return None

    def take_over(self, token: str | None) -> None:
        """Become the writer in place of a dead process that held the lock under
        ``token`` (from :meth:`lock_token`); with None, or by default, :meth:`lock`.

        Raises:
            LockedError: another process is the writer (not the dead one).
        """
        self.lock()

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

    # --- the run as a whole ---------------------------------------------------------------

    def destroy(self) -> None:
        """Delete the whole run: its checkpoints first, each as :meth:`delete` does (so no
        reader sees one half deleted), then everything else at the location (history,
        lock, leftovers, files of other tools) and the location itself.

        A file or a symbolic link at the location is removed itself, never what the link
        points to. A location that does not exist counts as destroyed. Killed midway, a
        destroy leaves a run of fewer, whole checkpoints; calling it again finishes.
        It takes no lock: call it when no process writes the run (on a store, the lease
        of a writer that exited without closing is deleted with the rest).
        """
        ...

    # --- optional capabilities: defaults a backend overrides when it can do better --------

    def map_file(self, name: str, file: str) -> memoryview | None:
        """The whole file, memory-mapped copy-on-write (writes through the view stay
        private to this process), or None when the backend cannot map files.

        Readers that copy the bytes elsewhere anyway (``load_weights``, ``diff``) hash them
        where they lie in the page cache and copy once, instead of reading into new memory
        first. Default: None, and callers read with :meth:`read_ranges`.

        Raises:
            FileNotFoundError: the file is absent (a backend that maps).
        """
        return None

    def sync(self, staged: Staged, files: Sequence[str]) -> None:
        """Make these staged files durable now, from this process's machine.

        The ranks of a job, maybe on other machines than the one that commits, call it
        on their own files before rank 0 commits: :meth:`commit` makes durable what the
        committing machine can reach. Default: nothing, right where a file is durable
        once written (an object store's completed upload).
        """
        return None

    def share_host(self, processes: int) -> None:
        """Say that ``processes`` processes of one job (the ranks of a torch.distributed
        job on this machine) share this host's cores, so that this storage sizes its
        thread pools, and :meth:`io_threads`, to its share. Default: ignored."""
        return None

    def io_threads(self) -> int:
        """How many threads a caller should use to feed this storage at once (files
        streamed through host buffers, reads into device tensors). Default: one a core,
        2 to 8."""
        return threads_for(1)

    def folders(self) -> list[str]:
        """The names of the folders (or prefixes) directly inside the run's location,
        sorted: its checkpoints and whatever other folders it holds, the runs of a
        folder of runs among them (``ckpts ls`` of a parent). ``[]`` when the location
        does not exist. Default: ``[]``, a backend that cannot list its location."""
        return []

    def export(self, name: str, files: Sequence[str], folder: str | os.PathLike[str], *,
               extra: Mapping[str, bytes] | None = None) -> Path:
        """Put committed checkpoint ``name``'s ``files``, and the small ``extra`` files
        (file -> bytes), into the local folder ``folder`` (created with its parents if
        needed): a plain folder for a tool that reads one (Trainer's
        ``resume_from_checkpoint``), or a copy of a checkpoint that outlives it.

        Each file is the same bytes linked where the backend can (LocalStorage: a hard
        link on the same filesystem), else a copy (from a store: a download); either way
        it stays whole whatever later happens to the checkpoint. The extra files are
        written first, then ``files`` in order, the manifest last when it is among them,
        so a folder that receives a whole checkpoint is one only once it is complete.
        Nothing is fsynced: this is a view or a working copy, not a save. The default
        copies through :meth:`read_ranges`, 64 MiB at a time.

        Returns:
            ``folder`` as a Path.

        Raises:
            FileNotFoundError: a file is not in the checkpoint (what came before it stays).
            FileExistsError: ``folder`` already holds a file of one of these names.
        """
        sizes = self.sizes(name)

        def copy(file: str, path: Path) -> None:
            if file not in sizes:
                raise FileNotFoundError(f"{self.where(name)}/{file}: no such file to export")
            with open(path, "xb") as out:
                buffer = memoryview(bytearray(min(sizes[file], _EXPORT_CHUNK)))
                for offset in range(0, sizes[file], _EXPORT_CHUNK):
                    piece = buffer[:min(_EXPORT_CHUNK, sizes[file] - offset)]
                    self.read_ranges(name, [Range(file, offset, piece)])
                    out.write(piece)

        return export_into(folder, files, extra, copy)


def export_into(folder: str | os.PathLike[str], files: Sequence[str],
                extra: Mapping[str, bytes] | None, put: Callable[[str, Path], None]) -> Path:
    """What every :meth:`Storage.export` does around its backend's own transfer: create
    ``folder``, write the ``extra`` files, then ``put(file, path)`` each file, the manifest
    last; a name already taken raises FileExistsError."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    for file, data in (extra or {}).items():
        with open(target / file, "xb") as out:
            out.write(data)
    for file in sorted(files, key=lambda f: f == MANIFEST):  # stable: the manifest last
        put(file, target / file)
    return target


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


def split_checkpoint(location: str | os.PathLike[str]) -> tuple[str | os.PathLike[str], str]:
    """``("s3://b/run", "step-00000500")`` for ``"s3://b/run/step-00000500"``; paths alike.
    A URL with no path (``"s3://bucket"``) is a run: ``(location, "")``."""
    if url_protocol(location) is not None:
        text = str(location).rstrip("/")
        run, _, name = text.rpartition("/")
        return (run, name) if not run.endswith(":/") else (text, "")
    path = Path(location).absolute()
    return path.parent, path.name

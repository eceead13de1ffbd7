"""DictStorage: a complete storage backend written from ``ckpts.storage``'s public names alone.

Every run lives in one dict of this process, ``path -> bytes``, where a path is
``LOCATION/NAME/FILE``. A save stages its files under ``LOCATION/.staged-NAME-ID/``;
the commit moves them under ``LOCATION/NAME/`` and adds the manifest, all while
holding one lock, so a checkpoint appears whole or not at all. The writer lock is a
table of which DictStorage object writes each location. docs/storage.md shows this
backend; tests/test_storage_conformance.py runs its whole suite on it, and the methods
with a default in the protocol (``export``, ``map_file``, ``sync``, ``io_threads``...)
are inherited.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Sequence

from ckpts.storage import (
    MANIFEST,
    CorruptCheckpointError,
    Listed,
    LockedError,
    Range,
    Staged,
    Storage,
    parse_step,
)

_FILES: dict[str, bytes] = {}  # "LOCATION/NAME/FILE" -> its bytes, for every run
_WRITERS: dict[str, DictStorage] = {}  # location -> the storage that holds its lock
_GUARD = threading.Lock()
_STAGED = ".staged-"
_HISTORY = ".history.jsonl"


class DictStorage(Storage):
    """A run kept in this process's memory (see the module docstring)."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")

    def __repr__(self) -> str:
        return f"DictStorage({self.location!r})"

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _below(self, prefix: str) -> dict[str, bytes]:
        """Path below ``prefix`` (relative) -> bytes."""
        start = prefix + "/"
        with _GUARD:
            return {path[len(start):]: data for path, data in _FILES.items()
                    if path.startswith(start)}

    def _drop(self, prefix: str) -> None:
        with _GUARD:
            for path in [p for p in _FILES if p.startswith(prefix + "/")]:
                del _FILES[path]

    def _checkpoints(self) -> dict[str, dict[str, int]]:
        """Step-folder name -> its files' sizes."""
        found: dict[str, dict[str, int]] = {}
        for path, data in self._below(self.location).items():
            name, _, file = path.partition("/")
            if parse_step(name) is not None and file and "/" not in file:
                found.setdefault(name, {})[file] = len(data)
        return found

    # --- reading ---------------------------------------------------------------------

    def committed(self) -> list[Listed]:
        return [Listed(name, sizes) for name, sizes in self._checkpoints().items()
                if MANIFEST in sizes]

    def sizes(self, name: str) -> dict[str, int]:
        return self._checkpoints().get(name, {})

    def read(self, name: str, file: str) -> bytes:
        try:
            return _FILES[f"{self.where(name)}/{file}"]
        except KeyError:
            raise FileNotFoundError(f"{self.where(name)}/{file}") from None

    def read_ranges(self, name: str, ranges: Sequence[Range]) -> None:
        for piece in ranges:
            data, view = self.read(name, piece.file), memoryview(piece.view).cast("B")
            end = piece.offset + view.nbytes
            if end > len(data):
                raise CorruptCheckpointError(f"{self.where(name)}/{piece.file} has "
                                             f"{len(data)} bytes, a read needs {end}")
            view[:] = data[piece.offset:end]

    # --- writing ---------------------------------------------------------------------

    def stage(self, name: str) -> Staged:
        return Staged(name, f"{self.location}/{_STAGED}{name}-{uuid.uuid4().hex[:8]}")

    def write(self, staged: Staged, files: Sequence[tuple[str, Sequence[memoryview]]]) -> None:
        for file, parts in files:
            _FILES[f"{staged.where}/{file}"] = b"".join(parts)  # a copy: parts may change

    def write_stream(self, staged: Staged, file: str, pieces: Iterable[memoryview]) -> None:
        data = bytearray()
        try:
            for piece in pieces:
                data += piece
        finally:  # what came before a failure stays, for abort to remove
            _FILES[f"{staged.where}/{file}"] = bytes(data)

    def reuse(self, staged: Staged, source: str, file: str, nbytes: int) -> bool:
        data = _FILES.get(f"{self.where(source)}/{file}")
        if data is None or len(data) != nbytes:
            return False
        _FILES[f"{staged.where}/{file}"] = data  # bytes never change: no copy needed
        return True

    def commit(self, staged: Staged, manifest: bytes) -> None:
        files = self._below(staged.where)
        with _GUARD:  # readers see the old checkpoint or the new one, never a mix
            final = self.where(staged.name)
            for path in [p for p in _FILES if p.startswith((staged.where + "/", final + "/"))]:
                del _FILES[path]
            for file, data in files.items():
                _FILES[f"{final}/{file}"] = data
            _FILES[f"{final}/{MANIFEST}"] = manifest

    def abort(self, staged: Staged) -> None:
        self._drop(staged.where)

    def delete(self, name: str) -> None:
        _FILES.pop(f"{self.where(name)}/{MANIFEST}", None)  # the manifest first
        self._drop(self.where(name))

    def update(self, name: str, edit: Callable[[bytes], bytes]) -> bytes:
        path = f"{self.where(name)}/{MANIFEST}"
        with _GUARD:  # one process's store: its lock serializes every update
            if path not in _FILES:
                raise FileNotFoundError(f"{self.where(name)} is not committed")
            _FILES[path] = edit(_FILES[path])
            return _FILES[path]

    def clean(self, *, check_manifests: bool) -> list[str]:
        removed = sorted({path.split("/", 1)[0] for path in self._below(self.location)
                          if path.startswith(_STAGED)})
        if check_manifests:
            removed += sorted(name for name, sizes in self._checkpoints().items()
                              if MANIFEST not in sizes)
        for name in removed:
            self._drop(self.where(name))
        return removed

    def lock(self) -> None:
        with _GUARD:
            holder = _WRITERS.setdefault(self.location, self)
        if holder is not self:
            raise LockedError(f"{self.location} is being written by {holder!r} of this "
                              "process; one run has one writer")

    def unlock(self) -> None:
        with _GUARD:
            if _WRITERS.get(self.location) is self:
                del _WRITERS[self.location]

    def free_space(self) -> int | None:
        return None

    # --- the run's small files, and the run as a whole -------------------------------------

    def append_history(self, line: bytes) -> None:
        with _GUARD:
            path = f"{self.location}/{_HISTORY}"
            _FILES[path] = _FILES.get(path, b"") + line

    def read_history(self) -> bytes:
        return _FILES.get(f"{self.location}/{_HISTORY}", b"")

    def foreign(self) -> list[str]:
        return []

    def folders(self) -> list[str]:
        return sorted({path.split("/", 1)[0] for path in self._below(self.location)
                       if "/" in path})

    def destroy(self) -> None:
        for listed in self.committed():
            self.delete(listed.name)
        self._drop(self.location)

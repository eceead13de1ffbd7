"""The memory tier's bytes: one rank's snapshots in host shared memory (``/dev/shm``).

Layout, under ``$CKPTS_MEMORY_DIR`` (default ``/dev/shm``)::

    ckpts-<uid>/                      this user's areas (mode 0700, owner checked)
      <run name>-<hash of the run>/   one per run: two runs never share snapshots
        rank-00000/                   one per rank of the job (a MemoryArea)
          .ckpts.lock                 flock of the process that owns the area
          slot-0/                     a snapshot: <object>.safetensors files, then
            model.safetensors         pending.json (the copy is complete) and, once
            pending.json              hashed, manifest.json (a format v2 manifest)
          slot-1/ ...

A slot's files are preallocated (``posix_fallocate``, so a full tmpfs is an error, never
a SIGBUS) and mapped shared and populated once, then reused from snapshot to snapshot:
a snapshot costs one copy into memory that already exists. Before a slot is filled its
markers are removed, so a slot whose copy was cut short has no marker and is never used.
The area is a :class:`LocalStorage` over the area folder, so a sealed slot is read
(and hash-checked) by the same code as any checkpoint; its slot names are not steps.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from ckpts.errors import CheckpointError, InsufficientSpaceError
from ckpts.storage import _io
from ckpts.storage._local import LocalStorage
from ckpts.storage._port import MANIFEST

MEMORY_DIR_ENV = "CKPTS_MEMORY_DIR"
DEFAULT_MEMORY_DIR = "/dev/shm"
PENDING = "pending.json"
"""A slot's first marker: the snapshot's manifest before its hashes (the copy is done)."""
_SLOT = re.compile(r"^slot-[0-9]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def memory_parent() -> Path:
    """Where this user's memory areas go: ``$CKPTS_MEMORY_DIR`` or ``/dev/shm``."""
    return Path(os.environ.get(MEMORY_DIR_ENV) or DEFAULT_MEMORY_DIR)


def run_folder(location: str) -> Path:
    """The folder of a run's memory areas: named from the run (readable, and a hash of its
    full location, so that two runs on one host never mix their snapshots)."""
    tail = _UNSAFE.sub("_", location.rstrip("/").rsplit("/", 1)[-1])[:40] or "run"
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    return memory_parent() / f"ckpts-{os.getuid()}" / f"{tail}-{key}"


def held_on_this_host(location: str) -> tuple[Path, dict[int, list[int]], int]:
    """What the memory tier holds of a run on this host, read without taking anything: its
    folder, each rank's snapshot steps (newest first), and the bytes its files hold."""
    folder = run_folder(location)
    steps: dict[int, list[int]] = {}
    held = 0
    for rank_folder in sorted(folder.glob("rank-[0-9]*")) if folder.is_dir() else []:
        if not rank_folder.name[5:].isdigit() or rank_folder.is_symlink():
            continue
        area = MemoryArea(location, int(rank_folder.name[5:]))
        found = []
        for slot in area.slots():
            held += area.held_bytes(slot)
            marked = area.marked_step(slot)
            if marked is not None:
                found.append(marked[0])
        steps[area.rank] = sorted(found, reverse=True)
    return folder, steps, held


class MemoryArea(LocalStorage):
    """One rank's snapshots of one run, in host shared memory (see the module docstring).

    Args:
        location: the run (its storage's location): names the area.
        rank: the rank whose snapshots these are.
    """

    def __init__(self, location: str, rank: int) -> None:
        super().__init__(run_folder(location) / f"rank-{rank:05d}")
        self.rank = rank
        self._maps: dict[tuple[str, str], tuple[int, memoryview]] = {}  # (slot, file) -> map

    def __repr__(self) -> str:
        return f"MemoryArea({self.location!r})"

    def create(self) -> None:
        """Make the area's folders, refusing a parent that is not this user's own folder
        (a shared ``/dev/shm`` is writable by every user).

        Raises:
            CheckpointError: the parent is missing, or a folder on the way is a symbolic
                link or another user's; names it and the fix.
        """
        parent = memory_parent()
        if not parent.is_dir():
            raise CheckpointError(
                f"the memory tier's folder {parent} does not exist; create it, or set "
                f"{MEMORY_DIR_ENV} to a folder on a tmpfs (host memory)")
        user = parent / f"ckpts-{os.getuid()}"
        for folder in (user, self.run.parent, self.run):
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            found = os.lstat(folder)
            if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
                raise CheckpointError(
                    f"{folder} is not a folder of this user (a symbolic link, a file or "
                    f"another user's); the memory tier will not write there. Remove it, or "
                    f"set {MEMORY_DIR_ENV} to another folder")

    def free_bytes(self) -> int:
        """Bytes the memory filesystem can still give (free pages of the tmpfs)."""
        found = os.statvfs(self.run if self.run.exists() else memory_parent())
        return found.f_bavail * found.f_frsize

    def held_bytes(self, slot: str) -> int:
        """Bytes the slot's files hold now."""
        folder = self.run / slot
        if not folder.is_dir():
            return 0
        with os.scandir(folder) as entries:
            return sum(e.stat(follow_symlinks=False).st_size for e in entries
                       if e.is_file(follow_symlinks=False))

    def slots(self) -> list[str]:
        """The slot folders present, in name order."""
        try:
            with os.scandir(self.run) as entries:
                return sorted(e.name for e in entries
                              if _SLOT.match(e.name) and e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def map_slot(self, slot: str, sizes: Mapping[str, int]) -> dict[str, memoryview]:
        """The slot's files of these sizes, each mapped shared and writable, for a snapshot
        to be copied into: kept mapped from call to call, and a file already of its size
        is mapped as it is (its snapshot stays valid). Where a file must be made anew (of
        another size; old mappings of it stay valid) or removed (not named), the slot's
        snapshot is taken away first.

        Raises:
            InsufficientSpaceError: the memory filesystem cannot hold them (nothing is
                left half-allocated).
        """
        folder = self.run / slot
        folder.mkdir(mode=0o700, exist_ok=True)
        with os.scandir(folder) as entries:
            present = {e.name: e.stat(follow_symlinks=False) for e in entries
                       if e.name not in (MANIFEST, PENDING)}
        keep = {name for name, found in present.items() if stat.S_ISREG(found.st_mode)
                and sizes.get(name) == found.st_size}
        if set(present) - keep or set(sizes) - keep:
            self.clear(slot)
        for name in set(present) - set(sizes):
            self._maps.pop((slot, name), None)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(folder / name)
        views = {}
        for name, size in sizes.items():
            held = self._maps.get((slot, name))
            if held is None or held[0] != size:
                held = self._maps[slot, name] = (size, self._map(folder / name, size,
                                                                  new=name not in keep))
            views[name] = held[1]
        return views

    def _map(self, path: Path, size: int, *, new: bool) -> memoryview:
        """``path`` mapped shared and writable, populated: made anew (allocated whole) or,
        without ``new``, as it is."""
        if new:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if new else 0)
        fd = os.open(path, flags, 0o600)
        try:
            try:
                if size and new:
                    os.posix_fallocate(fd, 0, size)
            except OSError as e:
                os.unlink(path)
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise InsufficientSpaceError(
                    f"the memory tier's folder {memory_parent()} (a tmpfs of host memory) "
                    f"has room for {self.free_bytes()} more bytes, not the {size} of "
                    f"{path.name}: give it more (docker run --shm-size=..., or mount a "
                    f"larger tmpfs and set {MEMORY_DIR_ENV} to it) or save without memory=",
                    needed=size, free=self.free_bytes()) from e
            if size == 0:
                return memoryview(bytearray())
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            return memoryview(mmap.mmap(fd, size, flags=flags,
                                        prot=mmap.PROT_READ | mmap.PROT_WRITE))
        finally:
            os.close(fd)

    def read_marker(self, slot: str, marker: str) -> bytes | None:
        """A marker's bytes (PENDING or the manifest), or None if the slot has none."""
        try:
            fd = _io.open_regular(self.run / slot / marker)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with os.fdopen(fd, "rb") as file:
            return file.read()

    def marked_step(self, slot: str) -> tuple[int, bool] | None:
        """The step of the slot's snapshot and whether it is hashed (its manifest is
        written), or None: no marker, or one that is damaged or not a file."""
        for marker, sealed in ((MANIFEST, True), (PENDING, False)):
            try:
                data = self.read_marker(slot, marker)
                if data is None:
                    continue
                step = json.loads(data)["step"]
            except (OSError, CheckpointError, ValueError, KeyError, TypeError):
                return None
            return (step, sealed) if type(step) is int and step >= 0 else None
        return None

    def write_marker(self, slot: str, marker: str, data: bytes) -> None:
        """Write a marker whole or not at all (a temporary file renamed into place)."""
        temporary = self.run / slot / f".{marker}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, self.run / slot / marker)

    def clear(self, slot: str) -> None:
        """Take the slot's snapshot away (its markers, the manifest first), keeping its
        files for the next snapshot."""
        for marker in (MANIFEST, PENDING):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(self.run / slot / marker)

    def clear_pending(self, slot: str) -> None:
        """Remove the pending marker of a slot whose manifest is written."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.run / slot / PENDING)

    def free(self) -> None:
        """Remove the area (every slot), then the run's folder if no other rank's is left."""
        self._maps.clear()
        shutil.rmtree(self.run, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.run.parent)

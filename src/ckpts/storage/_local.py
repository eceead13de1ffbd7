"""LocalStorage: a run on a local (or mounted) disk, with an atomic, durable commit.

Layout of a run directory::

    run/
      step-00000500/            committed: holds manifest.json (written last)
      .tmp-step-00000600-ab12/  a save in progress (or killed): never listed
      .trash-step-00000100-cd34/ a checkpoint being deleted: never listed
      .replaced-step-00000500-ef56/ an older checkpoint of a step being saved again
      .ckpts.lock               the writer lock (flock, see ckpts.storage._lock)
      .ckpts-updates.lock       held for one metadata update at a time (the same module)
      .ckpts-history.jsonl      the metrics history (see ckpts._run.history)

A save writes into a ``.tmp-`` sibling (pwritev from many threads, see ckpts.storage._io),
fsyncs every file and the directory, then renames it into place and fsyncs the
parent, so a checkpoint either exists whole or not at all. Deletion renames to
``.trash-`` first, then removes, so no reader sees a half-deleted checkpoint as valid.
Files are read only if they are regular files, never through a symbolic link, and the
run's own files (locks, history) are never written through one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ckpts.storage import _io, _lock
from ckpts.storage._parallel import run_parallel, threads_for
from ckpts.storage._port import (
    FOREIGN_SUFFIXES,
    HISTORY,
    MANIFEST,
    Listed,
    Range,
    Staged,
    Storage,
    export_into,
    parse_step,
)

log = logging.getLogger("ckpts")

_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_REPLACED_PREFIX = ".replaced-"
# Enough concurrent fsyncs to share one journal commit, few enough to stay cheap.
_FSYNC_THREADS = 16


class LocalStorage(Storage):
    """A run directory on a local or mounted filesystem (see the module docstring)."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.location = str(run)
        self._processes = 1  # of one job on this host: see share_host

    def __repr__(self) -> str:
        return f"LocalStorage({self.location!r})"

    def where(self, name: str) -> str:
        return str(self.run / name)

    def committed(self) -> list[Listed]:
        """Committed checkpoints: a scan of the run, and one of each checkpoint. A
        symlink is never a checkpoint: it could point anywhere."""
        found = []
        try:
            with os.scandir(self.run) as entries:
                names = [e.name for e in entries
                         if parse_step(e.name) is not None and e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        for name in names:
            stats = self._stats(name)
            if MANIFEST in stats:
                found.append(Listed(name, {file: st.st_size for file, st in stats.items()},
                                    {file: f"{st.st_dev}:{st.st_ino}"
                                     for file, st in stats.items() if st.st_nlink > 1}))
        return found

    def sizes(self, name: str) -> dict[str, int]:
        return {file: st.st_size for file, st in self._stats(name).items()}

    def _stats(self, name: str) -> dict[str, os.stat_result]:
        try:
            with os.scandir(self.run / name) as entries:
                return {e.name: e.stat(follow_symlinks=False) for e in entries
                        if e.is_file(follow_symlinks=False)}
        except (FileNotFoundError, NotADirectoryError):
            return {}

    def read(self, name: str, file: str) -> bytes:
        path = self.run / name / file
        try:
            fd = _io.open_regular(path)
        except NotADirectoryError as e:  # the checkpoint is a file
            raise FileNotFoundError(f"{path}: {e}") from e
        with open(fd, "rb") as f:
            return f.read()

    def read_ranges(self, name: str, ranges: Sequence[Range]) -> None:
        by_file: dict[str, list[tuple[int, memoryview]]] = {}
        for piece in ranges:
            by_file.setdefault(piece.file, []).append((piece.offset, piece.view))
        _io.read_ranges([(self.run / name / file, pieces) for file, pieces in by_file.items()],
                        threads=self.io_threads())

    def map_file(self, name: str, file: str) -> memoryview:
        """The whole file, a copy-on-write memory map (symbolic links refused)."""
        return _io.map_file(self.run / name / file)

    def share_host(self, processes: int) -> None:
        """Fewer threads for reads and writes when the ranks of a job share the cores."""
        self._processes = max(1, processes)

    def io_threads(self) -> int:
        return _io.IO_THREADS if self._processes == 1 else threads_for(self._processes)

    def stage(self, name: str) -> Staged:
        self.run.mkdir(parents=True, exist_ok=True)
        staging = self.run / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        return Staged(name, str(staging))

    def write(self, staged: Staged, files: Sequence[tuple[str, Sequence[memoryview]]]) -> None:
        _io.write_files([(Path(staged.where) / file, parts) for file, parts in files],
                        threads=self.io_threads())

    def write_stream(self, staged: Staged, file: str, pieces: Iterable[memoryview]) -> None:
        _io.write_stream(Path(staged.where) / file, pieces)

    def sync(self, staged: Staged, files: Sequence[str]) -> None:
        """fsync these staged files now: rank 0's fsync at commit reaches only its own
        machine's cache."""
        _fsync_files([Path(staged.where) / file for file in files])

    def reuse(self, staged: Staged, source: str, file: str, nbytes: int) -> bool:
        """A hard link: both checkpoints name the same bytes, which stay on disk until
        the last checkpoint holding them is deleted. The file was made durable when
        ``source`` was committed; :meth:`commit` makes the new name durable."""
        path = self.run / source / file
        try:
            if path.is_symlink() or path.stat().st_size != nbytes:
                return False
            os.link(path, Path(staged.where) / file)
        except OSError as e:  # no hard links here (EXDEV, EPERM), or the file is gone
            log.info("could not link %s (%s); writing it instead", path, e)
            return False
        return True

    def commit(self, staged: Staged, manifest: bytes) -> None:
        """fsync every staged file, the manifest and the directory together (see
        :func:`_make_durable`), then rename the directory into place and fsync the run.

        An existing checkpoint of the same name is set aside first and removed only
        after the new one is in place, so a crash in between leaves one of the two
        committed (see :meth:`clean`).
        """
        staging = Path(staged.where)
        (staging / MANIFEST).write_bytes(manifest)
        _make_durable(staging)
        final = self.run / staged.name
        replaced = _rename_aside(final, _REPLACED_PREFIX) if final.exists() else None
        os.rename(staging, final)
        _fsync_dir(self.run)
        if replaced is not None:
            shutil.rmtree(replaced)

    def abort(self, staged: Staged) -> None:
        shutil.rmtree(staged.where, ignore_errors=True)

    def delete(self, name: str) -> None:
        try:
            aside = _rename_aside(self.run / name, _TRASH_PREFIX)
        except FileNotFoundError:
            log.info("%s was already gone when it came to be deleted", self.where(name))
            return
        shutil.rmtree(aside)

    def update(self, name: str, edit: Callable[[bytes], bytes]) -> bytes:
        """Under the run's update lock (see ckpts.storage._lock.updating): read the
        manifest, write ``edit(manifest)`` into a temporary file of its own beside it,
        fsync it and rename it over the old one. A failure (a full disk) removes the
        temporary file and leaves the old manifest."""
        directory = self.run / name
        with _lock.updating(self.run):
            manifest = edit(self.read(name, MANIFEST))
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST}.",
                                             suffix=".tmp")
            try:
                os.fchmod(fd, stat.S_IMODE(os.stat(directory / MANIFEST).st_mode))  # not 0600
                with open(fd, "wb") as f:
                    f.write(manifest)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, directory / MANIFEST)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
            _fsync_dir(directory)
        return manifest

    def clean(self, *, check_manifests: bool) -> list[str]:
        """Staging and trash directories go, and so do ``step-*`` directories that have
        no manifest (never committed; finding those costs a stat per checkpoint,
        skipped with ``check_manifests=False``). If a crash hit between setting aside
        an older checkpoint of the same step and renaming its replacement in, the
        older one is put back instead of being deleted."""
        removed: list[str] = []
        if not self.run.is_dir():
            return removed
        with os.scandir(self.run) as scan:  # names and types only: no stat per entry
            names = sorted(e.name for e in scan if e.is_dir(follow_symlinks=False))
        for name in names:
            path = self.run / name
            if name.startswith(_REPLACED_PREFIX):
                original = self.run / name[len(_REPLACED_PREFIX):].rsplit("-", 1)[0]
                if not original.exists():
                    os.rename(path, original)
                    log.warning("restored %s after an interrupted replace", original)
                    continue
            elif not name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and (
                not check_manifests or parse_step(name) is None or (path / MANIFEST).is_file()
            ):
                continue
            shutil.rmtree(path)
            removed.append(name)
        if removed:
            _fsync_dir(self.run)
            log.info("removed %d leftover(s) of interrupted saves in %s", len(removed), self.run)
        return removed

    def lock(self) -> None:
        _lock.acquire(self.run)

    def unlock(self) -> None:
        _lock.release(self.run)

    def free_space(self) -> int | None:
        try:
            return shutil.disk_usage(self.run if self.run.exists() else self.run.parent).free
        except OSError:
            return None

    def append_history(self, line: bytes) -> None:
        """One ``write`` on a file opened with ``O_APPEND``, so lines from concurrent
        writers (a training process and an evaluation job) do not interleave. A line
        torn by a crash is ended first, so this one stays whole."""
        fd = os.open(self.run / HISTORY,
                     os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO would block once full
                raise OSError(errno.EPERM, f"{self.run / HISTORY} is not a regular file")
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)

    def read_history(self) -> bytes:
        try:
            fd = _io.open_regular(self.run / HISTORY)
        except FileNotFoundError:  # a symbolic link counts as none
            return b""
        with open(fd, "rb") as f:
            return f.read()

    def foreign(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.run))
        except OSError:
            return []
        return [n for n in names if n.endswith(FOREIGN_SUFFIXES)
                or (n.startswith("checkpoint-") and (self.run / n).is_dir())]

    def folders(self) -> list[str]:
        """Sub-directories, and symbolic links to directories."""
        try:
            with os.scandir(self.run) as entries:
                return sorted(e.name for e in entries if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def export(self, name: str, files: Sequence[str], folder: str | os.PathLike[str], *,
               extra: Mapping[str, bytes] | None = None) -> Path:
        """Hard links (a copy where the filesystem has none, or ``folder`` is on another);
        a file of the checkpoint that is a symbolic link counts as absent."""
        def link(file: str, path: Path) -> None:
            source = self.run / name / file
            if source.is_symlink() or not source.is_file():
                raise FileNotFoundError(f"{source}: no such file to export")
            try:
                os.link(source, path)
            except FileExistsError:
                raise
            except OSError as e:  # EXDEV, EPERM: no hard link from here to there
                log.debug("could not link %s (%s); copying it", source, e)
                with open(source, "rb") as f, open(path, "xb") as out:
                    shutil.copyfileobj(f, out, _io.CHUNK)

        return export_into(folder, files, extra, link)

    def destroy(self) -> None:
        """Each checkpoint renamed aside and removed, then the directory; a symbolic link
        or a file at the run's path is unlinked."""
        if self.run.is_symlink() or self.run.is_file():
            self.run.unlink(missing_ok=True)
            return
        for listed in self.committed():
            self.delete(listed.name)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.run)


def _make_durable(directory: Path) -> None:
    """fsync every file of ``directory`` and the directory itself, concurrently.

    Concurrent fsyncs share one journal commit (ext4, xfs), where one after another
    each pays for its own: for a small checkpoint this is most of the save's time.
    """
    with os.scandir(directory) as entries:
        paths = [Path(e.path) for e in entries if e.is_file(follow_symlinks=False)]
    _fsync_files([*paths, directory])


def _fsync_files(paths: Sequence[Path]) -> None:
    """fsync files (and directories) concurrently: they share journal commits."""
    fds: list[int] = []
    try:
        fds += [os.open(p, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if p.is_dir() else 0))
                for p in paths]
        run_parallel(os.fsync, fds, threads=_FSYNC_THREADS)
    finally:
        for fd in fds:
            os.close(fd)


def _rename_aside(path: Path, prefix: str) -> Path:
    aside = path.parent / f"{prefix}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, aside)
    _fsync_dir(path.parent)
    return aside


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

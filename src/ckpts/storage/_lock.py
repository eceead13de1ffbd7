"""One writer per run: an advisory lock on ``<run>/.ckpts.lock``.

The lock is an ``flock`` held for as long as the writing process lives (or until
``CheckpointManager.close()``), so the kernel drops it when that process dies,
even by SIGKILL: a lock left by a killed process is recovered by the next writer
without any cleanup. The file records who holds it (host, pid, since) for the
error a second writer gets. Managers in one process share the lock: the process
is the writer. ``restore()`` takes it too, since a run that restores is about to
write: a duplicate launch fails before it trains. Readers (listing, load_weights,
verify) and metadata updates (add_metrics, pin) never take it.

flock is reliable on local filesystems; on NFS it depends on the mount options,
so give each run one writer by design there.

Metadata updates (add_metrics, pin) of committed checkpoints are serialized by a second
lock, ``<run>/.ckpts-updates.lock``, held for one read-modify-write of one manifest
(:func:`updating`): an evaluation job never waits for the writer, nor the writer for it.
Neither lock file is followed if it is a symbolic link (a run copied from elsewhere).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ckpts.errors import LockedError

LOCK_FILE = ".ckpts.lock"
UPDATES_FILE = ".ckpts-updates.lock"
_UPDATE_WAIT = 60.0  # seconds an update waits for another one before giving up

# realpath of the run -> [fd, number of managers of this process using it]
_HELD: dict[str, list[int]] = {}
_GUARD = threading.Lock()


def acquire(run: Path) -> None:
    """Take the run's writer lock for this process (shared by its managers).

    Raises:
        LockedError: another process holds it; names that process's host and pid.
    """
    run.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run)
    with _GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return
        fd = _open_lock_file(Path(key) / LOCK_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(
                f"{run} is being written by another process ({holder}); one run has one "
                "writer. Wait for it to finish, or write to another directory. Reading "
                "(ls, load_weights, verify) needs no lock."
            ) from e
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[key] = [fd, 1]


def release(run: Path) -> None:
    """Drop one manager's share of the lock; the last one unlocks."""
    key = os.path.realpath(run)
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            os.close(held[0])  # closing the descriptor releases the flock


@contextlib.contextmanager
def updating(run: Path) -> Iterator[None]:
    """Hold the run's update lock for one read-modify-write of a manifest: one at a time
    across the threads and processes of this host (each takes its own descriptor, and
    flock excludes descriptors, not processes).

    Raises:
        LockedError: another update held it for a minute (a process stopped mid-update).
        OSError: the lock file cannot be created, or is not a regular file.
    """
    fd = _open_lock_file(run / UPDATES_FILE)
    try:
        deadline = time.monotonic() + _UPDATE_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockedError(
                        f"{run / UPDATES_FILE} has been held by another metadata update for "
                        f"{_UPDATE_WAIT:g} s; is a process stopped in add_metrics or pin? "
                        f"Try again once it finishes") from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # releases the flock


def _open_lock_file(path: Path) -> int:
    """Open (or create) one of the run's lock files, never through a symbolic link.

    Raises:
        OSError: it is a symbolic link or not a regular file; the message says to remove it.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        fd = -1
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise OSError(errno.EPERM, f"{path} is a symbolic link or not a regular file; ckpts "
                                   f"never follows a run's own files out of it: remove it")
    return fd


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        host, pid, since = (info.get(k, "?") for k in ("host", "pid", "since"))
        return f"host {host}, pid {pid}, since {since}"
    except (OSError, ValueError):
        return "holder unknown"

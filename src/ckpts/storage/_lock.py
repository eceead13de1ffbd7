"""One writer per run: an advisory lock on ``<run>/.ckpts.lock``.

The lock is an ``flock`` held for as long as the writing process lives (or until
``CheckpointManager.close()``), so the kernel drops it when that process dies,
even by SIGKILL: a lock left by a killed process is recovered by the next writer
without any cleanup. The file records who holds it (host, pid, since) for the
error a second writer gets. Managers in one process share the lock: the process
is the writer. ``restore()`` takes it too, since a run that restores is about to
write: a duplicate launch fails before it trains. Readers (listing, load_weights,
verify) and metadata updates (add_metrics, pin) never lock.

flock is reliable on local filesystems; on NFS it depends on the mount options,
so give each run one writer by design there.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
from pathlib import Path

from ckpts.errors import LockedError

LOCK_FILE = ".ckpts.lock"

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
        path = Path(key) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        host, pid, since = (info.get(k, "?") for k in ("host", "pid", "since"))
        return f"host {host}, pid {pid}, since {since}"
    except (OSError, ValueError):
        return "holder unknown"

"""The keeper: a process that outlives its trainer and persists its newest memory snapshot.

A trainer with ``memory=`` (one process) starts one keeper, in a session of its own, so a
SIGKILL of the trainer's process group, an OOM kill or a segfault leaves it running. The
trainer's first message on the keeper's stdin says what to keep (the run, its storage
options, the writer lock's token); ``close`` ends the keeper once the trainer has made
its newest state durable itself. The keeper notices a trainer that died without
``close()``, by the end of its stdin or by a new parent process, and then "persists at
the breakpoint": it takes the memory area and the run's writer lock (over from the dead
trainer: see Storage.take_over), and if the newest intact snapshot is newer than the
run's newest checkpoint, writes it into the run as an ordinary committed checkpoint
(hashes, manifest last). Then it exits; the snapshots stay in memory for the restart.

Run as ``python -m ckpts._run.keeper``; nothing else calls :func:`main`.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from typing import IO, TYPE_CHECKING, Any, cast

from ckpts.errors import CheckpointError, LockedError

if TYPE_CHECKING:
    from ckpts._run.memory import MemoryTier
    from ckpts._run.writer import RunWriter
    from ckpts.storage import Storage

log = logging.getLogger("ckpts")

TAKE_WAIT = 30.0
"""Seconds the keeper waits for the area and the run's lock: a dead trainer's data-loader
workers hold its flocks until they notice and exit."""
_POLL = 0.2  # seconds between looks at the trainer


class Keeper:
    """The trainer's handle on its keeper process.

    Args:
        config: what the keeper needs: ``run``, ``storage_options``, ``lease`` (the
            writer lock's token), ``max_shard_size``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        message = json.dumps({**config, "trainer": os.getpid()}) + "\n"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "ckpts._run.keeper"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        self._pipe = cast(IO[bytes], self._process.stdin)  # stdin=PIPE: always a pipe
        self._pipe.write(message.encode())
        self._pipe.flush()

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        """End the keeper: the trainer made its state durable (or chose not to)."""
        try:
            self._pipe.write(b"close\n")
            self._pipe.close()
        except OSError:
            pass  # the keeper is gone already
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="ckpts keeper: %(message)s")
    messages = _Messages(sys.stdin.fileno())
    first = messages.next(timeout=None)
    if not first:
        return 0
    config = json.loads(first)
    # torch and the write path are imported only once there is something to persist: a
    # keeper that starts beside a trainer takes none of the trainer's CPU time
    if not _trainer_died(messages, int(config["trainer"])):
        return 0
    try:
        persist(config)
    except Exception as e:
        log.error("could not persist the newest memory snapshot of %s: %s (it stays in host "
                  "memory: restarting the job on this host restores it)", config["run"], e)
        return 1
    return 0


class _Messages:
    """The trainer's lines on a pipe, read unbuffered so that waiting can time out."""

    def __init__(self, fd: int) -> None:
        self.fd, self._buffer, self.ended = fd, b"", False

    def next(self, timeout: float | None) -> str | None:
        """The next line; None when none came within ``timeout``, "" once the pipe ended
        (every holder of its other end is gone: the trainer and its forked workers)."""
        while b"\n" not in self._buffer:
            if self.ended:
                return ""
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            data = os.read(self.fd, 65536)
            self.ended = not data
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


def _trainer_died(messages: _Messages, trainer: int) -> bool:
    """Wait for the trainer: False when it says ``close``, True when it is gone."""
    while True:
        line = messages.next(timeout=_POLL)
        if line == "close":
            return False
        if line == "" or os.getppid() != trainer:  # the pipe ended, or we were reparented
            return True


def persist(config: dict[str, Any]) -> int | None:
    """Write the newest intact snapshot into the run if it is newer than the run's newest
    checkpoint. Returns the step persisted, or None."""
    from ckpts._format.catalog import open_run
    from ckpts._run.memory import MemoryTier
    from ckpts._run.writer import RunWriter

    tier = MemoryTier(config["run"], 0)
    try:
        tier.own(wait=TAKE_WAIT)
    except LockedError:
        log.info("a new trainer owns the memory snapshots of %s: nothing to do", config["run"])
        return None
    try:
        storage = open_run(config["run"], config.get("storage_options"))
        writer = RunWriter(storage, storage.location)
        _take_run(storage, writer, config.get("lease"))
        try:
            return _persist_newest(tier, storage, writer, int(config["max_shard_size"]))
        finally:
            writer.unlock()
    finally:
        tier.close(free=False)


def _take_run(storage: Storage, writer: RunWriter, token: str | None) -> None:
    deadline = time.monotonic() + TAKE_WAIT
    while True:
        try:
            storage.take_over(token)
            writer.locked = True
            return
        except LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(_POLL)


def _persist_newest(tier: MemoryTier, storage: Storage, writer: RunWriter,
                    max_shard_size: int) -> int | None:
    from ckpts._checkpoint.job import OneProcess
    from ckpts._format.catalog import metrics_of
    from ckpts._run import history
    from ckpts.storage import checkpoint_name

    listed = storage.committed()
    run_newest = max((entry.step for entry in listed), default=None)
    for snapshot in tier.found():
        if run_newest is not None and snapshot.step <= run_newest:
            log.info("the run %s already holds step %d: nothing to persist", storage.location,
                     run_newest)
            return None
        try:
            manifest, snapshots = tier.read(snapshot)  # every tensor checked against its hash
        except CheckpointError as e:
            log.warning("skipping the memory snapshot of step %d: %s", snapshot.step, e)
            continue
        name = checkpoint_name(snapshot.step)
        pending = writer.begin(name)
        metrics = metrics_of(manifest)
        try:
            OneProcess().write(storage, snapshot.step, snapshots, stage=pending.stage,
                               commit=pending.commit, metrics=metrics, epoch=manifest["epoch"],
                               max_shard_size=max_shard_size, reusable=None,
                               before_writing=lambda nbytes, reused: None)
        except BaseException:
            pending.abort()
            raise
        history.append(storage, snapshot.step, metrics)
        log.warning("the trainer died: persisted step %d from host memory to %s",
                    snapshot.step, storage.where(name))
        return snapshot.step
    return None


if __name__ == "__main__":
    sys.exit(main())

"""The writer lease of a run on an object store: a small JSON object renewed by a thread.

Object stores have no flock. The run's one writer holds ``RUN/.ckpts.lock``, a JSON object
``{owner, host, pid, since, expires}`` (unix times), and a daemon thread rewrites it every
``seconds / 3``. A writer that was killed frees the run when its lease expires, at most
``seconds`` after its last renewal; a live writer's lease is refused to everyone else.
Expiry compares the holder's clock with the taker's, so the hosts' clocks should agree (NTP).

Every write of the lease is conditional on the version this process read or wrote last
(ckpts.storage._versioned: ``If-Match`` on S3): of two takers of an expired lease exactly
one wins, and a renewal fails once another writer has taken the lease over.

A writer can also stall past its expiry (a GC pause, a suspended VM, SIGSTOP) and wake to
find the run taken over. So the storage calls :meth:`Lease.prove` before every request
that deletes or overwrites: free while the lease has time left by this host's clock, a
conditional renewal when it is running out; it raises once the lease is another's. What
it cannot stop is a request already sent when the process froze.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from ckpts.errors import LockedError
from ckpts.storage._versioned import ConflictError, VersionedObjects

log = logging.getLogger("ckpts")


class Lease:
    """One writer's lease on ``path`` of an fsspec filesystem.

    Args:
        objects: the filesystem's conditional reads and writes.
        path: the lease object's path in it.
        location: the run as users write it, for messages.
        seconds: how long the lease lasts without renewal.
    """

    def __init__(self, objects: VersionedObjects, path: str, *, location: str,
                 seconds: float) -> None:
        self.objects, self.path, self.location, self.seconds = objects, path, location, seconds
        self.owner = uuid.uuid4().hex
        self.lost = False
        """Set when another writer took the lease over (this one stalled past expiry)."""
        self._version: str | None = None  # of the lease as this writer last wrote it
        self._expires = 0.0  # by this host's clock, as this writer last wrote it
        self._guard = threading.Lock()  # one renewal at a time: the thread's or prove()'s
        self._renewer: tuple[threading.Thread, threading.Event] | None = None

    def __repr__(self) -> str:
        return f"Lease({self.location!r}, seconds={self.seconds}, held={self._renewer is not None})"

    @property
    def held(self) -> bool:
        """Whether this process holds the lease (and keeps renewing it)."""
        return self._renewer is not None

    def acquire(self, *, heir_of: str | None = None) -> None:
        """Take the lease and keep renewing it; a no-op while held. With ``heir_of``, a
        live lease whose owner is that (a process known to be dead) is taken over too.

        Raises:
            LockedError: another writer holds a live lease; names its host, pid and expiry.
        """
        if self._renewer is not None:
            return
        found = self.objects.get(self.path)
        lease = _parse(found[0]) if found else None
        if lease is not None and float(lease.get("expires", 0)) > time.time() \
                and (heir_of is None or lease.get("owner") != heir_of):
            raise self._refused(lease)
        try:
            self._write(version=found[1] if found else None)
        except ConflictError as e:  # another taker was first
            again = self.objects.get(self.path)
            raise self._refused(_parse(again[0]) if again else None) from e
        self.lost = False
        stop = threading.Event()
        thread = threading.Thread(target=self._renew, args=(stop,), daemon=True,
                                  name=f"ckpts lease {self.location}")
        self._renewer = thread, stop
        thread.start()

    def prove(self) -> None:
        """Make sure this writer still holds the lease, before a request that deletes or
        overwrites; a no-op for a process that never took it (a reader, a rank that only
        writes its own files). Free while the lease has more than half its time left by
        this host's clock; else renewed now, conditionally.

        Raises:
            LockedError: the lease is another writer's now, or was given up.
        """
        if self._renewer is None and not self.lost:
            return
        if not self.lost and time.time() < self._expires - self.seconds / 2:
            return
        self._renew_once()
        if self.lost:
            raise LockedError(
                f"{self.location}: this writer stalled past its lease ({self.seconds:g} s) and "
                f"another writer took the run over; nothing more was written or deleted. Open "
                f"a new CheckpointManager to write it again once the other writer is done")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this writer's."""
        if self._renewer is None:
            return
        thread, stop = self._renewer
        stop.set()
        thread.join()
        self._renewer = None
        found = self.objects.get(self.path)
        if found is not None and _parse(found[0]).get("owner") == self.owner:
            self.objects.fs.rm_file(self.path)

    def _write(self, *, version: str | None) -> None:
        now = time.time()
        lease = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                 "since": now, "expires": now + self.seconds}
        self._version = self.objects.put(self.path, json.dumps(lease).encode(), version=version)
        self._expires = now + self.seconds

    def _renew_once(self) -> None:
        """Rewrite the lease if it is still the version this writer wrote; else it is lost."""
        with self._guard:
            if self.lost:
                return
            try:
                self._write(version=self._version)
            except ConflictError:
                self.lost = True
                found = self.objects.get(self.path)
                log.error("the writer lease on %s was taken over by host %s; this process "
                          "will not write there again", self.location,
                          _parse(found[0]).get("host") if found else None)

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.seconds / 3) and not self.lost:
            try:
                self._renew_once()
            except Exception as e:  # a transient store error must not end the lease early
                log.warning("could not renew the writer lease on %s: %s", self.location, e)

    def _refused(self, lease: dict[str, Any] | None) -> LockedError:
        lease = lease or {}
        expires = time.strftime("%H:%M:%S UTC", time.gmtime(float(lease.get("expires", 0))))
        return LockedError(
            f"{self.location} is being written by host {lease.get('host')!r}, pid "
            f"{lease.get('pid')}, whose lease expires at {expires}; a writer that was killed "
            f"frees the run when its lease expires, at most {self.seconds:g} s after its last "
            f"renewal: wait, or save to another URL")


def _parse(data: bytes) -> dict[str, Any]:
    """A lease's fields; a stray object that is not one counts as expired."""
    try:
        lease = json.loads(data)
    except ValueError:
        return {"expires": 0.0}
    return lease if isinstance(lease, dict) else {"expires": 0.0}

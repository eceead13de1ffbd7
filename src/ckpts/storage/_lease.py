"""The writer lease of a run on an object store: a small JSON object renewed by a thread.

Object stores have no flock. The run's one writer holds ``RUN/.ckpts.lock``, a JSON object
``{owner, host, pid, since, expires}`` (unix times), and a daemon thread rewrites it every
``seconds / 3``. A writer that was killed frees the run when its lease expires, at most
``seconds`` after its last renewal; a live writer's lease is refused to everyone else.
Expiry compares the holder's clock with the taker's, so the hosts' clocks should agree (NTP).

Taking a lease: when there is none, a conditional create (``If-None-Match: *`` on S3) so two
takers cannot both win; when it has expired, an overwrite read back to check that this
taker's owner id is the one that stayed.
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

log = logging.getLogger("ckpts")


class Lease:
    """One writer's lease on ``path`` of an fsspec filesystem.

    Args:
        fs: the fsspec filesystem.
        path: the lease object's path in ``fs``.
        location: the run as users write it, for messages.
        seconds: how long the lease lasts without renewal.
    """

    def __init__(self, fs: Any, path: str, *, location: str, seconds: float) -> None:
        self.fs, self.path, self.location, self.seconds = fs, path, location, seconds
        self.owner = uuid.uuid4().hex
        self.lost = False
        """Set when another writer took the lease over (this one stalled past expiry)."""
        self._renewer: tuple[threading.Thread, threading.Event] | None = None

    def __repr__(self) -> str:
        return f"Lease({self.location!r}, seconds={self.seconds}, held={self._renewer is not None})"

    def acquire(self) -> None:
        """Take the lease and keep renewing it; a no-op while held.

        Raises:
            LockedError: another writer holds a live lease; names its host, pid and expiry.
        """
        if self._renewer is not None:
            return
        lease = self._read()
        if lease is not None and float(lease.get("expires", 0)) > time.time():
            raise self._refused(lease)
        try:
            self._write(create=lease is None)
        except FileExistsError as e:  # another taker created it first
            raise self._refused(self._read()) from e
        held = self._read()  # two takers may both have overwritten an expired lease
        if held is None or held.get("owner") != self.owner:
            raise self._refused(held)
        self.lost = False
        stop = threading.Event()
        thread = threading.Thread(target=self._renew, args=(stop,), daemon=True,
                                  name=f"ckpts lease {self.location}")
        self._renewer = thread, stop
        thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this writer's."""
        if self._renewer is None:
            return
        thread, stop = self._renewer
        stop.set()
        thread.join()
        self._renewer = None
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.fs.rm_file(self.path)

    def _read(self) -> dict[str, Any] | None:
        try:
            lease = json.loads(self.fs.cat_file(self.path, start=0))  # one GET, no HEAD
        except FileNotFoundError:
            return None
        except ValueError:  # not a lease (a stray object): treat it as expired
            lease = None
        return lease if isinstance(lease, dict) else {"expires": 0.0}

    def _write(self, *, create: bool) -> None:
        now = time.time()
        lease = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                 "since": now, "expires": now + self.seconds}
        self.fs.pipe_file(self.path, json.dumps(lease).encode(),
                          mode="create" if create else "overwrite")

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.seconds / 3):
            try:
                held = self._read()
                if held is None or held.get("owner") != self.owner:
                    self.lost = True
                    log.error("the writer lease on %s was taken over by host %s; this "
                              "process will not commit there again", self.location,
                              (held or {}).get("host"))
                    return
                self._write(create=False)
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

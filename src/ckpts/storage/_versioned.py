"""Small objects that several processes rewrite on a store: a write that succeeds only if
the object is still the version that was read.

S3 answers ``If-Match: ETAG`` and ``If-None-Match: *`` on PUT: a write conditional on the
version read fails when another process wrote in between, so a read-modify-write retries
on the new content instead of losing the other's change, and a lease is renewed only if
nobody took it over. Stores without such writes get the same interface from a lock of
this process: atomic between its threads (all of ``memory://``, one process's store), not
between processes.
"""

from __future__ import annotations

import errno
import hashlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any

# Attempts of a read-modify-write before giving up, with a growing random pause between.
_ATTEMPTS = 50
_PAUSE = 0.02
_EMULATED = threading.Lock()  # the conditional writes of stores that have none


class ConflictError(Exception):
    """The object changed (or appeared, or vanished) since the version was read."""


class VersionedObjects:
    """Reads with a version, and writes conditional on it, on an fsspec filesystem.

    Args:
        fs: the filesystem.
        conditional: whether the store takes ``If-Match``/``If-None-Match`` (S3); else
            the condition is checked under a lock of this process.
    """

    def __init__(self, fs: Any, *, conditional: bool) -> None:
        self.fs, self.conditional = fs, conditional

    def get(self, path: str) -> tuple[bytes, str] | None:
        """The object and its version; None when there is none."""
        try:
            if self.conditional:  # the version first: content newer than it fails the put
                version = str(self.fs.info(path)["ETag"])
                return bytes(self.fs.cat_file(path, start=0)), version
            data = bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        return data, _fingerprint(data)

    def put(self, path: str, data: bytes, *, version: str | None) -> str:
        """Write ``data`` if the object is still ``version`` (None: if there is none);
        return the new version.

        Raises:
            ConflictError: it is not.
        """
        if not self.conditional:
            with _EMULATED:
                current = self.get(path)
                if (current and current[1]) != version:
                    raise ConflictError(path)
                self.fs.pipe_file(path, data)
                return _fingerprint(data)
        condition = {"IfMatch": version} if version is not None else {"mode": "create"}
        try:
            reply = self.fs.pipe_file(path, data, **condition)
        except (FileExistsError, FileNotFoundError) as e:  # If-None-Match; If-Match on none
            raise ConflictError(path) from e
        except OSError as e:
            if _precondition_failed(e):
                raise ConflictError(path) from e
            raise
        return str(reply["ETag"])

    def rewrite(self, path: str, edit: Callable[[bytes | None], bytes]) -> bytes:
        """Replace the object with ``edit(its bytes or None)``, retried on the new bytes
        when another process wrote in between; ``edit`` may raise to give up. Returns
        what was written.

        Raises:
            OSError: still conflicting after many attempts (a busy object).
        """
        for attempt in range(_ATTEMPTS):
            current = self.get(path)
            data = edit(current[0] if current else None)
            try:
                self.put(path, data, version=current[1] if current else None)
                return data
            except ConflictError:
                time.sleep(random.uniform(0, _PAUSE * (attempt + 1)))
        raise OSError(errno.EBUSY, f"{path} kept changing under {_ATTEMPTS} attempts to "
                                   f"update it; try again")


def _fingerprint(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _precondition_failed(error: OSError) -> bool:
    """s3fs turns S3's 412 Precondition Failed (If-Match) into OSError(EINVAL)."""
    response = getattr(error.__cause__, "response", None) or {}
    return bool(error.errno == errno.EINVAL
                and response.get("Error", {}).get("Code") == "PreconditionFailed")

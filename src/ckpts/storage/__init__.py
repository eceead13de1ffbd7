"""The storage port: the one interface through which ckpts reads and writes a run's bytes.

A backend subclasses :class:`Storage` with nothing but the names exported here
(docs/storage.md shows a complete one): the records it exchanges (:class:`Listed`,
:class:`Range`, :class:`Staged`), checkpoint names (:func:`checkpoint_name`,
:func:`parse_step`, :data:`MANIFEST`), helpers for backends that pay per request
(:func:`coalesce`, :func:`as_os_errors`) and the errors the port's methods raise
(:class:`CorruptCheckpointError`, :class:`LockedError`). Two backends ship with ckpts:

- :class:`LocalStorage`: a local (or mounted) directory, with atomic renames, fsync
  and flock;
- :class:`FsspecStorage`: any fsspec URL (``s3://``, ``memory://``, ...), with the
  manifest as the commit marker and a lease object as the writer lock.

:func:`open_storage` picks one for a path or URL.

Example:
    >>> from ckpts.storage import open_storage
    >>> storage = open_storage("runs/exp1")
    >>> type(storage).__name__
    'LocalStorage'
"""

from ckpts.errors import CorruptCheckpointError, LockedError
from ckpts.storage._fsspec import FsspecStorage
from ckpts.storage._local import LocalStorage
from ckpts.storage._open import open_storage
from ckpts.storage._port import (
    MANIFEST,
    Listed,
    Range,
    Staged,
    Storage,
    as_os_errors,
    checkpoint_name,
    coalesce,
    parse_step,
)

__all__ = [
    "CorruptCheckpointError",
    "FsspecStorage",
    "Listed",
    "LocalStorage",
    "LockedError",
    "MANIFEST",
    "Range",
    "Staged",
    "Storage",
    "as_os_errors",
    "checkpoint_name",
    "coalesce",
    "open_storage",
    "parse_step",
]

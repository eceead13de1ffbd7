"""The storage port: the one interface through which ckpts reads and writes a run's bytes.

A backend implements :class:`Storage` with nothing but the names exported here
(docs/storage.md walks through one). Two ship with ckpts:

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

from ckpts.storage._fsspec import FsspecStorage
from ckpts.storage._local import LocalStorage
from ckpts.storage._port import (
    MANIFEST,
    Listed,
    Range,
    Staged,
    Storage,
    as_os_errors,
    checkpoint_name,
    coalesce,
    open_storage,
    parse_step,
)

__all__ = [
    "MANIFEST",
    "FsspecStorage",
    "Listed",
    "LocalStorage",
    "Range",
    "Staged",
    "Storage",
    "as_os_errors",
    "checkpoint_name",
    "coalesce",
    "open_storage",
    "parse_step",
]

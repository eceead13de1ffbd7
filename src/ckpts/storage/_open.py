"""open_storage: the backend of a run, chosen from its path or URL."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckpts.errors import InvalidArgumentError
from ckpts.storage._fsspec import FsspecStorage
from ckpts.storage._local import LocalStorage
from ckpts.storage._port import Storage, url_protocol


def open_storage(location: str | os.PathLike[str] | Storage,
                 storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage of a run: a Storage as it is, a path (or ``file://``) on the local
    disk, any other URL through fsspec.

    Args:
        location: a Storage, a path, or a URL (``s3://bucket/run``, ``memory://run``).
        storage_options: for the fsspec filesystem of a URL (see :class:`FsspecStorage`).

    Returns:
        ``location`` itself, a :class:`LocalStorage` or a :class:`FsspecStorage`.

    Raises:
        InvalidArgumentError: ``storage_options`` given for a local path.
        CheckpointError: the URL's backend is not installed or refuses the URL.

    Example:
        >>> type(open_storage("runs/exp1")).__name__
        'LocalStorage'
    """
    if isinstance(location, Storage):
        return location
    protocol = url_protocol(location)
    if protocol is None or (protocol == "file" and not storage_options):
        if storage_options:
            raise InvalidArgumentError(
                f"storage_options only apply to URLs; {str(location)!r} is a local path")
        path = str(location)[len("file://"):] if protocol == "file" else location
        return LocalStorage(Path(path))
    return FsspecStorage(str(location), storage_options or {})

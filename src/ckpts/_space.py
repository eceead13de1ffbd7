"""Disk space: what a save needs, what is free, and the errors when a save does not fit."""

from __future__ import annotations

import errno
import math

from ckpts.errors import (
    CheckpointError,
    InsufficientSpaceError,
    InvalidArgumentError,
    WriteError,
)


def manifest_allowance(tensors: int) -> int:
    """A generous bound on a manifest's size (and the headers'): ~300 bytes a tensor."""
    return 300 * tensors + 65536


def write_error(error: OSError, step: int, directory: str, free: int | None) -> CheckpointError:
    """The error for an OSError that stopped a save before its commit."""
    if error.errno == errno.ENOSPC:
        return InsufficientSpaceError(
            f"the disk filled up while writing step {step} to {directory}: {error}. The "
            "partial checkpoint was removed and earlier ones are intact; free space (e.g. "
            f"`ckpts prune {directory} --keep-last N`) and save again",
            free=free,
        )
    return WriteError(
        f"writing step {step} to {directory} failed: {error}. The partial checkpoint was "
        "removed and earlier ones are intact; check the disk, then save again"
    )


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"`` or ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        text = size.strip().upper()
        number = text.rstrip("KMGTIB")
        unit = text[len(number):].strip()
        try:
            value = int(float(number) * units[unit]) if math.isfinite(float(number)) else -1
        except (ValueError, KeyError):
            value = -1
    else:
        value = -1
    if value <= 0:
        raise InvalidArgumentError(
            f"size {size!r} is not a positive byte count; use an int or e.g. '500MB', '2GiB'"
        )
    return value

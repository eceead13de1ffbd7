"""Disk space: what a save needs, what is free, and the errors when a save does not fit."""

from __future__ import annotations

import errno
from collections.abc import Mapping

from ckpts._state import ObjectSnapshot
from ckpts.errors import CheckpointError, InsufficientSpaceError, WriteError


def needed_bytes(snapshots: Mapping[str, ObjectSnapshot]) -> int:
    """About what a checkpoint of ``snapshots`` takes on disk: the tensor bytes, plus
    headers and the manifest (~300 bytes a tensor is generous)."""
    tensors = [t for s in snapshots.values() for t in s.tensors.values()]
    return sum(t.numel() * t.element_size() for t in tensors) + 300 * len(tensors) + 65536


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

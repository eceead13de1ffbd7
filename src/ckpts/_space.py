"""Disk space: what a save needs, what is free, and the errors when a save does not fit."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Mapping
from pathlib import Path

from ckpts._state import ObjectSnapshot
from ckpts.errors import CheckpointError, InsufficientSpaceError, WriteError


def needed_bytes(snapshots: Mapping[str, ObjectSnapshot]) -> int:
    """About what a checkpoint of ``snapshots`` takes on disk: the tensor bytes, plus
    headers and the manifest (~300 bytes a tensor is generous)."""
    tensors = [t for s in snapshots.values() for t in s.tensors.values()]
    return sum(t.numel() * t.element_size() for t in tensors) + 300 * len(tensors) + 65536


def free_bytes(directory: Path) -> int | None:
    """Bytes free on the filesystem of ``directory``; None where that cannot be told."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def write_error(error: OSError, step: int, directory: Path) -> CheckpointError:
    """The error for an OSError that stopped a save before its commit."""
    if error.errno == errno.ENOSPC:
        return InsufficientSpaceError(
            f"the disk filled up while writing step {step} to {directory}: {error}. The "
            "partial checkpoint was removed and earlier ones are intact; free space (e.g. "
            f"`ckpts prune {directory} --keep-last N`) and save again",
            free=free_bytes(directory),
        )
    return WriteError(
        f"writing step {step} to {directory} failed: {error}. The partial checkpoint was "
        "removed and earlier ones are intact; check the disk, then save again"
    )

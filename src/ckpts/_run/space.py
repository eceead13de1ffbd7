"""Disk space: sizes as users write them, whether a save fits the disk and the run's
budget, and the errors when it does not."""

from __future__ import annotations

import errno
import math
from collections.abc import Sequence

from rich.filesize import decimal

from ckpts._run.usage import physical_bytes
from ckpts.errors import (
    CheckpointError,
    InsufficientSpaceError,
    InvalidArgumentError,
    WriteError,
)
from ckpts.storage import Storage, checkpoint_name
from ckpts.storage._port import Listed


def check_fits(directory: str, step: int, *, needed: int, free: int | None, budget: int | None,
               run: Sequence[Listed], survivors: Sequence[Listed], upcoming: Listed) -> None:
    """Refuse a save of ``needed`` new bytes that the disk cannot hold, or that would
    leave the run over ``budget`` once retention has left only ``survivors`` of ``run``
    beside the ``upcoming`` checkpoint (shared files counted once)."""
    reclaimable = physical_bytes(run) - physical_bytes(survivors)
    if free is not None and needed > free:
        raise InsufficientSpaceError(
            f"not enough space in {directory} for step {step}: it needs about "
            f"{decimal(needed)}, {decimal(free)} is free. Retention would free "
            f"{decimal(reclaimable)} once a new checkpoint is committed; free space first "
            f"(e.g. `ckpts prune {directory} --keep-last N`) or keep fewer checkpoints",
            needed=needed, free=free, reclaimable=reclaimable,
        )
    after = physical_bytes([*survivors, upcoming])
    if budget is not None and after > budget:
        raise InsufficientSpaceError(
            f"step {step} does not fit the budget of {decimal(budget)} for {directory}: it "
            f"adds {decimal(needed)}, and once retention has removed all it may, the run would "
            f"hold {decimal(after)}. What stays is protected (the newest checkpoint, the one "
            "restored from, pinned ones, KeepBest picks): unpin some, keep fewer best, or "
            "raise KeepWithinBytes' budget. Nothing was written",
            needed=needed, free=max(0, budget - (after - needed)), reclaimable=reclaimable,
        )


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


def cleanup_error(step: int, storage: Storage, error: OSError) -> WriteError:
    """The error for an OSError in the clean-up after step ``step`` was committed."""
    return WriteError(
        f"step {step} was committed to {storage.where(checkpoint_name(step))}, but the "
        f"clean-up after the commit failed: {error}. Earlier checkpoints are intact, and "
        f"retention runs again at the next save; check {storage.location} (did another "
        "program remove files?)")


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

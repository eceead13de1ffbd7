"""Where an export's files go: a folder staged beside the target and renamed into
place when complete, and byte counts for its progress bar."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes in all)


def byte_counter(tensors: Mapping[str, torch.Tensor],
             progress: ProgressCallback | None) -> Callable[[int], None] | None:
    """A per-file-write callback that reports (done, total) bytes to ``progress``."""
    if progress is None:
        return None
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        progress(done, total)

    return advance


def staged_directory(target: Path) -> Path:
    """A fresh temporary folder beside ``target``, to be renamed onto it when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def publish(staging: Path, target: Path) -> None:
    """Move a complete export into place (an empty ``target`` folder is replaced)."""
    if target.is_dir():
        target.rmdir()
    os.replace(staging, target)


def discard(staging: Path) -> None:
    """Remove a failed export's partial folder."""
    shutil.rmtree(staging, ignore_errors=True)

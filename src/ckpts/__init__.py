"""ckpts: a checkpoint manager for PyTorch training.

Atomic, hash-verified, pickle-free checkpoints in standard safetensors files,
bit-exact resume, and retention policies.

Public names are imported on first use, so tools that only read manifests (the
``ckpts ls`` command) start without importing torch.

Example:
    >>> import ckpts
    >>> state = ckpts.TrainState(model=model, optimizer=optimizer)   # doctest: +SKIP
    >>> manager = ckpts.CheckpointManager("runs/exp1", keep=[ckpts.KeepLast(3)])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckpts._version import __version__
from ckpts.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompatibleStateError,
    InsufficientSpaceError,
    InvalidArgumentError,
    LockedError,
    NotACheckpointError,
    ResumeCheckError,
    UnserializableStateError,
    WriteError,
)

if TYPE_CHECKING:
    from ckpts._catalog import Checkpoint
    from ckpts._data import ResumableLoader
    from ckpts._fsspec import FsspecStorage
    from ckpts._importing import import_checkpoints
    from ckpts._local import LocalStorage
    from ckpts._manager import CheckpointManager
    from ckpts._policy import (
        Every,
        KeepBest,
        KeepEvery,
        KeepLast,
        KeepSince,
        KeepWithinBytes,
        OnImprovement,
        RetentionPolicy,
        SaveTrigger,
    )
    from ckpts._resume_check import ResumeCheck, check_resume
    from ckpts._state import Stateful, TrainState
    from ckpts._storage import Storage
    from ckpts._verify import verify
    from ckpts._weights import load_state, load_weights

_LAZY = {
    "Checkpoint": "ckpts._catalog",
    "CheckpointManager": "ckpts._manager",
    "Every": "ckpts._policy",
    "FsspecStorage": "ckpts._fsspec",
    "KeepBest": "ckpts._policy",
    "KeepEvery": "ckpts._policy",
    "KeepLast": "ckpts._policy",
    "KeepSince": "ckpts._policy",
    "KeepWithinBytes": "ckpts._policy",
    "LocalStorage": "ckpts._local",
    "OnImprovement": "ckpts._policy",
    "ResumableLoader": "ckpts._data",
    "RetentionPolicy": "ckpts._policy",
    "SaveTrigger": "ckpts._policy",
    "ResumeCheck": "ckpts._resume_check",
    "Stateful": "ckpts._state",
    "Storage": "ckpts._storage",
    "TrainState": "ckpts._state",
    "check_resume": "ckpts._resume_check",
    "import_checkpoints": "ckpts._importing",
    "load_state": "ckpts._weights",
    "load_weights": "ckpts._weights",
    "verify": "ckpts._verify",
}

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "Every",
    "FormatVersionError",
    "FsspecStorage",
    "IncompatibleStateError",
    "InsufficientSpaceError",
    "InvalidArgumentError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepSince",
    "KeepWithinBytes",
    "LocalStorage",
    "LockedError",
    "NotACheckpointError",
    "OnImprovement",
    "ResumableLoader",
    "ResumeCheck",
    "ResumeCheckError",
    "RetentionPolicy",
    "SaveTrigger",
    "Stateful",
    "Storage",
    "TrainState",
    "UnserializableStateError",
    "WriteError",
    "__version__",
    "check_resume",
    "import_checkpoints",
    "load_state",
    "load_weights",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckpts' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

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
import warnings
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
    from ckpts._checkpoint.verify import verify
    from ckpts._checkpoint.weights import load_state, load_weights
    from ckpts._format.catalog import Checkpoint
    from ckpts._run.importing import import_checkpoints
    from ckpts._run.manager import CheckpointManager
    from ckpts._run.policy import (
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
    from ckpts._state.data import ResumableLoader
    from ckpts._state.train_state import Stateful, TrainState

_LAZY = {
    "Checkpoint": "ckpts._format.catalog",
    "CheckpointManager": "ckpts._run.manager",
    "Every": "ckpts._run.policy",
    "KeepBest": "ckpts._run.policy",
    "KeepEvery": "ckpts._run.policy",
    "KeepLast": "ckpts._run.policy",
    "KeepSince": "ckpts._run.policy",
    "KeepWithinBytes": "ckpts._run.policy",
    "OnImprovement": "ckpts._run.policy",
    "ResumableLoader": "ckpts._state.data",
    "RetentionPolicy": "ckpts._run.policy",
    "SaveTrigger": "ckpts._run.policy",
    "Stateful": "ckpts._state.train_state",
    "TrainState": "ckpts._state.train_state",
    "import_checkpoints": "ckpts._run.importing",
    "load_state": "ckpts._checkpoint.weights",
    "load_weights": "ckpts._checkpoint.weights",
    "verify": "ckpts._checkpoint.verify",
}

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "Every",
    "FormatVersionError",
    "IncompatibleStateError",
    "InsufficientSpaceError",
    "InvalidArgumentError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepSince",
    "KeepWithinBytes",
    "LockedError",
    "NotACheckpointError",
    "OnImprovement",
    "ResumableLoader",
    "ResumeCheckError",
    "RetentionPolicy",
    "SaveTrigger",
    "Stateful",
    "TrainState",
    "UnserializableStateError",
    "WriteError",
    "__version__",
    "import_checkpoints",
    "load_state",
    "load_weights",
    "verify",
]


# Names that moved to a namespace of their own: still importable from ckpts, with a
# DeprecationWarning that says where they live now.
_MOVED = {
    "FsspecStorage": "ckpts.storage",
    "LocalStorage": "ckpts.storage",
    "ResumeCheck": "ckpts.testing",
    "Storage": "ckpts.storage",
    "check_resume": "ckpts.testing",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"ckpts.{name} moved to {_MOVED[name]}.{name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    if name in ("storage", "testing"):  # `import ckpts` then `ckpts.storage.LocalStorage`
        return importlib.import_module(f"ckpts.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckpts' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

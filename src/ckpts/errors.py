"""The exceptions ckpts raises for anything a user can cause.

Every error a caller can trigger is a :class:`CheckpointError`. Each message says
what happened, which path, step or key it concerns, and how to fix it.

Hierarchy::

    CheckpointError
    ├── InvalidArgumentError      a bad argument (also a ValueError)
    ├── NotACheckpointError       the path holds no committed checkpoint
    ├── CorruptCheckpointError    a file is missing, truncated or fails its hash
    ├── FormatVersionError        written by a newer, unknown format version
    ├── UnserializableStateError  a value in the state cannot be saved without pickle
    ├── IncompatibleStateError    the checkpoint does not fit the live objects
    ├── InsufficientSpaceError    the disk cannot hold the checkpoint (before or while writing)
    ├── WriteError                an I/O error while writing, committing or cleaning up a save
    ├── LockedError               another process is writing to the run
    └── ResumeCheckError          check_resume could not run the command to a verdict
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error ckpts raises on purpose."""


class InvalidArgumentError(CheckpointError, ValueError):
    """An argument has a wrong type or value."""


class NotACheckpointError(CheckpointError):
    """A path that should hold a committed checkpoint (or a run) does not."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files do not match its manifest (missing, truncated, wrong hash)."""


class FormatVersionError(CheckpointError):
    """A checkpoint was written by a newer format version than this ckpts can read."""


class UnserializableStateError(CheckpointError):
    """A value in the training state has no pickle-free encoding."""


class IncompatibleStateError(CheckpointError):
    """A checkpoint's contents do not fit the objects it is restored into.

    Attributes:
        missing: keys the live objects expect but the checkpoint lacks.
        unexpected: keys in the checkpoint that the live objects do not have.
        mismatched: ``(key, checkpoint (dtype, shape), live (dtype, shape))`` triples.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


class InsufficientSpaceError(CheckpointError):
    """The filesystem cannot hold the checkpoint.

    Raised before writing when the estimate exceeds the free space, and while
    writing on ENOSPC. Attributes give the figures (``None`` where unknown).

    Attributes:
        needed: bytes the checkpoint needs.
        free: bytes free on the filesystem.
        reclaimable: bytes the retention policies would free once it is committed.
    """

    def __init__(self, message: str, *, needed: int | None = None, free: int | None = None,
                 reclaimable: int | None = None) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free
        self.reclaimable = reclaimable


class WriteError(CheckpointError):
    """An I/O error (EIO, a vanished folder, a read-only disk) while saving.

    Raised the same way by sync and async saves. The message says whether the
    checkpoint was committed before the failure; earlier checkpoints are intact
    either way, so training can go on and save again.
    """


class LockedError(CheckpointError):
    """Another process holds the run's writer lock (its host and pid are in the message)."""


class ResumeCheckError(CheckpointError):
    """``check_resume`` could not reach a verdict: the command failed, timed out, or
    saved too few checkpoints to compare (its log's path and last lines are in the
    message)."""

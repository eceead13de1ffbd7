"""This process as the run's one writer: the writer lock, the clean-up of what killed
saves left behind, and each save's way through the storage (staged, then committed or
aborted)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckpts._format.manifest import encode_json
from ckpts.errors import WriteError
from ckpts.storage import Staged, Storage

log = logging.getLogger("ckpts")


class RunWriter:
    """Holds the run's writer lock (taken once, see Storage.lock) and stages, commits and
    aborts its saves. ``directory``: the run as messages name it."""

    def __init__(self, storage: Storage, directory: Path | str) -> None:
        self.storage = storage
        self.directory = directory
        self.locked = False
        self._cleaned = False  # the run checked for uncommitted step-* folders

    def lock(self) -> None:
        """Become the run's one writer, if not already.

        Raises:
            LockedError: another process writes the run.
            WriteError: the lock cannot be taken (the folder cannot be created, ...).
        """
        if self.locked:
            return
        try:
            self.storage.lock()
        except OSError as e:
            raise WriteError(
                f"cannot take the writer lock of {self.directory}: {e}. Check that the "
                "folder can be created and written"
            ) from e
        self.locked = True

    def unlock(self) -> None:
        """Give the run up: another process may write it from now on."""
        if self.locked:
            self.locked = False
            self.storage.unlock()
            self._cleaned = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The writer lock for one operation (retention after a metadata update): taken if
        this process does not hold it, and then given back right after, so that an
        evaluation job never keeps a trainer out of its run.

        Raises:
            LockedError: another process writes the run.
        """
        if self.locked:
            yield
            return
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def look_again(self) -> None:
        """Make the next save look for leftovers (and damage) in the run anew."""
        self._cleaned = False

    def begin(self, name: str) -> PendingCommit:
        """A save of checkpoint ``name``, not yet staged."""
        return PendingCommit(self, name)

    def clean(self) -> None:
        """Remove what killed saves left in the run. Finding step-* folders without a
        manifest costs a stat per checkpoint: once is enough, as this process is the
        run's only writer from then on."""
        self.storage.clean(check_manifests=not self._cleaned)
        self._cleaned = True

    def abort(self, staged: Staged) -> None:
        """Remove a failed save's partial data; a failure here is logged (the next
        writer's clean-up removes what is left), never raised over the first error."""
        try:
            self.storage.abort(staged)
        except OSError as e:
            self._cleaned = False  # the next save looks for leftovers again
            log.warning("could not remove the partial checkpoint %s: %s",
                        self.storage.where(staged.name), e)


class PendingCommit:
    """One save on its way through the storage, on the process that commits: staged
    (after the run's leftovers are cleaned), then committed with its manifest."""

    def __init__(self, writer: RunWriter, name: str) -> None:
        self.writer, self.name = writer, name
        self.staged: Staged | None = None
        self.manifest: dict[str, Any] | None = None  # set once committed
        self.encoded = b""

    def stage(self) -> Staged:
        self.writer.clean()
        self.staged = self.writer.storage.stage(self.name)
        return self.staged

    def commit(self, manifest: dict[str, Any]) -> None:
        if self.staged is None:  # a job's bug: it commits what it staged
            raise RuntimeError(f"{self.name} was committed without being staged")
        self.encoded = encode_json(manifest)
        self.writer.storage.commit(self.staged, self.encoded)
        self.manifest = manifest

    def abort(self) -> None:
        """Remove what was staged, if anything was."""
        if self.staged is not None:
            self.writer.abort(self.staged)

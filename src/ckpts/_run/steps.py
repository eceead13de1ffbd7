"""Step order in a run: a save never goes back in time, except on a branch asked for.

A save of a step older than the run's newest would be deleted at once by
retention as stale (the newest is always kept), so it is refused before anything
is written. A run may go on from an older step only on a *branch*: the user
restored an older step on purpose (``restore(step=k, discard_newer=True)``), or
``restore()`` fell back past corrupt checkpoints. The newer checkpoints of a
branch are deleted once its first checkpoint is committed, never before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ckpts.errors import InvalidArgumentError
from ckpts.storage._port import Storage, checkpoint_name

log = logging.getLogger("ckpts")


@dataclass(frozen=True)
class Branch:
    """The run goes on from ``step``; ``newer_steps`` go once a newer step commits."""

    step: int
    newer_steps: tuple[int, ...]


class StepOrder:
    """What one writer knows of its run's steps: the newest, a branch, its last save.

    The newest step is read from the run once, when the writer first needs it: from
    then on this process is the run's only writer (it holds the lock), so the
    commits it makes are all that changes it. :meth:`forget` when the lock goes.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.run = storage.location
        self.last_saved: int | None = None  # always kept by retention
        self.branch: Branch | None = None
        self._newest: int | None = None
        self._known = False

    def check(self, step: int) -> None:
        """Refuse ``step`` if it is older than the run's newest (or the branch point).

        Raises:
            InvalidArgumentError: naming both steps and the three ways out.
        """
        if not self._known:
            self._newest = max((entry.step for entry in self.storage.committed()), default=None)
            self._known = True
        floor = self.branch.step if self.branch is not None else self._newest
        if floor is None or step >= floor:
            return
        if self.branch is not None:
            raise InvalidArgumentError(
                f"cannot save step {step} into {self.run}: this run was branched from step "
                f"{floor}, so new steps must be >= {floor}"
            )
        raise InvalidArgumentError(
            f"cannot save step {step} into {self.run}: the run already holds step {floor}, "
            "and an older step would be deleted at once as stale. Nothing was written. To "
            "continue that run, call manager.restore(state) first and count on from the step "
            "it returns; to start over, use a new directory; to branch from an older "
            "checkpoint on purpose, restore it with manager.restore(state, step=K, "
            "discard_newer=True), which deletes the newer checkpoints once the first new one "
            "is committed"
        )

    def branch_from(self, step: int, newer_steps: tuple[int, ...]) -> None:
        """Go on from ``step``; ``newer_steps`` are deleted after the next commit."""
        self.branch = Branch(step=step, newer_steps=newer_steps)

    def committed(self, step: int) -> None:
        """Record a durable commit of ``step``; end a branch by deleting its newer steps."""
        self.last_saved = step
        self._newest = max(step, self._newest or 0)
        branch = self.branch
        if branch is None or step <= branch.step:
            return
        self.branch = None
        discarded = [s for s in branch.newer_steps if s != step]
        existing = {entry.step for entry in self.storage.committed()}
        for step_to_delete in sorted(existing & set(discarded)):
            self.storage.delete(checkpoint_name(step_to_delete))
        if discarded:
            log.warning("branched from step %d: deleted the newer steps %s of %s",
                        branch.step, discarded, self.run)
        self._newest = step  # every other step above the branch point is gone

    def forget(self) -> None:
        """The writer lock was released: another process may change the run."""
        self._known = False
        self.last_saved = None


def check_step(step: object) -> None:
    """Refuse anything but an int >= 0 as a step."""
    if type(step) is not int or step < 0:
        raise InvalidArgumentError(f"step must be an int >= 0, got {step!r}")

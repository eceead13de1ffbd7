"""Retention in a run: which committed checkpoints the policies delete (never the
protected ones), deleting them, and whether a new save fits the disk and the budget."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager

from ckpts._format.catalog import Checkpoint
from ckpts._run.policy import KeepWithinBytes, RetentionPolicy, plan_retention
from ckpts._run.space import check_fits
from ckpts._run.usage import identity
from ckpts.errors import LockedError
from ckpts.storage import Listed, Storage, checkpoint_name, parse_step

log = logging.getLogger("ckpts")


class Retention:
    """A run's retention policies, applied through its storage.

    Whatever the policies say, these are kept: the newest checkpoint, pinned ones (any
    tag), and the steps a caller protects (the one restored from, the one saved last).
    ``keep=None`` keeps everything.
    """

    def __init__(self, storage: Storage, keep: list[RetentionPolicy] | None) -> None:
        self.storage = storage
        self.keep = keep

    @property
    def budget(self) -> int | None:
        """The smallest KeepWithinBytes budget among the policies, or None."""
        return min((p.nbytes for p in self.keep or () if isinstance(p, KeepWithinBytes)),
                   default=None)

    def doomed(self, checkpoints: list[Checkpoint], *, protected: Iterable[int | None],
               listing: Mapping[int, Listed] | None = None) -> list[Checkpoint]:
        """The checkpoints (ascending by step) the policies would delete. ``listing``:
        the run's files by step, for a budget (listed from the storage when None)."""
        if self.keep is None or not checkpoints:
            return []
        kept = {checkpoints[-1].step} | {c.step for c in checkpoints if c.tags}
        kept |= {step for step in protected if step is not None}
        return plan_retention(checkpoints, self.keep, kept, lambda: listing or {
            entry.step: entry for entry in self.storage.committed()})

    def apply(self, checkpoints: Callable[[], list[Checkpoint]], *,
              protected: Iterable[int | None], lock: Callable[[], AbstractContextManager[None]],
              dry_run: bool = False, if_unlocked: bool = False) -> list[Checkpoint]:
        """Delete what the policies do not keep, of the run's ``checkpoints()`` (listed
        only with policies), holding the run's writer lock (``lock()``, a context) for
        the deletions only. With ``if_unlocked``, skip quietly when another process is
        the writer: it applies retention on its next save."""
        if self.keep is None:
            return []  # keeps everything: no need to read the run's manifests
        removed = self.doomed(checkpoints(), protected=protected)
        if not removed or dry_run:
            return removed
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(lock())
            except LockedError:
                if not if_unlocked:
                    raise
                log.info("%s has another writer; it will apply retention", self.storage.location)
                return []
            for checkpoint in removed:
                self.storage.delete(checkpoint.name)
                log.info("retention removed step %d (%s)", checkpoint.step, checkpoint.path)
        return removed

    def check_space(self, upcoming: Checkpoint, *, needed: int, reused: Mapping[str, int],
                    source: str | None, checkpoints: Callable[[], list[Checkpoint]],
                    protected: Iterable[int | None]) -> None:
        """Refuse a save that the disk, or a KeepWithinBytes budget once retention has
        run, cannot hold, before it writes a byte.

        Args:
            upcoming: the checkpoint about to be written.
            needed: the bytes it will write.
            reused: the files (and sizes) it takes from checkpoint ``source``.
            checkpoints: lists the run's committed checkpoints (only when the disk is
                short or there is a budget).
            protected: the steps retention must keep besides the newest and pinned ones.

        Raises:
            InsufficientSpaceError: naming what it needs, what is free and what to do.
        """
        free = self.storage.free_space()
        budget = self.budget
        if (free is None or needed <= free) and budget is None:
            return
        step = upcoming.step
        listing = {entry.step: entry for entry in self.storage.committed() if entry.step != step}
        source_step = parse_step(source) if source is not None else None
        origin = listing.get(source_step) if source_step is not None else None
        files = Listed(checkpoint_name(step), {**reused, "": needed},
                       {file: identity(origin, file) for file in reused} if origin else {})
        plan = sorted([*(c for c in checkpoints() if c.step != step), upcoming],
                      key=lambda c: c.step)
        doomed = {c.step for c in self.doomed(plan, protected=protected,
                                              listing={**listing, step: files})}
        check_fits(str(self.storage.location), step, needed=needed, free=free, budget=budget,
                   run=list(listing.values()), upcoming=files,
                   survivors=[entry for s, entry in listing.items() if s not in doomed])

"""The memory tier as the CheckpointManager uses it: when to snapshot, where, who keeps it.

The manager hands this collaborator the state when ``memory=`` fires (or a durable
save is due: durable checkpoints are written from a snapshot), the run's newest step at
a restore, and the end of the run at ``close()``. It owns this rank's
:class:`~ckpts._run.memory.MemoryTier`, opened at the first save, restore or
``prepare``, and, in a job of one process, the :class:`~ckpts._run.keeper.Keeper`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckpts._checkpoint.job import Job
from ckpts._checkpoint.staging import BackgroundWriter
from ckpts._format.catalog import metrics_of
from ckpts._run.keeper import Keeper
from ckpts._run.memory import MemoryTier, restore_newest
from ckpts._run.policy import SaveTrigger, fires
from ckpts._run.restoring import candidates
from ckpts._state.train_state import ObjectSnapshot, TrainState
from ckpts.errors import CheckpointError, InvalidArgumentError
from ckpts.storage import Storage, parse_step

log = logging.getLogger("ckpts")

KEEPER_WAIT = 120.0
"""Seconds a restore waits for a keeper that is persisting a dead trainer's snapshot."""


class HostMemory:
    """``memory=``'s triggers, this rank's memory tier and the keeper.

    Args:
        triggers: when to snapshot (``memory=`` as checked by check_triggers).
        storage: the run.
        storage_options: the run's fsspec options, for the keeper to open it anew.
        max_shard_size: of the checkpoints the keeper writes.
        new_job: makes another job of the same ranks (a process group of its own), for
            the durable saves, whose collectives run beside the training thread's.
    """

    def __init__(self, triggers: Sequence[SaveTrigger], storage: Storage,
                 storage_options: Mapping[str, Any] | None, max_shard_size: int, *,
                 new_job: Callable[[], Job]) -> None:
        self.triggers = list(triggers)
        self.storage = storage
        self._options = dict(storage_options or {})
        self._max_shard_size = max_shard_size
        self.tier: MemoryTier | None = None
        self.keeper: Keeper | None = None
        self._new_job = new_job
        self._durable_job: Job | None = None
        self._guard = threading.Lock()  # of the two below, for the training and writer threads
        self._writing = False  # a durable save is being written from memory
        self._next: _Durable | None = None  # the one due meanwhile (one process)
        self.latest: tuple[int, int | None, dict[str, float], dict[str, ObjectSnapshot]] \
            | None = None  # the newest snapshot taken: step, epoch, metrics, its objects

    def due(self, step: int, epoch: int | None, metrics: dict[str, float],
            checkpoints: Callable[[], Any]) -> bool:
        return fires(self.triggers, step, epoch, metrics, checkpoints)

    def saved(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        for trigger in self.triggers:
            trigger.saved(step, epoch, metrics)

    def own(self, job: Job) -> MemoryTier:
        """This rank's tier, its area made and owned (waiting for a persisting keeper)."""
        if self.tier is None:
            self.tier = MemoryTier(self.storage.location, job.rank)
        self.tier.own(wait=KEEPER_WAIT)
        return self.tier

    def take(self, step: int, epoch: int | None, metrics: dict[str, float],
             snapshots: Mapping[str, ObjectSnapshot], job: Job, *,
             background: BackgroundWriter,
             durable: Callable[[Mapping[str, ObjectSnapshot], Job], object] | None) -> int:
        """Snapshot into host memory; with ``durable``, have ``background`` call it with the
        snapshot and the job to write it with, while the slot is kept from being
        overwritten. Starts the keeper (in a job of one process) at the first snapshot.
        Returns the tensor bytes taken."""
        tier = self.own(job)
        slot, staged = tier.take(step, epoch, metrics, snapshots)
        self.latest = (step, epoch, metrics, staged)
        self._start_keeper(job, tier)
        if durable is not None:
            if self._durable_job is None:  # every rank is here at once: a collective
                self._durable_job = job if job.size == 1 else self._new_job()
            tier.busy.add(slot)
            save = _Durable(step, slot, staged, durable, self._durable_job)
            if job.size == 1:  # ranks must write the same steps: they wait instead
                with self._guard:
                    if self._writing:  # the trainer does not wait for the store
                        self._supersede(save, tier)
                        return _nbytes(staged)
                    self._writing = True
            try:
                background.submit(lambda: self._write(save, tier), name=f"ckpts-save-{step}")
            except BaseException:  # the previous save's failure: this one never started
                tier.busy.discard(slot)
                self._writing = False
                raise
        return _nbytes(staged)

    def _supersede(self, save: _Durable, tier: MemoryTier) -> None:
        """Make ``save`` the one durable save written after the one in flight (under the
        guard): a durable save already waiting is dropped for it, its slot freed."""
        if self._next is not None:
            tier.busy.discard(self._next.slot)
            log.warning("the durable save of step %d is skipped: the run's store is slower "
                        "than save= asks, and step %d's comes due before it could start",
                        self._next.step, save.step)
        self._next = save

    def _write(self, save: _Durable | None, tier: MemoryTier) -> None:
        """Write durable saves from their slots (on the background thread): ``save``, then
        each one that came due meanwhile; each slot is freed once written."""
        try:
            while save is not None:
                try:
                    save.write(save.staged, save.job)
                finally:
                    tier.busy.discard(save.slot)
                with self._guard:
                    save, self._next = self._next, None
                    self._writing = save is not None
        except BaseException:
            with self._guard:
                waiting, self._next, self._writing = self._next, None, False
            if waiting is not None:
                tier.busy.discard(waiting.slot)
            raise

    def persist(self, job: Job, run_newest: int | None,
                commit: Callable[[int, Mapping[str, ObjectSnapshot], dict[str, float],
                                  int | None], object]) -> None:
        """Commit the newest snapshot if the run has nothing as new (at close): the one
        taken last, or else the one restored from memory (read back, hash-checked)."""
        error: BaseException | None = None
        if self.latest is None and self.tier is not None and self.tier.newest is not None:
            try:
                manifest, objects = self.tier.read(self.tier.newest)
                self.latest = (manifest["step"], manifest["epoch"], metrics_of(manifest),
                               objects)
            except Exception as e:  # every rank learns of it before any raises
                error = e
        problems, _ = job.problems(error)
        if problems:
            raise error if error is not None else CheckpointError(
                f"reading the newest memory snapshot failed on another rank: "
                f"{'; '.join(problems)}; it stays in host memory")
        if self.latest is None:
            return
        step, epoch, metrics, staged = self.latest
        if run_newest is None or step > run_newest:
            commit(step, staged, metrics, epoch)

    def _start_keeper(self, job: Job, tier: MemoryTier) -> None:
        if self.keeper is None and job.size == 1:
            self.keeper = Keeper({"run": self.storage.location, "storage_options": self._options,
                                  "lease": self.storage.lock_token(),
                                  "max_shard_size": self._max_shard_size})
            log.info("memory tier of %s: snapshots in %s, keeper pid %d", self.storage.location,
                     tier.area.location, self.keeper.pid)

    def check_room(self, state: TrainState, job: Job) -> None:
        """Allocate the snapshots' memory now, refusing a state it cannot hold: three slots
        (the newest snapshot, the next, and one a durable save reads meanwhile)."""
        self.own(job).check_room(state.snapshot(), slots=3)

    def restore(self, state: TrainState, job: Job, names: Sequence[str], *, step: int | None,
                missing_ok: bool) -> int | None:
        """Restore from memory if every rank holds a state as new as the run's newest
        (``names``: the run's checkpoints, newest first). None: the run serves, and the
        snapshots are dropped (always, when a ``step`` was asked for). The memory the
        state's snapshots need is then allocated: too little fails here, before training.

        Raises:
            NotACheckpointError: neither tier has a state and not ``missing_ok``.
            InsufficientSpaceError: the memory area cannot hold three snapshots of ``state``.
        """
        tier = self.own(job)
        self.latest = None
        restored = None
        if step is None:
            restored = restore_newest(tier, state, job, parse_step(names[0]) if names else None)
        else:
            tier.drop()
        if restored is None and not names and not missing_ok:
            candidates(self.storage, None, missing_ok=False)  # raises: nothing anywhere
        self.check_room(state, job)
        self._start_keeper(job, tier)  # now, before training: a process takes a while to start
        return restored

    def close(self, *, free: bool) -> None:
        """End the keeper, and give the area up (removing it with ``free``)."""
        if self.keeper is not None:
            self.keeper.close()
            self.keeper = None
        if self.tier is not None:
            self.tier.close(free=free)
            self.tier = None
        self.latest = None


@dataclass(frozen=True)
class _Durable:
    """A durable save from a memory snapshot: its step, slot, objects, how to write it
    and with which job."""

    step: int
    slot: str
    staged: Mapping[str, ObjectSnapshot]
    write: Callable[[Mapping[str, ObjectSnapshot], Job], object]
    job: Job


def _nbytes(staged: Mapping[str, ObjectSnapshot]) -> int:
    return sum(t.numel() * t.element_size() for snap in staged.values()
               for t in snap.tensors.values())


def check_memory_run(directory: object, memory: object,
                     storage_options: Mapping[str, Any] | None) -> None:
    """``memory=`` needs a run the keeper can open again: a path or a URL, and options
    it can be sent (plain JSON)."""
    if memory is None:
        return
    if isinstance(directory, Storage):
        raise InvalidArgumentError(
            "memory= needs the run as a path or URL, not a Storage object: its keeper "
            "process opens the run anew to persist the newest snapshot")
    try:
        json.dumps(dict(storage_options or {}))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"memory= needs storage_options of plain JSON values (str, numbers, lists, "
            f"dicts) to hand them to its keeper process: {e}") from e

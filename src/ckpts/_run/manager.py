"""CheckpointManager: save, restore, list and prune the checkpoints of one run.

It is the one public object of a run, composed of small collaborators: the job that
saves and restores (ckpts._checkpoint.job), the run's writer lock and each save's
stage-commit-abort (writer.py), the records of committed checkpoints (records.py),
retention (retention.py), the step order (steps.py), saving on a signal (signals.py)
and, for async saves, the stager and the background writer (ckpts._checkpoint.staging)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpts._checkpoint.job import Job, job_of
from ckpts._checkpoint.staging import BackgroundWriter, Stager
from ckpts._format.catalog import Checkpoint, check_metrics, committed_sizes, is_local, open_run
from ckpts._run import history
from ckpts._run.evaluate import EvaluationProgress, evaluate
from ckpts._run.host_memory import HostMemory, check_memory_run
from ckpts._run.policy import (
    Mode,
    RetentionPolicy,
    SaveTrigger,
    check_policies,
    check_triggers,
    fires,
)
from ckpts._run.records import Records
from ckpts._run.restoring import (
    branch_past_corrupt,
    choose,
    first_intact,
)
from ckpts._run.retention import Retention
from ckpts._run.signals import SaveOnSignal
from ckpts._run.space import cleanup_error, parse_size, write_error
from ckpts._run.steps import StepOrder, check_step
from ckpts._run.writer import RunWriter
from ckpts._state.train_state import ObjectSnapshot, TrainState
from ckpts._tensors.gc import paused_gc
from ckpts._tensors.streaming import shared_pool
from ckpts._tensors.writing import Reusable
from ckpts.errors import InvalidArgumentError
from ckpts.storage import Storage, checkpoint_name, parse_step

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ckpts")


class CheckpointManager:
    """Saves and restores the checkpoints of one run: a local directory or a URL.

    Args:
        directory: the run: a local directory (created on the first save), or any
            fsspec URL such as ``"s3://bucket/run"`` or ``"memory://run"`` (needs
            ``pip install 'ckpts[s3]'``; see docs/storage.md), or a
            :class:`ckpts.storage.Storage` object.
        keep: retention policies (e.g. ``[KeepLast(3)]``). A checkpoint survives if any
            policy keeps it; the newest, the one restored from and pinned ones are always
            kept. ``None`` keeps everything. Without a budget, deletions run beside training
            once a commit is durable (``save()``, ``checkpoints()`` and ``wait()`` wait).
        save: a save trigger (``Every(...)``, ``OnImprovement(...)``) or a list of
            them; ``save()`` then writes only when one says so. ``None``: every
            ``save()`` call writes.
        memory: a trigger (or list) for snapshots in host shared memory (the memory
            tier, docs/memory.md): ``save()`` then blocks only to copy the state there,
            durable checkpoints are written from that copy in the background, a keeper
            process persists the newest snapshot if the trainer dies, and ``restore()``
            takes the newest intact state of memory and run. Needs a path or URL.
        save_on_signal: signals (e.g. ``(signal.SIGTERM,)`` for preemption) that
            make the next ``save()`` call write regardless of the trigger. Once
            that checkpoint is committed the process ends the conventional way
            for the signal: the default handler is put back and the signal
            re-raised, so a scheduler sees the status it expects (143 for SIGTERM).
            Call ``save()`` often (every step) so the grace period suffices.
        async_save: ``save()`` returns once the state is copied to host memory;
            a background thread writes, commits and applies retention. One save is
            in flight at a time. A background failure is raised by the next
            ``save()``, ``wait()`` or ``close()``. Use the manager as a context
            manager, or call ``close()``, to be sure the last save is durable.
        max_shard_size: split each object's tensors into files of about equal
            size and at most this many bytes (int, or a string such as ``"5GB"``).
            Several files are written and read in parallel; the default, 512 MB,
            gives a 100 M-parameter model with AdamW three files.
        dedup: reuse the previous checkpoint's unchanged tensor files instead of
            writing them again: a hard link on a local disk, a server-side copy on an
            object store. A hash of the bytes being saved decides, per file; each
            checkpoint still holds all its files (see docs/storage.md). The
            previous checkpoint is the one this manager saved or restored last.
        process_group: in a torch.distributed job, the ranks that save together
            (default: all). Every one of them calls ``save()`` and ``restore()``; see
            docs/scale.md. Outside a job (torch.distributed not initialized) unused.
        collective_timeout: seconds a rank waits for the others in a save or restore
            before raising CheckpointError (a rank that died or hangs).
        storage_options: options for the URL's fsspec filesystem, e.g. for S3
            ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``;
            by default the usual AWS variables (``AWS_ACCESS_KEY_ID``,
            ``AWS_ENDPOINT_URL``, ...) apply.

    Example:
        >>> state = ckpts.TrainState(model=model, optimizer=optimizer)     # doctest: +SKIP
        >>> keep = [ckpts.KeepLast(2)]                                      # doctest: +SKIP
        >>> manager = ckpts.CheckpointManager("runs/exp1", keep=keep)       # doctest: +SKIP
        >>> start = manager.restore(state) or 0                             # doctest: +SKIP
        >>> manager.save(step, state, metrics={"loss": loss})               # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        keep: Sequence[RetentionPolicy] | None = None,
        save: SaveTrigger | Sequence[SaveTrigger] | None = None,
        memory: SaveTrigger | Sequence[SaveTrigger] | None = None,
        save_on_signal: Sequence[signal.Signals | int] = (),
        async_save: bool = False,
        max_shard_size: int | str = "512MB",
        dedup: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        process_group: Any = None,
        collective_timeout: float = 600.0,
    ) -> None:
        check_memory_run(directory, memory, storage_options)
        self.storage = open_run(directory, storage_options)
        self.directory: Path | str = Path(self.storage.location) if is_local(self.storage) \
            else self.storage.location
        self._records = Records(self.storage, self.directory)
        self._retention = Retention(self.storage, check_policies(keep))
        self.triggers: list[SaveTrigger] = check_triggers(save)
        self.max_shard_size = parse_size(max_shard_size)
        self.dedup = dedup
        # files a save may reuse: of the checkpoint this manager saved or restored last
        # (whose bytes it wrote or checked), while it holds the lock
        self._reusable: Reusable | None = None
        self.restored_from: int | None = None
        self._steps = StepOrder(self.storage)
        self._signals = SaveOnSignal(save_on_signal)
        self._run_writer = RunWriter(self.storage, self.directory)
        self._stager = Stager() if async_save and memory is None else None
        self._memory = HostMemory(
            check_triggers(memory), self.storage, storage_options, self.max_shard_size,
            new_job=lambda: job_of(process_group, collective_timeout, run=self.storage.location)
        ) if memory is not None else None
        self._background = BackgroundWriter() if async_save or memory is not None else None
        self._retiring = BackgroundWriter()  # a synchronous save's retention, after it
        self._job_of: tuple[Any, float] = (process_group, collective_timeout)
        self._job: Job | None = None  # found at the first save or restore

    @property
    def keep(self) -> list[RetentionPolicy] | None:
        """The retention policies (None keeps everything); assignable."""
        return self._retention.keep

    @keep.setter
    def keep(self, policies: Sequence[RetentionPolicy] | None) -> None:
        self._retention.keep = check_policies(policies)

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, keep={self.keep!r})"

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        metrics: Mapping[str, float] | None = None,
        epoch: int | None = None,
        force: bool = False,
    ) -> Checkpoint | None:
        """Save ``state`` as the checkpoint of ``step``, atomically, then apply retention.

        With save triggers, this writes only when a trigger says so (or ``force``,
        or after a ``save_on_signal`` signal) and returns None otherwise. Saving a
        step that already exists replaces it (atomically). A step older than the
        run's newest is refused before anything is written: call :meth:`restore`
        first to continue the run, or branch from an older checkpoint on purpose with
        ``restore(state, step=k, discard_newer=True)``.

        With ``async_save`` it returns once the state is staged; the record then
        describes the checkpoint being written (``nbytes`` is the tensor bytes),
        which is durable, and listed by ``checkpoints()``, after ``wait()``.

        Raises:
            InvalidArgumentError: bad step, state or metrics, or a step older than the
                run's newest (nothing is written).
            UnserializableStateError: a value in the state has no pickle-free encoding
                (nothing is written).
            InsufficientSpaceError: the disk, or a KeepWithinBytes budget once retention
                has run, cannot hold it (checked before writing, counting only the bytes
                this save writes: reused files are free), or the disk filled up while
                writing (the partial checkpoint is removed). With ``async_save``, raised
                by the next ``save()``, ``wait()`` or ``close()``.
            WriteError: an I/O error while writing, or in the clean-up after the commit;
                the message says which. With ``async_save`` this is raised by the next
                ``save()``, ``wait()`` or ``close()``, with the same message.
            LockedError: another process writes to the run.
        """
        check_step(step)
        _check_state(state, "save()")
        clean_metrics = check_metrics(metrics)
        if epoch is not None and (type(epoch) is not int or epoch < 0):
            raise InvalidArgumentError(f"epoch must be an int >= 0 or None, got {epoch!r}")
        if self._memory is not None and self._background is not None:
            self._background.poll()  # a durable save from memory may run on: its failure?
        elif self._background is not None:
            self._background.wait()  # one save in flight; surfaces the previous one's failure
        self._retiring.wait()  # as must the previous save's retention
        job = self._the_job()
        due = force or self._signals.pending is not None \
            or fires(self.triggers, step, epoch, clean_metrics, self.checkpoints)
        snap = self._memory is not None \
            and self._memory.due(step, epoch, clean_metrics, self.checkpoints)
        if self.triggers or self._signals.watching or self._memory is not None:
            # every rank saves, or none: rank 0's triggers decide, and a signal any rank
            # received makes every rank save and then exit with it
            votes = job.gather_json([due, self._signals.pending, snap])
            self._signals.pending = next((s for _, s, _ in votes if s is not None), None)
            due = votes[0][0] or self._signals.pending is not None
            snap = votes[0][2]
        if not (due or snap):
            return None
        with paused_gc():  # many small objects: see ckpts._tensors.gc
            snapshots = state.snapshot()  # refuses unserializable values before any write
            job.on_rank0(lambda: self._take_the_run(step))
            if self._memory is not None and self._background is not None:
                nbytes = self._memory.take(
                    step, epoch, clean_metrics, snapshots, job, background=self._background,
                    durable=(lambda staged, on: self._commit(step, staged, clean_metrics, epoch,
                                                             job=on)) if due else None)
                del snapshots  # freed while the collector is paused, as below
                checkpoint = self._records.pending(step, clean_metrics, epoch, nbytes) \
                    if due else None
            elif self._stager is not None and self._background is not None:
                staged = self._stager.stage(snapshots)
                # freed while the collector is paused: else the collection that ends the
                # pause scans all their objects (a state_dict's detached tensors, ...)
                del snapshots
                nbytes = self._stager.staged_bytes
                checkpoint = self._records.pending(step, clean_metrics, epoch, nbytes)
                # last: once the writer thread runs, it competes with this one for the GIL
                self._background.submit(
                    lambda: self._commit(step, staged, clean_metrics, epoch),
                    name=f"ckpts-save-{step}")
            else:  # durable once committed: retention need not hold the caller up (a budget
                later = job.rank == 0 and self._retention.budget is None  # must, though)
                checkpoint = self._commit(step, snapshots, clean_metrics, epoch, retire=not later)
                if later:
                    self._retiring.submit(lambda: self._retire(step), name=f"ckpts-retire-{step}")
        if due:
            for trigger in self.triggers:
                trigger.saved(step, epoch, clean_metrics)
        if self._memory is not None:
            self._memory.saved(step, epoch, clean_metrics)
        if self._signals.pending is not None:
            self.wait()
            log.warning("step %d committed after signal %d; exiting", step, self._signals.pending)
            self._signals.exit()
        return checkpoint

    def prepare(self, state: TrainState) -> None:
        """Allocate the memory saves of ``state`` need now, not at the first save.

        Async saves copy the state into kept host buffers (chunks of at most 256 MiB,
        pinned for CUDA tensors: about a second per 2 GB); sync saves of CUDA state
        stream through a few pinned chunks. Call this once the state is complete (after
        a restore, or the optimizer's first step): the first save then blocks no longer
        than later ones. It also checks that the state can be saved, as ``save()`` does.

        Args:
            state: the TrainState that ``save()`` will be given.

        Raises:
            InvalidArgumentError: ``state`` is not a TrainState.
            UnserializableStateError: a value in the state has no pickle-free encoding.

        Example:
            >>> manager = ckpts.CheckpointManager("runs/exp1", async_save=True)  # doctest: +SKIP
            >>> manager.prepare(state)  # before the training loop             # doctest: +SKIP
        """
        _check_state(state, "prepare()")
        if self._memory is not None:
            return self._memory.check_room(state, self._the_job())
        with paused_gc():  # many small objects: see ckpts._tensors.gc
            snapshots = state.snapshot()  # refuses unserializable values, as save() does
            if self._stager is not None:
                self._stager.prepare(snapshots)
                log.info("prepared %d bytes of staging memory in %d chunk(s) for %s",
                         self._stager.allocated_bytes, self._stager.chunk_count, self.directory)
            elif any(t.is_cuda for snap in snapshots.values() for t in snap.tensors.values()):
                shared_pool(pinned=True).reserve()
            del snapshots  # freed while the collector is paused, as in save()

    def wait(self) -> None:
        """Block until the save in flight (async mode) is committed and retention has run.

        Raises:
            CheckpointError: the background save failed (raised once).
        """
        if self._background is not None:
            self._background.wait()
        self._retiring.wait()

    def close(self) -> None:
        """Wait for the save in flight, raise its failure, release the run's writer lock
        and restore signal handlers."""
        self._signals.stop()
        kept = False  # the newest memory snapshot is durable, or needs not be
        try:
            self.wait()
            if self._memory is not None:
                job = self._the_job()
                newest = self.latest() if job.rank == 0 else None
                self._memory.persist(job, job.broadcast_json(newest and newest.step),
                                     self._commit)
            kept = True
        finally:
            if self._memory is not None:
                self._memory.close(free=kept)
            if self._run_writer.locked:
                self._run_writer.unlock()
                # another process may write the run now: look at it afresh next time
                self._steps.forget()
                self._reusable = None

    def _take_the_run(self, step: int) -> None:
        """Become the run's writer and check that ``step`` may be saved (rank 0)."""
        self._run_writer.lock()
        self._steps.check(step)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _the_job(self) -> Job:
        """This process's job (one process, or the ranks of a torch.distributed job),
        found at the first save or restore, which every rank makes."""
        if self._job is None:
            self._job = job_of(*self._job_of, run=self.storage.location)
        return self._job

    def _commit(self, step: int, snapshots: Mapping[str, ObjectSnapshot],
                clean_metrics: dict[str, float], epoch: int | None, *,
                job: Job | None = None, retire: bool = True) -> Checkpoint:
        """Write, commit atomically, then apply retention (with ``retire``; see _retire).

        A failed write (ENOSPC, EIO, ...) removes its partial data and leaves every
        earlier checkpoint as it was; the training process can go on. No OSError
        escapes: what fails before the commit and what fails after it each become a
        CheckpointError that says which.
        """
        name = checkpoint_name(step)
        pending = self._run_writer.begin(name)
        try:
            reusable, reused = (job or self._the_job()).write(
                self.storage, step, snapshots, stage=pending.stage, commit=pending.commit,
                metrics=clean_metrics, epoch=epoch, max_shard_size=self.max_shard_size,
                reusable=self._reusable, before_writing=lambda nbytes, reusing:
                self._check_space(step, nbytes, reusing, clean_metrics))
            self._reusable = reusable if self.dedup else None
        except BaseException as e:
            pending.abort()
            if isinstance(e, OSError):
                raise write_error(e, step, self.storage.location,
                                  self.storage.free_space()) from e
            raise
        if pending.manifest is None:  # a rank other than 0: rank 0 committed, keeps the books
            return Checkpoint(step=step, path=self._records.path_of(step), metrics=clean_metrics,
                              epoch=epoch, storage=self.storage)
        manifest, encoded = pending.manifest, pending.encoded
        final = self.storage.where(name)
        log.info("saved step %d to %s%s", step, final,
                 f" (reused {len(reused)} unchanged file(s))" if reused else "")
        history.append(self.storage, step, clean_metrics)
        try:
            checkpoint = Checkpoint.from_manifest(self.storage, name, manifest, committed_sizes(
                self.storage, name, manifest, len(encoded)))
            self._steps.committed(step)  # ends a branch: deletes its newer steps
            if self.restored_from is not None and step > self.restored_from:
                self.restored_from = None  # a newer checkpoint of this process now exists
        except OSError as e:
            raise cleanup_error(step, self.storage, e) from e
        if retire:
            self._retire(step)
        return checkpoint

    def _retire(self, step: int) -> None:
        """Retention once ``step`` is committed (rank 0)."""
        try:
            self._apply_retention()
        except OSError as e:
            raise cleanup_error(step, self.storage, e) from e

    @paused_gc()
    def restore(self, state: TrainState, *, step: int | None = None,
                missing_ok: bool = True, discard_newer: bool = False) -> int | None:
        """Load the newest intact checkpoint (or ``step``) into ``state``, in place.

        A checkpoint that fails verification is skipped with a warning naming it,
        and the next newest is tried; the run then goes on from the one restored,
        and the newer, corrupt ones are deleted once its next checkpoint is
        committed (pinned ones are kept). Restoring means this process will write the
        run, so it takes the run's writer lock first: a second launch of the same
        job fails here, before it trains. (An evaluation job that only reads uses
        :func:`ckpts.load_weights` and :meth:`add_metrics`, which need no lock.)

        Each object's ``state_dict()`` is called first, to check that it fits the
        checkpoint and to find the live tensors to fill, before anything is
        loaded; an exception there or in ``load_state_dict()`` is an
        ``IncompatibleStateError`` naming the object.

        Args:
            state: the live objects to load into.
            step: restore this step instead of the newest.
            missing_ok: with False, a run that has no checkpoint raises instead of
                returning None (a job that must resume, never start over).
            discard_newer: branch from ``step`` on purpose: later saves may use steps
                above ``step`` although newer checkpoints exist, and those newer
                checkpoints are deleted once the first new checkpoint is committed
                (nothing is deleted before). Needs ``step``.

        Returns:
            The step restored, or None when the run has no checkpoint yet.

        Raises:
            NotACheckpointError: ``step`` was given and has no committed checkpoint,
                or ``missing_ok=False`` and the run has none.
            CorruptCheckpointError: ``step`` was given and fails verification, or
                every checkpoint of the run does.
            IncompatibleStateError: the checkpoint does not fit ``state``.
            LockedError: another process writes to the run.
        """
        _check_state(state, "restore()")
        if step is not None:
            check_step(step)
        if discard_newer and step is None:
            raise InvalidArgumentError(
                "restore(discard_newer=True) needs step=K: the older checkpoint to branch from"
            )
        self._settle()
        job = self._the_job()
        if self._memory is not None:
            self._memory.own(job)  # first: a keeper persisting a dead trainer's state is done
        choice: dict[str, Any] = {}
        job.on_rank0(lambda: choice.update(choose(
            self._run_writer, step, missing_ok=missing_ok or self._memory is not None,
            discard_newer=discard_newer, checkpoints=self.checkpoints)))
        choice = job.broadcast_json(choice if job.rank == 0 else None)
        if self._memory is not None:
            from_memory = self._memory.restore(state, job, choice["names"], step=step,
                                               missing_ok=missing_ok)
            if from_memory is not None:
                self.restored_from, self._reusable = from_memory, None
                return from_memory
        if not choice["names"]:
            return None
        name, contents, corrupt = first_intact(self.storage, choice["names"], choice["sizes"],
                                               state, job=job, step=step)
        restored = parse_step(name) or 0
        self.restored_from = restored
        self._reusable = Reusable.of(contents, job.rank) if self.dedup else None
        if job.rank != 0:
            return restored  # rank 0 keeps the run's books
        if discard_newer and choice["newer"]:
            self._steps.branch_from(restored, tuple(choice["newer"]))
            log.info("branching from step %d: steps %s go once a new step is committed",
                     restored, choice["newer"])
        elif corrupt:
            branch_past_corrupt(self._steps, self.checkpoints(), restored, corrupt,
                                self.directory)
        log.info("restored step %d from %s", restored, self.storage.where(name))
        return restored

    def _settle(self) -> None:
        """Let a save in flight and retention finish (a failure stays for save/wait/close)."""
        if self._background is not None:
            self._background.join()
        self._retiring.join()

    def _check_space(self, step: int, needed: int, reused: Mapping[str, int],
                     metrics: dict[str, float]) -> None:
        """Refuse a save that the disk or the budget cannot hold, before writing a byte
        (see Retention.check_space); ``reused``: the files it takes from the previous
        checkpoint."""
        upcoming = Checkpoint(step=step, path=self._records.path_of(step), metrics=metrics)
        # as _commit will see it: a newer commit ends the restored-from protection
        restored = self.restored_from if self.restored_from is not None \
            and step <= self.restored_from else None
        self._retention.check_space(
            upcoming, needed=needed, reused=reused, checkpoints=self._records.checkpoints,
            source=self._reusable.name if self._reusable else None,
            protected=(restored, step))

    def _apply_retention(self, *, dry_run: bool = False, if_unlocked: bool = False
                         ) -> list[Checkpoint]:
        """Delete what the policies do not keep, never the checkpoint restored from or
        the one this process saved last (see Retention.apply)."""
        return self._retention.apply(self._records.checkpoints, lock=self._run_writer.held,
                                     dry_run=dry_run, if_unlocked=if_unlocked,
                                     protected=(self.restored_from, self._steps.last_saved))

    # ---- the records of the run: none of these needs the writer lock -------------------

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, ascending by step (reads only manifests)."""
        self._retiring.join()  # as retention leaves them
        return self._records.checkpoints()

    def latest(self) -> Checkpoint | None:
        """The newest committed checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def best(self, metric: str, mode: Mode = "min") -> Checkpoint | None:
        """The checkpoint with the best ``metric``; None if no checkpoint has it.

        NaN ranks last; among equal values the earlier step wins. A damaged
        checkpoint (a file missing or of the wrong size) is skipped with a warning.
        """
        return self._records.best(metric, mode)

    def add_metrics(self, step: int, metrics: Mapping[str, float]) -> Checkpoint:
        """Attach metrics to a committed checkpoint (e.g. from a later evaluation job).

        The manifest is replaced atomically, and updates from several threads or
        processes at once all count; existing metrics of the same name are overwritten.
        This needs no writer lock, so an evaluation process can attach metrics while
        training writes the run. Retention is applied again afterwards, since rankings
        change: holding the writer lock for the deletions only, or left to the training
        process's next save while it holds the run. The returned record describes the
        checkpoint even if retention removed it.
        """
        self._settle()
        updated = self._records.add_metrics(step, metrics)
        self._apply_retention(if_unlocked=True)
        return updated

    def evaluate(self, fn: Callable[[Any], Mapping[str, float]], *, metrics: Sequence[str],
                 steps: Iterable[int] | None = None, model: torch.nn.Module | None = None,
                 progress: EvaluationProgress | None = None) -> dict[int, dict[str, float]]:
        """Evaluate committed checkpoints after the fact and attach what ``fn`` returns.

        With ``model``, each checkpoint's weights (only) are loaded into it and
        ``fn(model)`` is called; without it, ``fn(checkpoint)`` is. The returned
        metrics are recorded with :meth:`add_metrics`, one checkpoint at a time, so
        an interrupted evaluation resumes: a checkpoint that already has every name
        in ``metrics`` is skipped. ``progress`` is called after each checkpoint with
        (checkpoint, the metrics recorded or None when skipped, done, in all).
        Returns ``{step: metrics}`` for the checkpoints evaluated in this call.

        Raises:
            InvalidArgumentError: ``metrics`` is empty, or ``fn`` did not return them all.
            NotACheckpointError: a step in ``steps`` has no committed checkpoint.

        Example:
            >>> manager.evaluate(lambda m: {"val_acc": accuracy(m)}, metrics=["val_acc"],
            ...                  model=build_model())                      # doctest: +SKIP
        """
        return evaluate(self, fn, metrics=metrics, steps=steps, model=model, progress=progress)

    def pin(self, step: int, tag: str = "pinned") -> Checkpoint:
        """Protect a checkpoint from retention until :meth:`unpin`, under a tag.

        Like :meth:`add_metrics`, this works while another process writes the run.
        """
        if not isinstance(tag, str) or not tag:
            raise InvalidArgumentError(f"tag must be a non-empty str, got {tag!r}")
        self._settle()
        return self._records.retag(step, lambda tags: sorted({*tags, tag}))

    def unpin(self, step: int, tag: str | None = None) -> Checkpoint:
        """Remove one tag (or all with ``tag=None``); retention then applies again.

        The returned record describes the checkpoint even if retention removed it.
        """
        self._settle()
        updated = self._records.retag(step, lambda tags: [] if tag is None
                                      else [t for t in tags if t != tag])
        self._apply_retention(if_unlocked=True)
        return updated

    def prune(self, *, dry_run: bool = False) -> list[Checkpoint]:
        """Apply the retention policies now. Returns the checkpoints removed (or that
        would be, with ``dry_run``)."""
        self._settle()
        return self._apply_retention(dry_run=dry_run)


def _check_state(state: object, call: str) -> None:
    if not isinstance(state, TrainState):
        raise InvalidArgumentError(
            f"{call} needs a ckpts.TrainState, got {type(state).__qualname__}; wrap your "
            "objects: TrainState(model=model, optimizer=optimizer)")

"""The processes that save and restore a checkpoint together, behind one interface: one
process (:class:`OneProcess`), or every rank of a torch.distributed job (:class:`ManyRanks`).

The manager and the restore code call a :class:`Job` and never ask which kind it is:
one process is the trivial job (its collectives return its own values, it writes the
whole state and commits), while many ranks each write their part and rank 0 commits
(see ckpts._checkpoint.sharded). :func:`job_of` picks one, once per manager.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ckpts._checkpoint.ranks import DAMAGE, Ranks
from ckpts._checkpoint.sharded import materialize_optimizer_state, read_on_ranks, write_on_ranks
from ckpts._checkpoint.write import new_manifest, write_checkpoint
from ckpts._format.index import Contents
from ckpts._format.manifest import tensor_entry
from ckpts._state.train_state import ObjectSnapshot, Stateful
from ckpts._tensors.reading import Key, read_tensors
from ckpts._tensors.writing import BeforeWriting, Reusable
from ckpts.storage import Staged, Storage

Stage = Callable[[], Staged]  # stages the new checkpoint (on the process that commits)
Commit = Callable[[dict[str, Any]], None]  # commits its manifest (on that process)


class Job(Protocol):
    """The processes that save and restore together; every one of them makes each call.

    ``rank`` 0 keeps the run's books (lock, listing, retention); the collectives let the
    others learn what it decided, and let no process go on alone after a failure.
    """

    rank: int
    size: int

    def gather_json(self, value: Any) -> list[Any]:
        """Every process's ``value`` (JSON), on every process, in rank order."""
        ...

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's ``value`` (JSON), on every process."""
        ...

    def on_rank0(self, action: Callable[[], object]) -> None:
        """Run ``action`` on rank 0 only; a CheckpointError it raises is raised on every
        process."""
        ...

    def problems(self, error: BaseException | None) -> tuple[list[str], bool]:
        """Every process's failure (none when all succeeded), and whether each is a
        damaged or unreadable checkpoint (a restore may then try an older one)."""
        ...

    def write(self, storage: Storage, step: int, snapshots: Mapping[str, ObjectSnapshot], *,
              stage: Stage, commit: Commit, metrics: Mapping[str, float], epoch: int | None,
              max_shard_size: int, reusable: Reusable | None, before_writing: BeforeWriting
              ) -> tuple[Reusable | None, list[str]]:
        """Write a save's tensor files (staging first), then commit its manifest. Returns
        this process's files, for its next save to reuse, and the files reused."""
        ...

    def prepare(self, obj: Stateful) -> None:
        """Ready a live object, before its ``state_dict()`` is taken, to be read into."""
        ...

    def saved_object(self, contents: Contents, name: str) -> dict[str, Any]:
        """Saved object ``name`` with the tensor entries :meth:`read` takes."""
        ...

    def read(self, storage: Storage, contents: Contents,
             entries: Mapping[Key, Mapping[str, Any]], live: Mapping[Key, torch.Tensor]
             ) -> dict[Key, torch.Tensor]:
        """Read the tensors of ``entries`` (from :meth:`saved_object`) of the checkpoint
        ``contents`` describes, into ``live`` tensors where they fit, every byte checked
        against its hash. Returns every key's tensor."""
        ...


class OneProcess:
    """A job of one process: it writes and reads everything itself."""

    rank = 0
    size = 1

    def gather_json(self, value: Any) -> list[Any]:
        return [value]

    def broadcast_json(self, value: Any) -> Any:
        return value

    def on_rank0(self, action: Callable[[], object]) -> None:
        action()

    def problems(self, error: BaseException | None) -> tuple[list[str], bool]:
        if error is None:
            return [], True
        return [str(error)], isinstance(error, DAMAGE)

    def write(self, storage: Storage, step: int, snapshots: Mapping[str, ObjectSnapshot], *,
              stage: Stage, commit: Commit, metrics: Mapping[str, float], epoch: int | None,
              max_shard_size: int, reusable: Reusable | None, before_writing: BeforeWriting
              ) -> tuple[Reusable | None, list[str]]:
        manifest, reused, following = write_checkpoint(
            storage, stage(), step=step, snapshots=snapshots, metrics=metrics, epoch=epoch,
            max_shard_size=max_shard_size, reusable=reusable, before_writing=before_writing)
        commit(manifest)
        return following, reused

    def prepare(self, obj: Stateful) -> None:
        pass

    def saved_object(self, contents: Contents, name: str) -> dict[str, Any]:
        return contents.object(name)  # every piece located: one process reads them all

    def read(self, storage: Storage, contents: Contents,
             entries: Mapping[Key, Mapping[str, Any]], live: Mapping[Key, torch.Tensor]
             ) -> dict[Key, torch.Tensor]:
        fillable = _without_overlaps(live)
        return read_tensors(storage, contents.name, contents.files,
                            {key: tensor_entry(info) for key, info in entries.items()},
                            {key: fillable[key] for key in entries if key in fillable},
                            fill_targets=True)


class ManyRanks:
    """The ranks of a torch.distributed job: each writes and reads its own part
    (ckpts._checkpoint.sharded), rank 0 commits."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.rank, self.size = ranks.rank, ranks.size

    def gather_json(self, value: Any) -> list[Any]:
        return self.ranks.gather_json(value)

    def broadcast_json(self, value: Any) -> Any:
        return self.ranks.broadcast_json(value)

    def on_rank0(self, action: Callable[[], object]) -> None:
        self.ranks.on_rank0(action)

    def problems(self, error: BaseException | None) -> tuple[list[str], bool]:
        return self.ranks.problems(error)

    def write(self, storage: Storage, step: int, snapshots: Mapping[str, ObjectSnapshot], *,
              stage: Stage, commit: Commit, metrics: Mapping[str, float], epoch: int | None,
              max_shard_size: int, reusable: Reusable | None, before_writing: BeforeWriting
              ) -> tuple[Reusable | None, list[str]]:
        """Each rank writes one file per object (no shard size, no space check ahead)."""
        written = write_on_ranks(
            storage, self.ranks, step, snapshots, stage=stage, reusable=reusable,
            commit=lambda files, objects, per_rank: commit(new_manifest(
                step=step, epoch=epoch, metrics=metrics, files=files, objects=objects,
                world_size=self.size, per_rank=per_rank)))
        return written, []

    def prepare(self, obj: Stateful) -> None:
        if isinstance(obj, torch.optim.Optimizer):
            materialize_optimizer_state(obj)  # live shards to read into

    def saved_object(self, contents: Contents, name: str) -> dict[str, Any]:
        return contents.object(name, located=False)  # each rank finds the pieces it needs

    def read(self, storage: Storage, contents: Contents,
             entries: Mapping[Key, Mapping[str, Any]], live: Mapping[Key, torch.Tensor]
             ) -> dict[Key, torch.Tensor]:
        return read_on_ranks(storage, contents, self.ranks, live, entries)


def job_of(process_group: Any, timeout: float, run: str) -> Job:
    """The job of this process, saving and restoring ``run``: the ranks of
    ``process_group`` (default: all) when torch.distributed is initialized, else one
    process. Every rank must call this at the same point (it creates a process group)."""
    if dist.is_available() and dist.is_initialized():
        ranks = Ranks.of_job(process_group, timeout, run)
        if ranks is not None:
            return ManyRanks(ranks)
    return OneProcess()


def _without_overlaps(live: Mapping[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
    """The live tensors whose memory overlaps no other's (tied ones, the same view, count
    once): the others get new memory instead.

    Reading two files into overlapping memory would let one file's bytes land in the
    other's before its hash is taken. Spans are byte extents, so interleaved views
    (columns of one matrix) count as overlapping too: they are replaced, which is slower
    but still exact.
    """
    by_storage: dict[tuple[Any, int], list[tuple[Key, torch.Tensor]]] = defaultdict(list)
    for key, t in live.items():
        if t.numel():
            by_storage[(t.device, t.untyped_storage().data_ptr())].append((key, t))
    overlapping: set[Key] = set()
    for shared in by_storage.values():
        if len(shared) < 2:
            continue
        # view identity -> (first byte, end byte, keys)
        views: dict[tuple[Any, ...], tuple[int, int, list[Key]]] = {}
        for key, t in shared:
            size = t.element_size()
            start = int(t.storage_offset()) * size
            end = start + size * (1 + sum(int(n - 1) * s for n, s in zip(t.shape, t.stride(),
                                                                           strict=True)))
            identity = (start, tuple(t.shape), t.stride(), t.dtype, t.is_conj(), t.is_neg())
            views.setdefault(identity, (start, end, []))[2].append(key)
        ordered = sorted(views.values(), key=lambda span: (span[0], span[1]))
        reach = -1  # the furthest end byte of the spans before this one
        for i, (start, end, keys) in enumerate(ordered):
            if start < reach or (i + 1 < len(ordered) and ordered[i + 1][0] < end):
                overlapping.update(keys)
            reach = max(reach, end)
    return {key: t for key, t in live.items() if key not in overlapping}

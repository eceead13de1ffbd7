"""The ranks of a torch.distributed job that save and restore together, and the small
collectives ckpts makes among them (JSON values as byte tensors, no pickle) on a gloo
group of its own, created with a timeout so that a rank that dies or hangs makes every
rank raise instead of waiting forever.

A collective that fails (a rank is gone: the connection closed; or it did not answer
within the timeout) raises :class:`~ckpts.errors.WriteError` naming the run, with
torch.distributed's error as its ``__cause__``."""

from __future__ import annotations

import datetime
import json
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ckpts import errors
from ckpts.errors import (
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    WriteError,
)

# a checkpoint that is damaged or cannot be read: a restore may try an older one
DAMAGE = (CorruptCheckpointError, NotACheckpointError, OSError)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: its rank, the world size, and ckpts' own gloo
    group (with a timeout) for every collective ckpts makes."""

    rank: int
    size: int
    group: dist.ProcessGroup
    on_this_host: int = 1  # ranks of the job on this machine (for Storage.share_host)
    timeout: float = 600.0  # seconds a collective waits for the other ranks
    run: str = ""  # the run they save and restore, for messages

    @classmethod
    def of_job(cls, process_group: dist.ProcessGroup | None, timeout: float,
               run: str) -> Ranks | None:
        """The job's ranks, or None when torch.distributed is not initialized. Every rank
        must call this at the same point (it creates a process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
        with lost_rank_errors(run, len(ranks), timeout):
            group = dist.new_group(ranks, backend="gloo",
                                   timeout=datetime.timedelta(seconds=timeout))
        job = cls(dist.get_rank(group), dist.get_world_size(group), group, timeout=timeout,
                  run=run)
        hosts = job.gather_json(socket.gethostname())
        return replace(job, on_this_host=hosts.count(socket.gethostname()))

    def gather_json(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (JSON), on every rank, in rank order."""
        data = torch.frombuffer(bytearray(json.dumps(value).encode() or b" "), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        with lost_rank_errors(self.run, self.size, self.timeout):
            dist.all_gather(sizes, torch.tensor([data.numel()]), group=self.group)
            longest = int(max(size.item() for size in sizes))
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[:data.numel()] = data
            found = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(found, padded, group=self.group)
        return [json.loads(bytes(chunk[:int(size.item())].numpy()))
                for chunk, size in zip(found, sizes, strict=True)]

    def global_ranks(self) -> list[int]:
        """The job's ranks as torch.distributed's default group numbers them, in order."""
        return list(dist.get_process_group_ranks(self.group))

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's ``value`` (JSON), on every rank."""
        return self.gather_json(value if self.rank == 0 else None)[0]

    def on_rank0(self, action: Callable[[], object]) -> None:
        """Run ``action`` on rank 0 only; a CheckpointError it raises is raised on every
        rank (same class, same message), so no rank goes on alone."""
        failure = None
        if self.rank == 0:
            try:
                action()
            except Exception as e:  # every rank learns of it before rank 0 raises
                failure = [type(e).__name__, f"rank 0: {e}"]
                if self.broadcast_json(failure) is not None:
                    raise
        found = self.broadcast_json(failure)
        if found is not None:
            kind = getattr(errors, found[0], CheckpointError)
            raise (kind if isinstance(kind, type) and issubclass(kind, CheckpointError)
                   else CheckpointError)(found[1])

    def problems(self, error: BaseException | None) -> tuple[list[str], bool]:
        """Every rank's failure (``"rank N: ..."``; none when all succeeded), and whether
        each is a damaged or unreadable checkpoint (a restore may then try an older one)."""
        damaged = isinstance(error, DAMAGE)
        found = self.gather_json(None if error is None else
                                 [f"{type(error).__name__}: {error}", damaged])
        return ([f"rank {rank}: {entry[0]}" for rank, entry in enumerate(found) if entry],
                all(entry[1] for entry in found if entry))


@contextmanager
def lost_rank_errors(run: str, size: int, timeout: float) -> Iterator[None]:
    """Turn the failure of a torch.distributed call inside the block (it raises a
    RuntimeError, such as DistBackendError: a closed connection, a timeout) into a
    WriteError that names the run and says what to do."""
    try:
        yield
    except RuntimeError as e:
        raise WriteError(
            f"{run}: another rank of the {size}-rank job saving and restoring it is gone (it "
            f"died, exited or was killed) or did not answer within collective_timeout="
            f"{timeout:g}s, so this rank cannot go on alone ({type(e).__name__}: {e}). "
            "Restart every rank of the job: it resumes from the newest committed "
            "checkpoint") from e

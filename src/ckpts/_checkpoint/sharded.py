"""Many ranks: every rank of a torch.distributed job writes its part, rank 0 commits.

The planning is torch.distributed.checkpoint's (DCP): its planners decide which rank
writes each replicated tensor (DDP: spread so that every rank writes) and describe
each DTensor shard (FSDP2) by its offsets in the global tensor, and its load planner
works out, for any world size, which part of which saved shard each rank needs.
This module supplies the storage side DCP calls: :class:`RankWriter` writes each
rank's tensors as safetensors files through the storage port, hashed from memory,
and :class:`RankReader` reads back exactly the byte ranges a rank needs, checking
them against the manifest's hashes. Nothing is pickled to disk: DCP's own metadata is
rebuilt from manifest.json, which rank 0 writes last (docs/format.md, format v3).

DCP's collectives run on the gloo group of :class:`ckpts._checkpoint.ranks.Ranks`
(created with a timeout), so a rank that fails or dies makes every rank raise within
that time instead of hanging. The manager reaches this module through
:class:`ckpts._checkpoint.job.ManyRanks`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckpts._checkpoint.ranks import Ranks
from ckpts._checkpoint.write import describe
from ckpts._format.manifest import (
    BLOCK,
    Shard,
    digest,
    new_sharded_entry,
    new_tensor_entry,
    tensor_pieces,
)
from ckpts._format.safetensors import DTYPE_NAMES, DTYPES, aligned_order
from ckpts._state.train_state import PER_RANK_KINDS, ObjectSnapshot
from ckpts._tensors.pieces import BoxRead
from ckpts._tensors.writing import Reusable, write_tensor_files
from ckpts.errors import (
    CorruptCheckpointError,
    WriteError,
)
from ckpts.storage._port import Range, Staged, Storage

Key = tuple[str, str]  # (object name, tensor key)

CHUNK = 32 * 2**20  # bytes of buffer a rank's restore holds at once (beyond its live tensors)


def flat_state(snapshots: Mapping[str, Any], rank: int) -> dict[str, torch.Tensor]:
    """The tensors DCP plans over, keyed ``object/key``; per-rank objects (RNG, loader
    positions) under ``object.rankN/key`` so that no rank's copy is taken for another's."""
    return {f"{saved_name(name, snap.kind, rank)}/{key}": tensor
            for name, snap in snapshots.items() for key, tensor in snap.tensors.items()}


def saved_name(name: str, kind: str, rank: int) -> str:
    """The manifest object name of a live object: per-rank kinds get ``.rankN``."""
    return f"{name}.rank{rank}" if kind in PER_RANK_KINDS else name


class RankWriter(StorageWriter):
    """DCP's storage side for a save: each rank writes one safetensors file per object
    (``model-rank00001.safetensors``) into the checkpoint rank 0 staged.

    Rank 0 stages in :meth:`prepare_global_plan` and commits in :meth:`finish`, through
    the callbacks it is given; DCP raises on every rank when any rank fails.
    """

    def __init__(self, storage: Storage, rank: int, *, stage: Callable[[], Staged],
                 commit: Callable[[Metadata, list[list[WriteResult]]], None],
                 reusable: Reusable | None) -> None:
        super().__init__()
        self.storage, self.rank, self.reusable = storage, rank, reusable
        self._stage, self._commit = stage, commit
        self.written: Reusable | None = None  # this rank's files, for the next save to reuse

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        staged = self._stage()
        return [dataclasses.replace(plan, storage_data={"staged": (staged.name, staged.where),
                                                        "rank": rank})
                for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        staged = Staged(*plan.storage_data["staged"])
        rank = plan.storage_data["rank"]
        by_object: dict[str, list[tuple[Any, torch.Tensor]]] = defaultdict(list)
        for item in plan.items:
            if item.type is WriteItemType.BYTE_IO:  # never planned: flat_state holds tensors
                raise TypeError(f"{item.index.fqn} is not a tensor")
            tensor = planner.resolve_data(item)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{item.index.fqn} resolved to {type(tensor).__name__}")
            by_object[item.index.fqn.split("/", 1)[0]].append((item, tensor.detach()))
        files = []
        for name, items in by_object.items():
            own = name.endswith(f".rank{rank}")  # a per-rank object's name says whose it is
            files.append((f"{name}.safetensors" if own else f"{name}-rank{rank:05d}.safetensors",
                          [(item.index.fqn.split("/", 1)[1], tensor)
                           for item, tensor in aligned_order(items)]))
        written = write_tensor_files(self.storage, staged, files, reusable=self.reusable,
                                     block=BLOCK)
        # durable from this rank's machine, before rank 0 commits
        self.storage.sync(staged, [file for file, _ in files])
        self.written = Reusable(staged.name, {
            file: (record.header_hash, {key: entry[2] for key, entry in record.tensors.items()})
            for (file, _), record in zip(files, written, strict=True)})
        results = []
        for (file, _), record, items in zip(files, written, by_object.values(), strict=True):
            for item, _ in items:
                key = item.index.fqn.split("/", 1)[1]
                begin, end, tensor_hash = record.tensors[key]
                results.append(WriteResult(index=item.index, size_in_bytes=end - begin,
                                           storage_data={
                    "file": file, "offsets": [begin, end], "hash": tensor_hash,
                    "blocks": record.blocks.get(key),
                    "record": {"nbytes": record.nbytes, "header": record.header,
                               "hash": record.header_hash, "rank": rank},
                }))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self._commit(metadata, results)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def storage_meta(self) -> None:
        return None


def tensor_records(metadata: Metadata, results: Sequence[Sequence[WriteResult]]
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """From DCP's global metadata and every rank's results: the manifest's file records,
    and each tensor's entry by ``object/key`` (format v3: a tensor spread over ranks
    lists its ``shards``, each with its place in the global tensor)."""
    by_index = {result.index: result.storage_data for rank in results for result in rank}
    files: dict[str, dict[str, Any]] = {}
    for data in by_index.values():
        files[data["file"]] = data["record"]
    entries: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):  # flat_state holds tensors only
            raise TypeError(f"{fqn} was planned as {type(meta).__name__}")
        shape, dtype = tuple(meta.size), DTYPES[meta.properties.dtype]
        pieces = []
        for chunk in meta.chunks:
            data = by_index[MetadataIndex(fqn, chunk.offsets)]
            begin, end = data["offsets"]
            pieces.append(Shard(data["file"], begin, end, data["hash"], tuple(chunk.offsets),
                                tuple(chunk.sizes), tuple(data["blocks"] or ())))
        if len(pieces) == 1 and pieces[0].size == shape:  # written whole, by one rank
            (piece,) = pieces
            entries[fqn] = new_tensor_entry(piece.file, dtype, shape, piece.begin, piece.end,
                                            piece.hash, piece.blocks)
        else:
            entries[fqn] = new_sharded_entry(dtype, shape, pieces)
    return files, entries


class RankReader(StorageReader):
    """DCP's storage side for a restore: the checkpoint's layout as DCP metadata (rebuilt
    from the manifest), and reads of just the byte ranges each rank's plan needs.

    ``entries`` maps each DCP key (``object/key``, as :func:`flat_state` names them)
    to its manifest tensor entry. A range inside a large tensor is read rounded out to
    whole BLOCKs, and each block is checked against its hash; a tensor without block
    hashes, or a range that needs all of it, is read whole and checked against its own
    hash (ckpts._tensors.pieces).
    """

    def __init__(self, storage: Storage, name: str, files: Mapping[str, Mapping[str, Any]],
                 entries: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self.storage, self.name, self.files = storage, name, files
        self.pieces: dict[MetadataIndex, tuple[Shard, torch.dtype]] = {}
        self.layout: dict[str, TensorStorageMetadata] = {}
        for fqn, info in entries.items():
            dtype = DTYPE_NAMES[info["dtype"]]
            chunks = []
            for piece in tensor_pieces(info):
                chunk = ChunkStorageMetadata(offsets=torch.Size(piece.origin),
                                             sizes=torch.Size(piece.size))
                chunks.append(chunk)
                self.pieces[MetadataIndex(fqn, chunk.offsets)] = (piece, dtype)
            self.layout[fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype), size=torch.Size(info["shape"]),
                chunks=chunks)

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return Metadata(state_dict_metadata=dict(self.layout))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool,
                              *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Check every header touched, then read each request. A box that is one
        contiguous run of bytes in the saved chunk and of the live tensor lands straight
        in the tensor (the bytes around it that its blocks need for their hashes go to
        small buffers); any other box goes through buffers of at most :data:`CHUNK`
        bytes at a time, then is copied in."""
        where = self.storage.where(self.name)
        files = sorted({self.pieces[item.storage_index][0].file for item in plan.items})
        headers = [(file, memoryview(bytearray(self.files[file]["header"]))) for file in files]
        self.storage.read_ranges(self.name, [Range(file, 0, view) for file, view in headers])
        for file, view in headers:
            if digest(view) != self.files[file]["hash"]:
                raise CorruptCheckpointError(
                    f"{where}/{file}: its header's hash differs from the manifest's")
        reads = []
        for item in plan.items:
            piece, dtype = self.pieces[item.storage_index]
            reads.append((item, BoxRead(piece, dtype, item.storage_offsets, item.lengths,
                                        planner.resolve_tensor(item).detach())))
        landing = [request for request in reads if request[1].landed]
        # a batch's buffers are made when it is read and go once it is done
        for batch in [landing, *_batches([request for request in reads
                                          if not request[1].landed])]:
            self.storage.read_ranges(self.name, [
                part for _, read in batch for part in read.ranges()])
            for item, read in batch:
                read.check_and_land(f"{where}/{read.piece.file}: tensor "
                                    f"{item.storage_index.fqn!r}")
                planner.commit_tensor(item, read.target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def _batches(requests: list[tuple[ReadItem, BoxRead]]) -> list[list[tuple[ReadItem, BoxRead]]]:
    """Requests grouped so that each group's spans add up to at most CHUNK bytes."""
    batches: list[list[tuple[ReadItem, BoxRead]]] = [[]]
    size = 0
    for request in requests:
        if batches[-1] and size + request[1].length > CHUNK:
            batches.append([])
            size = 0
        batches[-1].append(request)
        size += request[1].length
    return [batch for batch in batches if batch]


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state tensors (with the parameters' placements: DTensor
    shards under FSDP2) by one step of zero gradients at zero learning rate, so a
    restore has live tensors to read each rank's part into. Nothing else changes: the
    restore overwrites the state, and the parameters do not move at lr 0."""
    if optimizer.state:
        return
    grads = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
                grads.append(parameter)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if not isinstance(group["lr"], torch.Tensor) else group["lr"] * 0
    try:
        optimizer.step()
    finally:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        for parameter in grads:
            parameter.grad = None


def write_on_ranks(storage: Storage, ranks: Ranks, step: int,
                   snapshots: Mapping[str, ObjectSnapshot], *, stage: Callable[[], Staged],
                   commit: Callable[[dict[str, Any], dict[str, Any], list[str]], None],
                   reusable: Reusable | None) -> Reusable | None:
    """Every rank writes its part of a save (see the module docstring); rank 0 stages
    first (``stage``) and commits last (``commit(files, objects, per_rank)``). Returns
    this rank's files, for its next save to reuse.

    Raises:
        WriteError: any rank failed; every rank raises it, naming each failure.
    """
    from torch.distributed.checkpoint.state_dict_saver import save

    storage.share_host(ranks.on_this_host)  # the ranks of this machine share its cores
    per_rank = sorted(name for name, snap in snapshots.items() if snap.kind in PER_RANK_KINDS)
    mine = {saved_name(name, snapshots[name].kind, ranks.rank):
            {**describe(snapshots[name], {}), "keys": list(snapshots[name].tensors)}
            for name in per_rank}
    everyone = ranks.gather_json(mine)

    def finish(metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files, entries = tensor_records(metadata, results)
        objects = {name: describe(snap, {key: entries[f"{name}/{key}"] for key in snap.tensors})
                   for name, snap in snapshots.items() if name not in per_rank}
        for rank_objects in everyone:
            for name, described in rank_objects.items():
                keys = described.pop("keys")
                objects[name] = {**described,
                                 "tensors": {key: entries[f"{name}/{key}"] for key in keys}}
        commit(files, objects, per_rank)

    writer = RankWriter(storage, ranks.rank, stage=stage, commit=finish, reusable=reusable)
    try:
        save(flat_state(snapshots, ranks.rank), storage_writer=writer,
                 process_group=ranks.group)
    except (CheckpointException, dist.DistError, RuntimeError) as e:
        raise WriteError(f"saving step {step} on {ranks.size} ranks to {storage.location} "
                         f"failed, so nothing was committed: {_failures(e)}. Earlier "
                         "checkpoints are intact; the next save starts afresh (a rank that "
                         "died or hung shows as a lost connection or a timeout: "
                         "CheckpointManager(collective_timeout=...))") from e
    return writer.written


def read_on_ranks(storage: Storage, name: str, files: Mapping[str, Mapping[str, Any]],
                  ranks: Ranks, live: Mapping[Key, torch.Tensor],
                  entries: Mapping[Key, Mapping[str, Any]]) -> dict[Key, torch.Tensor]:
    """Every rank reads what its own tensors need of ``entries`` (manifest tensor
    entries by (object, key)): into ``live`` tensors (DTensor shards included) where
    dtype and global shape match, else into new ones. Returns every key's tensor.

    Raises:
        CorruptCheckpointError: any rank found a hash that differs (every rank raises).
        OSError: any rank could not read (every rank raises).
    """
    from torch.distributed.checkpoint.state_dict_loader import load

    storage.share_host(ranks.on_this_host)  # the ranks of this machine share its cores
    targets: dict[str, torch.Tensor] = {}
    for (obj, key), info in entries.items():
        target = live.get((obj, key))
        if target is None or tuple(target.shape) != tuple(info["shape"]) \
                or DTYPES.get(target.dtype) != info["dtype"]:
            target = torch.empty(tuple(info["shape"]), dtype=DTYPE_NAMES[info["dtype"]])
        targets[f"{obj}/{key}"] = target
    reader = RankReader(storage, name, files, {f"{obj}/{key}": info
                                               for (obj, key), info in entries.items()})
    try:
        load(targets, storage_reader=reader, process_group=ranks.group)
    except (CheckpointException, dist.DistError, RuntimeError) as e:
        failures = getattr(e, "failures", {})
        if any(isinstance(_unwrapped(f), CorruptCheckpointError) for f in failures.values()):
            raise CorruptCheckpointError(_failures(e)) from e
        raise OSError(f"reading {storage.where(name)} on {ranks.size} ranks failed: "
                      f"{_failures(e)}") from e
    return {(obj, key): targets[f"{obj}/{key}"] for obj, key in entries}


def _failures(error: BaseException) -> str:
    """Each rank's failure, from DCP's CheckpointException (or the error itself)."""
    failures = getattr(error, "failures", None)
    if not failures:
        return f"{type(error).__name__}: {error}"
    return "; ".join(f"rank {rank}: {type(_unwrapped(failure)).__name__}: {_unwrapped(failure)}"
                     for rank, failure in sorted(failures.items()))


def _unwrapped(failure: object) -> object:
    """A rank's exception from a DCP ``failures`` value: an (exception, stack summary) pair
    (torch.distributed.checkpoint.utils._wrap_exception)."""
    if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
        return failure[0]
    return failure

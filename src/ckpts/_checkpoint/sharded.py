"""Many ranks: every rank of a torch.distributed job writes its part, rank 0 commits
(format v4, docs/format.md).

A save exchanges no plans: each rank computes the same layouts from the tensors it
holds (ckpts._checkpoint.rank_plan), writes its own pieces as safetensors files
through the storage port (hashed from memory) with an index of them, and sends rank 0
a status of a few hundred bytes; rank 0 writes ``layout.json`` and commits the
manifest last. A restore at any world size computes, for each live tensor (a DTensor
shard or a whole tensor), which saved pieces it overlaps, reads only those ranks'
indexes and only the byte ranges it needs, and checks every byte against its hashes.

Collectives run on the gloo group of :class:`ckpts._checkpoint.ranks.Ranks`
(created with a timeout), so a rank that fails or dies makes every rank raise within
that time instead of hanging. The manager reaches this module through
:class:`ckpts._checkpoint.job.ManyRanks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ckpts._checkpoint.rank_plan import (
    Layouts,
    TensorSpec,
    commit_plan,
    layout_entries,
    piece_entries,
    piece_file,
    pieces_of,
    planned_reads,
    rank_index,
    rank_status,
    shared_layouts,
)
from ckpts._checkpoint.ranks import Ranks
from ckpts._checkpoint.write import describe, object_contents, object_fields
from ckpts._format.index import LAYOUT, Contents, rank_index_name
from ckpts._format.layout import Box
from ckpts._format.manifest import BLOCK, digest, new_tensor_entry
from ckpts._format.safetensors import DTYPE_NAMES, DTYPES, aligned_order
from ckpts._state.train_state import PER_RANK_KINDS, ObjectSnapshot
from ckpts._tensors.pieces import BoxRead
from ckpts._tensors.writing import Reusable, WrittenFile, write_tensor_files
from ckpts.errors import CorruptCheckpointError, InvalidArgumentError, WriteError
from ckpts.storage._port import Range, Staged, Storage

Key = tuple[str, str]  # (object name, tensor key)

CHUNK = 32 * 2**20  # bytes of buffer a rank's restore holds at once (beyond its live tensors)


def saved_name(name: str, kind: str, rank: int) -> str:
    """The manifest object name of a live object: per-rank kinds get ``.rankN``."""
    return f"{name}.rank{rank}" if kind in PER_RANK_KINDS else name


def tensor_spec(where: str, key: str, tensor: torch.Tensor, job_ranks: list[int]) -> TensorSpec:
    """A shared tensor's spec: a DTensor's mesh and placements (its mesh must be the
    job's ranks, in order), or none for a tensor every rank holds whole.

    Raises:
        InvalidArgumentError: a placement that format v4 cannot describe (a strided
            shard, a partial sum), or a mesh over other ranks than the job's.
    """
    dtype = DTYPES[tensor.dtype]
    if not isinstance(tensor, DTensor):
        return TensorSpec(dtype, tuple(tensor.shape))
    mesh = tensor.device_mesh
    if mesh.mesh.flatten().tolist() != job_ranks:
        raise InvalidArgumentError(
            f"{where}: tensor {key!r} is a DTensor on a mesh of ranks "
            f"{mesh.mesh.flatten().tolist()[:8]}..., not the job's ranks in order; save with "
            "a mesh over all of the job's ranks (init_device_mesh over the world)")
    placements = []
    for placement in tensor.placements:
        if type(placement) is Shard:
            placements.append(f"S{placement.dim}")
        elif type(placement) is Replicate:
            placements.append("R")
        else:
            raise InvalidArgumentError(
                f"{where}: tensor {key!r} has placement {placement!r}, which ckpts cannot "
                "save yet (Shard and Replicate only); redistribute it first")
    return TensorSpec(dtype, tuple(tensor.shape), tuple(mesh.mesh.shape), tuple(placements))


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, Box]:
    """A live tensor's own memory and where it lies in the global tensor."""
    if isinstance(tensor, DTensor):
        size, origin = compute_local_shape_and_global_offset(
            tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), (tuple(origin), tuple(size))
    return tensor, ((0,) * tensor.dim(), tuple(tensor.shape))


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
    storage.share_host(ranks.on_this_host)  # the ranks of this machine share its cores
    where = f"step {step} of {storage.location}"
    per_rank = sorted(name for name, snap in snapshots.items() if snap.kind in PER_RANK_KINDS)
    shared = {name: snap for name, snap in snapshots.items() if name not in per_rank}
    placed: list[Any] = [None]
    ranks.on_rank0(lambda: placed.__setitem__(0, _staged_place(stage())))
    staged = Staged(*ranks.broadcast_json(placed[0]))
    status: dict[str, Any]
    written: Reusable | None = None
    entries: dict[str, Any] = {}
    try:
        job_ranks = ranks.global_ranks()
        specs = {name: {key: tensor_spec(where, key, tensor, job_ranks)
                        for key, tensor in snap.tensors.items()}
                 for name, snap in shared.items() if snap.tensors}
        layouts = shared_layouts(specs, ranks.size)
        entries = layout_entries(specs, layouts)
        index, written = _write_rank(storage, staged, ranks.rank, snapshots, per_rank, layouts,
                                     reusable)
        status = rank_status(index, entries)
    except Exception as e:  # every rank learns of it through the statuses
        status = {"error": f"{type(e).__name__}: {e}"}
    statuses = ranks.gather_json(status)

    def finish() -> None:
        layout, files, objects = commit_plan(
            statuses, entries, where, size=ranks.size,
            shared={name: describe(snap, {}) for name, snap in shared.items()},
            per_rank={name: object_fields(snapshots[name]) for name in per_rank})
        storage.write(staged, [(LAYOUT, [memoryview(layout)])])
        commit(files, objects, per_rank)

    # a rank that failed (or disagrees on the layouts) makes rank 0's commit_plan raise
    ranks.on_rank0(lambda: _committing(finish, step, ranks.size, storage.location))
    return written


def _committing(finish: Callable[[], None], step: int, size: int, location: str) -> None:
    """Rank 0's commit, whose storage failure every rank then raises as a WriteError."""
    try:
        finish()
    except OSError as e:
        raise WriteError(f"saving step {step} on {size} ranks to {location} failed at rank "
                         f"0's commit, so nothing was committed: {type(e).__name__}: {e}. "
                         "Earlier checkpoints are intact; the next save starts afresh") from e


def _staged_place(staged: Staged) -> list[str]:
    return [staged.name, staged.where]


def _write_rank(storage: Storage, staged: Staged, rank: int,
                snapshots: Mapping[str, ObjectSnapshot], per_rank: list[str], layouts: Layouts,
                reusable: Reusable | None) -> tuple[bytes, Reusable]:
    """Write this rank's pieces (one safetensors file per object) and its index, and
    make them durable from this machine; returns the index and the files for reuse."""
    mine = pieces_of(layouts, rank)
    files = rank_files(rank, mine, snapshots, per_rank, lambda name, key, box: _held_piece(
        name, key, snapshots[name].tensors[key], box))
    records = write_tensor_files(storage, staged, files, reusable=reusable, block=BLOCK)
    by_file = dict(zip([file for file, _ in files], records, strict=True))
    index = rank_index_of(rank, mine, snapshots, per_rank, by_file)
    storage.write(staged, [(rank_index_name(rank), [memoryview(index)])])
    # durable from this rank's machine, before rank 0 commits
    storage.sync(staged, [*by_file, rank_index_name(rank)])
    return index, Reusable(staged.name, {
        file: (w.header_hash, {key: entry[2] for key, entry in w.tensors.items()})
        for file, w in by_file.items()})


def rank_files(rank: int, mine: Mapping[str, Mapping[str, Box]],
               snapshots: Mapping[str, ObjectSnapshot], per_rank: Sequence[str],
               piece: Callable[[str, str, Box], Any]) -> list[tuple[str, list[Any]]]:
    """The safetensors files ``rank`` writes, with their items in file order: one file
    of its pieces (``mine``) per shared object, each item ``piece(name, key, box)``,
    and one file per per-rank object with tensors."""
    files: list[tuple[str, list[Any]]] = []
    for name, boxes in mine.items():
        items = [(key, piece(name, key, box)) for key, box in boxes.items()]
        files.append((piece_file(name, rank), list(aligned_order(items))))
    files += [(f"{name}.rank{rank}.safetensors",
               list(aligned_order(snapshots[name].tensors.items())))
              for name in per_rank if snapshots[name].tensors]
    return files


def _held_piece(name: str, key: str, tensor: torch.Tensor, box: Box) -> torch.Tensor:
    """What this rank holds of a shared tensor, which must be its layout's ``box``."""
    memory, held = local_box(tensor)
    if not all(box[1]):  # a tensor of no elements: rank 0 saves it whole
        memory, held = memory.new_empty(box[1]), box
    if held != box:  # the layout's arithmetic must say what DTensor holds
        raise InvalidArgumentError(
            f"tensor {key!r} of {name!r} holds the box {held} of the global tensor, but its "
            f"layout gives {box}; ckpts cannot describe this sharding")
    return memory.detach()


def rank_index_of(rank: int, mine: Mapping[str, Mapping[str, Box]],
                  snapshots: Mapping[str, ObjectSnapshot], per_rank: Sequence[str],
                  written: Mapping[str, WrittenFile]) -> bytes:
    """``rank``'s index (ckpts._checkpoint.rank_plan.rank_index), from the files written
    (:func:`rank_files`)."""
    objects = {}
    for name in per_rank:
        snap, file = snapshots[name], f"{name}.rank{rank}.safetensors"
        objects[f"{name}.rank{rank}"] = object_contents(snap, {
            key: new_tensor_entry(file, DTYPES[tensor.dtype], tensor.shape,
                                  *written[file].tensors[key], written[file].blocks.get(key))
            for key, tensor in snap.tensors.items()})
    records = {file: {"nbytes": w.nbytes, "header": w.header, "hash": w.header_hash,
                      "rank": rank} for file, w in written.items()}
    return rank_index(rank, records, piece_entries(rank, mine, written), objects)


def read_on_ranks(storage: Storage, contents: Contents, ranks: Ranks,
                  live: Mapping[Key, torch.Tensor], entries: Mapping[Key, Mapping[str, Any]]
                  ) -> dict[Key, torch.Tensor]:
    """This rank reads what its own tensors need of ``entries`` (by (object, key): v4
    layouts, or v1-v3 entries): into ``live`` tensors (DTensor shards included) where
    dtype and global shape match, else into new ones. Returns every key's tensor.
    The ranks agree on the outcome afterwards (ckpts._run.restoring.first_intact).

    Raises:
        CorruptCheckpointError: a hash differs, or an index is damaged.
        OSError: the storage failed.
    """
    storage.share_host(ranks.on_this_host)  # the ranks of this machine share its cores
    where = storage.where(contents.name)
    targets: dict[Key, torch.Tensor] = {}
    requests = []
    for (obj, key), info in entries.items():
        target = live.get((obj, key))
        dtype, shape = DTYPE_NAMES[info["dtype"]], tuple(info["shape"])
        if target is None or tuple(target.shape) != shape or target.dtype != dtype:
            box: Box = ((0,) * len(shape), shape)
            reads = planned_reads(contents, obj, key, info, box)
            # the saved pieces must hold the tensor before memory is taken for it
            if sum(piece.end - piece.begin for piece, _ in reads) \
                    < math.prod(shape) * dtype.itemsize:
                raise CorruptCheckpointError(
                    f"{where}: the saved pieces of tensor {obj}/{key} do not cover its "
                    f"shape {list(shape)}")
            target = torch.empty(shape, dtype=dtype)
            memory = target
        else:
            memory, box = local_box(target)
            reads = planned_reads(contents, obj, key, info, box)
        targets[(obj, key)] = target
        for piece, (origin, size) in reads:
            into = memory
            for dim, (begin, length, mine) in enumerate(zip(origin, size, box[0], strict=True)):
                into = into.narrow(dim, begin - mine, length)
            offsets = [begin - saved for begin, saved in zip(origin, piece.origin, strict=True)]
            requests.append((f"{where}/{piece.file}: tensor {obj}/{key}",
                             BoxRead(piece, dtype, offsets, size, into)))
    _check_headers(storage, contents, {read.piece.file for _, read in requests})
    landing = [request for request in requests if request[1].landed]
    # a batch's buffers are made when it is read and go once it is done
    for batch in [landing, *_batches([r for r in requests if not r[1].landed])]:
        storage.read_ranges(contents.name, [part for _, read in batch for part in read.ranges()])
        for what, read in batch:
            read.check_and_land(what)
    return targets


def _check_headers(storage: Storage, contents: Contents, files: set[str]) -> None:
    """Every header a restore reads through matches its recorded hash."""
    headers = [(file, memoryview(bytearray(contents.files[file]["header"])))
               for file in sorted(files)]
    storage.read_ranges(contents.name, [Range(file, 0, view) for file, view in headers])
    for file, view in headers:
        if digest(view) != contents.files[file]["hash"]:
            raise CorruptCheckpointError(
                f"{contents.where}/{file}: its header's hash differs from the manifest's")


def _batches(requests: list[tuple[str, BoxRead]]) -> list[list[tuple[str, BoxRead]]]:
    """Requests grouped so that each group's spans add up to at most CHUNK bytes."""
    batches: list[list[tuple[str, BoxRead]]] = [[]]
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

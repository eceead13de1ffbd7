"""Many ranks, format v4: who saves what, what rank 0 gathers and commits, and which
saved pieces a rank restoring at any world size reads. Plain data in, plain data out
(no torch, no I/O), so that ``benchmarks/scale_sim.py`` runs these very functions for
thousands of simulated ranks.

A save needs no exchange of plans. Every rank holds the same shared tensors (a
DTensor's global shape and placements, or a tensor all ranks hold alike), so each
computes the same layouts (:func:`shared_layouts`) and finds its own pieces in them
(:func:`pieces_of`). Each rank writes its files and its index (:func:`rank_index`),
then sends rank 0 one small status (:func:`rank_status`): its index file's size and
hash, and a digest of the layouts it computed, so that a rank that disagrees is
caught. Rank 0 writes ``layout.json`` (:func:`layout_index`) and the manifest's
records (:func:`commit_records`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpts._format.index import LAYOUT, Contents, rank_index_name
from ckpts._format.layout import Box, Layout, assign_writers, intersect
from ckpts._format.manifest import DTYPE_SIZES, Shard, digest, encode_json, tensor_pieces
from ckpts.errors import WriteError

if TYPE_CHECKING:
    from ckpts._tensors.writing import WrittenFile


@dataclass(frozen=True)
class TensorSpec:
    """A shared tensor as a rank sees it: dtype name, global shape, and its layout's
    mesh and placements when it is a DTensor (else every rank holds it whole)."""

    dtype: str
    shape: tuple[int, ...]
    mesh: tuple[int, ...] = ()
    placements: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        count = DTYPE_SIZES[self.dtype]
        for dim in self.shape:
            count *= dim
        return count


Specs = Mapping[str, Mapping[str, TensorSpec]]  # object -> key -> spec
Layouts = dict[str, dict[str, Layout]]


def shared_layouts(specs: Specs, size: int) -> Layouts:
    """Every shared tensor's layout over ``size`` ranks: a DTensor's own, and for a
    tensor every rank holds whole, the rank that saves it (:func:`assign_writers`)."""
    whole = {f"{obj}/{key}": spec.nbytes for obj, tensors in specs.items()
             for key, spec in tensors.items() if not spec.mesh}
    writers = assign_writers(whole, size)
    return {obj: {key: Layout(spec.shape, spec.mesh, spec.placements) if spec.mesh
                  else Layout.whole(spec.shape, writers[f"{obj}/{key}"])
                  for key, spec in tensors.items()} for obj, tensors in specs.items()}


def pieces_of(layouts: Layouts, rank: int) -> dict[str, dict[str, Box]]:
    """The pieces ``rank`` saves: object -> key -> its box in the global tensor."""
    mine: dict[str, dict[str, Box]] = {}
    for obj, tensors in layouts.items():
        for key, layout in tensors.items():
            box = layout.piece_of(rank)
            if box is not None:
                mine.setdefault(obj, {})[key] = box
    return mine


def layout_entries(specs: Specs, layouts: Layouts) -> dict[str, dict[str, dict[str, Any]]]:
    """The tensor entries of ``layout.json``: dtype, global shape and layout."""
    return {obj: {key: {"dtype": specs[obj][key].dtype, "shape": list(layout.shape),
                        **layout.to_json()} for key, layout in tensors.items()}
            for obj, tensors in layouts.items()}


def layout_index(entries: Mapping[str, Mapping[str, Any]],
                 described: Mapping[str, Mapping[str, Any]]) -> bytes:
    """``layout.json``: each shared object's tree and aliases (``described``: from
    its snapshot) with its tensors' layout entries."""
    return encode_json({"objects": {obj: {"tree": described[obj]["tree"],
                                          "aliases": described[obj].get("aliases", {}),
                                          "tensors": dict(tensors)}
                                    for obj, tensors in entries.items()}})


def rank_index(rank: int, files: Mapping[str, Mapping[str, Any]],
               pieces: Mapping[str, Mapping[str, Mapping[str, Any]]],
               objects: Mapping[str, Mapping[str, Any]]) -> bytes:
    """A rank's index: its data ``files`` (size, header size, header hash), where each
    of its ``pieces`` of shared tensors is (object -> key -> file, offsets, hash,
    blocks), and its per-rank ``objects`` whole (tree, aliases, tensor entries)."""
    return encode_json({"rank": rank, "files": dict(files), "pieces": dict(pieces),
                        "objects": dict(objects)})


def rank_status(index: bytes, entries: Mapping[str, Any]) -> dict[str, Any]:
    """What a rank sends rank 0 after writing: its index's size and hash, and the
    digest of the layout entries it computed (every rank's must be the same)."""
    return {"index": [len(index), digest(index)], "layout": digest(encode_json(entries))}


def piece_file(name: str, rank: int) -> str:
    """The file that holds ``rank``'s pieces of shared object ``name``."""
    return f"{name}-rank{rank:05d}.safetensors"


def piece_entries(rank: int, mine: Mapping[str, Mapping[str, Box]],
                  written: Mapping[str, WrittenFile]) -> dict[str, dict[str, Any]]:
    """Where each of ``rank``'s pieces (:func:`pieces_of`) went in the files written
    (:func:`piece_file`): object -> key -> file, byte range, hash, block hashes."""
    pieces: dict[str, dict[str, Any]] = {}
    for name, boxes in mine.items():
        file = piece_file(name, rank)
        record = written[file]
        pieces[name] = {}
        for key in boxes:
            begin, end, tensor_hash = record.tensors[key]
            piece: dict[str, Any] = {"file": file, "offsets": [begin, end], "hash": tensor_hash}
            if record.blocks.get(key):
                piece["blocks"] = list(record.blocks[key])
            pieces[name][key] = piece
    return pieces


def commit_plan(statuses: Sequence[Any], entries: Mapping[str, Mapping[str, Any]], where: str,
                *, size: int, shared: Mapping[str, Mapping[str, Any]],
                per_rank: Mapping[str, Mapping[str, Any]]
                ) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """Rank 0's part of a commit, from every rank's status (:func:`commit_records`):
    ``layout.json``, and the manifest's files and objects. ``entries`` are the layout
    entries of the shared objects with tensors, ``shared`` every shared object whole
    (:func:`ckpts._checkpoint.write.describe` with no tensors), ``per_rank`` each
    per-rank object's manifest fields (kind, class)."""
    layout = layout_index(entries, shared)
    files = commit_records(statuses, layout, where)
    objects: dict[str, Any] = {}
    for name, described in shared.items():
        if name in entries:
            objects[name] = {key: value for key, value in described.items()
                             if key not in ("tree", "aliases", "tensors")} | {"index": LAYOUT}
        else:  # JSON alone: in the manifest itself
            objects[name] = dict(described)
    for rank in range(size):
        objects.update({f"{name}.rank{rank}": {**fields, "index": rank_index_name(rank)}
                        for name, fields in per_rank.items()})
    return layout, files, objects


def commit_records(statuses: Sequence[Any], layout: bytes, where: str
                   ) -> dict[str, dict[str, Any]]:
    """Rank 0's commit, from every rank's status: the manifest's file records (each
    rank's index, and ``layout.json``), after checking that every rank wrote its part
    and computed the layouts rank 0 did.

    Raises:
        WriteError: a rank failed (its error is named) or disagreed on the layouts.
    """
    failed = [f"rank {rank}: {status['error']}" for rank, status in enumerate(statuses)
              if "error" in status]
    if failed:
        raise WriteError(f"saving {where} failed on {len(failed)} rank(s), so nothing "
                         f"was committed: {'; '.join(failed[:8])}. Earlier checkpoints are "
                         "intact; the next save starts afresh")
    differ = [rank for rank, status in enumerate(statuses)
              if status["layout"] != statuses[0]["layout"]]
    if differ:
        raise WriteError(
            f"saving {where}: ranks {differ[:8]} hold other shared tensors than rank 0 "
            "(other keys, shapes, dtypes or placements), so nothing was committed; every "
            "rank must save the same model and optimizer")
    files = {rank_index_name(rank): {"nbytes": status["index"][0], "hash": status["index"][1]}
             for rank, status in enumerate(statuses)}
    files[LAYOUT] = {"nbytes": len(layout), "hash": digest(layout)}
    return files


def planned_reads(contents: Contents, name: str, key: str, entry: Mapping[str, Any],
                  box: Box) -> list[tuple[Shard, Box]]:
    """The saved pieces of tensor ``key`` of object ``name`` that a box of it overlaps,
    each with the overlap (in the global tensor). From a layout (format v4) the pieces
    are computed and only the index files of the ranks that saved them are read; from
    a v1-v3 entry (or a v4 one saved whole) its listed pieces are searched."""
    if "file" in entry or "shards" in entry:
        pieces = list(tensor_pieces(entry))
    else:
        shards = [contents.located_piece(rank, name, key, entry, origin, size)
                  for rank, (origin, size) in Layout.from_json(entry).pieces_overlapping(box)]
        pieces = list(tensor_pieces({"shape": entry["shape"], "shards": shards}))
    reads = []
    for piece in pieces:
        overlap = intersect(box, (piece.origin, piece.size)) if all(box[1]) else None
        if overlap is not None:
            reads.append((piece, overlap))
    return reads


def status_bytes(status: Any) -> int:
    """The bytes a status costs in the gather (as ckpts' JSON collectives send it)."""
    return len(json.dumps(status).encode())

"""Where the pieces of a tensor saved by many ranks are, by arithmetic (format v4; no torch).

A tensor of a job's shared objects (a model, an optimizer) is described once, by its
global shape, its dtype and one of two layouts:

- ``{"rank": w}``: saved whole by rank ``w`` (a tensor every rank holds alike, as
  under DDP; :func:`assign_writers` spreads these over the ranks by size);
- ``{"mesh": [n0, n1, ...], "placements": ["S0", "R", ...]}``: a DTensor's layout
  (FSDP2, tensor parallel, HSDP). The mesh is the job's ranks in order, shaped
  ``mesh``; placement ``"Sd"`` splits tensor dim ``d`` over that mesh dim as
  ``torch.chunk`` does (DTensor's ``Shard(d)``; mesh dims that split the same tensor
  dim apply left to right), and ``"R"`` replicates over it. Of the ranks that hold
  the same piece, the one at coordinate 0 on every ``"R"`` dim saves it.

So the layout costs O(tensors), not O(tensors x ranks): the piece of any rank is
computed (:func:`piece_of`), and the pieces a box of the tensor needs are found
without looking at the others (:func:`pieces_overlapping`), which is how a rank
restoring at another world size plans its reads (docs/format.md, docs/scale.md).
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (origin, size) inside a tensor
MAX_MESH_DIMS = 16  # a device mesh has a few dims (DP, FSDP, TP, PP, EP, CP...)


@dataclass(frozen=True)
class Layout:
    """A tensor's layout over the ranks of a job (see the module docstring)."""

    shape: tuple[int, ...]
    mesh: tuple[int, ...] = ()  # () for a tensor saved whole by ``writer``
    placements: tuple[str, ...] = ()
    writer: int = 0

    @classmethod
    def whole(cls, shape: Sequence[int], writer: int) -> Layout:
        return cls(tuple(shape), writer=writer)

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> Layout:
        """The layout of a v4 layout entry (checked by :func:`layout_problem`)."""
        if "rank" in entry:
            return cls(tuple(entry["shape"]), writer=entry["rank"])
        return cls(tuple(entry["shape"]), tuple(entry["mesh"]), tuple(entry["placements"]))

    def to_json(self) -> dict[str, Any]:
        if not self.mesh:
            return {"rank": self.writer}
        return {"mesh": list(self.mesh), "placements": list(self.placements)}

    @property
    def ranks(self) -> int:
        """How many ranks the layout spans (its mesh's size; 1 for a whole tensor)."""
        return math.prod(self.mesh) if self.mesh else 1

    def piece_of(self, rank: int) -> Box | None:
        """The box of the tensor that ``rank`` holds and saves, or None when it saves
        none of it (another replica saves it, its piece is empty, it is not the writer)."""
        if not self.mesh:
            return ((0,) * len(self.shape), self.shape) if rank == self.writer else None
        coords = _coordinates(rank, self.mesh)
        if not all(self.shape):  # no elements: the first rank saves the empty tensor
            return ((0,) * len(self.shape), self.shape) if rank == 0 else None
        if any(p == "R" and c for p, c in zip(self.placements, coords, strict=True)):
            return None
        origin, size = [0] * len(self.shape), list(self.shape)
        for n, placement, c in zip(self.mesh, self.placements, coords, strict=True):
            if placement != "R":
                d = int(placement[1:])
                begin, length = _chunk(size[d], n, c)
                origin[d] += begin
                size[d] = length
        if not all(size):
            return None  # an empty piece (the tail of an uneven split): nothing saved
        return tuple(origin), tuple(size)

    def pieces_overlapping(self, box: Box) -> Iterator[tuple[int, Box]]:
        """Each saving rank whose piece overlaps ``box`` (origin, size), with its piece.

        Along each mesh dim only the coordinates whose chunk meets the box are visited
        (a division, not a scan of the ranks), so a box needs work in proportion to the
        pieces it overlaps: one or two for a rank restoring FSDP shards at another
        world size."""
        if not self.mesh:
            yield self.writer, ((0,) * len(self.shape), self.shape)
            return
        if not all(box[1]) or not all(self.shape):
            return  # no elements to read
        # mesh dims apply left to right: the coordinates a dim visits depend on the
        # span the earlier dims left of the tensor dim it splits
        yield from self._walk(box, 0, [0] * len(self.mesh), [0] * len(self.shape),
                              list(self.shape))

    def _walk(self, box: Box, m: int, coords: list[int], origin: list[int],
              size: list[int]) -> Iterator[tuple[int, Box]]:
        if m == len(self.mesh):
            yield _rank_of(coords, self.mesh), (tuple(origin), tuple(size))
            return
        placement = self.placements[m]
        if placement == "R":
            coords[m] = 0
            yield from self._walk(box, m + 1, coords, origin, size)
            return
        d, n = int(placement[1:]), self.mesh[m]
        chunk = -(-size[d] // n) if size[d] else 0
        low, high = box[0][d] - origin[d], box[0][d] + box[1][d] - origin[d]  # box in span
        if chunk == 0 or high <= 0 or low >= size[d]:
            return
        for c in range(max(0, low) // chunk, min(n, -(-min(high, size[d]) // chunk))):
            begin, length = _chunk(size[d], n, c)
            if length == 0:
                continue
            saved_origin, saved_size = origin[d], size[d]
            coords[m], origin[d], size[d] = c, saved_origin + begin, length
            yield from self._walk(box, m + 1, coords, origin, size)
            origin[d], size[d] = saved_origin, saved_size


def _chunk(extent: int, parts: int, index: int) -> tuple[int, int]:
    """Where part ``index`` of ``parts`` of an extent begins and how long it is, as
    ``torch.chunk`` (and DTensor's ``Shard``) split it: parts of ceil(extent / parts),
    the last ones shorter or empty."""
    full = -(-extent // parts) if extent else 0
    begin = min(full * index, extent)
    return begin, min(extent, begin + full) - begin


def _coordinates(rank: int, mesh: Sequence[int]) -> list[int]:
    coords = []
    for n in reversed(mesh):
        rank, c = divmod(rank, n)
        coords.append(c)
    return coords[::-1]


def _rank_of(coords: Sequence[int], mesh: Sequence[int]) -> int:
    rank = 0
    for c, n in zip(coords, mesh, strict=True):
        rank = rank * n + c
    return rank


def intersect(a: Box, b: Box) -> Box | None:
    """The box both ``a`` and ``b`` cover, or None."""
    origin = tuple(max(x, y) for x, y in zip(a[0], b[0], strict=True))
    end = tuple(min(x + n, y + m) for x, n, y, m in zip(a[0], a[1], b[0], b[1], strict=True))
    if any(e <= o for o, e in zip(origin, end, strict=True)):
        return None
    return origin, tuple(e - o for o, e in zip(origin, end, strict=True))


SPREAD = 2**20  # bytes above which a tensor every rank holds is spread over the ranks


def assign_writers(sizes: Mapping[str, int], ranks: int) -> dict[str, int]:
    """Which rank saves each tensor that every rank holds alike. Those of at most SPREAD
    bytes (an optimizer's ``step``, a norm's weight under DDP) all go to rank 0: a
    restoring rank, which needs each of them whole, then reads one more index, not one
    per writer. The bigger ones go biggest first, each to the rank with the fewest bytes
    so far (ties to the lowest rank), so the ranks share the writing. Every rank
    computes the same answer from the same sizes: no rank needs another's list."""
    writers = {key: 0 for key, size in sizes.items() if size <= SPREAD}
    load = [(0, rank) for rank in range(ranks)]
    for key in sorted((k for k in sizes if k not in writers), key=lambda k: (-sizes[k], k)):
        total, rank = heapq.heappop(load)
        writers[key] = rank
        heapq.heappush(load, (total + sizes[key], rank))
    return writers


def layout_problem(entry: Any, world_size: int) -> str | None:
    """What is wrong with a v4 layout entry (with its ``shape``), or None."""
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return "has no valid shape"
    if "rank" in entry:
        rank = entry["rank"]
        return None if type(rank) is int and 0 <= rank < world_size else \
            f"names rank {rank!r}, outside the job's {world_size}"
    mesh, placements = entry.get("mesh"), entry.get("placements")
    if not isinstance(mesh, list) or not 0 < len(mesh) <= MAX_MESH_DIMS \
            or not all(type(n) is int and n > 0 for n in mesh) \
            or math.prod(mesh) != world_size or not isinstance(placements, list) \
            or len(placements) != len(mesh):
        return f"has a mesh that is not the job's {world_size} ranks"
    for placement in placements:
        if placement == "R":
            continue
        if not (isinstance(placement, str) and re.fullmatch(r"S(0|[1-9][0-9]{0,2})", placement)
                and int(placement[1:]) < len(shape)):
            return f"has an unknown placement {placement!r}"
    return None


def every_piece(layout: Layout) -> Iterator[tuple[int, Box]]:
    """Every saving rank with its piece, in rank order (for a reader of the whole)."""
    for rank in range(layout.ranks) if layout.mesh else (layout.writer,):
        piece = layout.piece_of(rank)
        if piece is not None:
            yield rank, piece


"""Reading a box of one saved piece of a tensor, checked by the piece's block hashes or its hash.

A piece (:class:`~ckpts._format.manifest.Shard`) is a tensor's bytes as one rank saved
them (format v3), or a whole tensor. Its readers want a box of it: a rank restoring at
another world size the part of a saved shard its own shard overlaps
(ckpts._checkpoint.sharded), one process each piece whole, to assemble the tensor
(ckpts._tensors.reading). :class:`BoxRead` is that read: the span of the piece's bytes
to read, where they land, and the check of every byte read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import xxhash

from ckpts._format.manifest import BLOCK, HASH_PREFIX, Shard
from ckpts._format.safetensors import byte_view
from ckpts.errors import CorruptCheckpointError
from ckpts.storage._port import Range


class BoxRead:
    """The box ``offsets .. offsets + lengths`` of a saved ``piece`` (of ``dtype``), read
    into ``target`` (a tensor of the box's shape).

    The span read (``start``, ``length``: bytes from the piece's first) is the whole
    piece when the piece has no block hashes, else the box's bytes rounded out to whole
    BLOCKs; a whole piece is one read, checked against the piece's hash, and a part of
    it is checked block by block against ``blocks``. When the box is one contiguous run
    of the piece's bytes and ``target`` a contiguous CPU tensor of ``dtype``, the box
    lands straight in ``target`` (``landed``; the bytes around it that the boundary
    blocks need go to small buffers); otherwise the span goes to a buffer, made by
    :meth:`ranges` (so a caller decides how many exist at once), and is copied in.
    """

    def __init__(self, piece: Shard, dtype: torch.dtype, offsets: Sequence[int],
                 lengths: Sequence[int], target: torch.Tensor) -> None:
        self.piece, self.dtype, self.target = piece, dtype, target
        self.offsets, self.lengths = tuple(offsets), tuple(lengths)
        total = piece.end - piece.begin
        if not all(lengths):  # an empty box: nothing to read
            self.start, self.length, first, last = 0, 0, 0, 0
        else:
            first, last = (0, total) if self.lengths == piece.size else self._box_bytes()
            if piece.blocks:
                self.start = first // BLOCK * BLOCK
                self.length = min(total, -(-last // BLOCK) * BLOCK) - self.start
            else:  # one hash for the whole piece: read it all
                self.start, self.length = 0, total
        segments = self._landing(first, last)
        self.landed = segments is not None
        self._segments = segments or []  # (offset in the piece, memory) of each read

    def _box_bytes(self) -> tuple[int, int]:
        """The piece's bytes from the (non-empty) box's first element to past its last."""
        strides = _strides(self.piece.size)
        first = sum(o * s for o, s in zip(self.offsets, strides, strict=True))
        last = sum((o + n - 1) * s
                   for o, n, s in zip(self.offsets, self.lengths, strides, strict=True))
        return first * self.dtype.itemsize, (last + 1) * self.dtype.itemsize

    def _landing(self, first: int, last: int) -> list[tuple[int, memoryview]] | None:
        """Where the span's bytes go when the box (bytes ``first .. last`` of the piece)
        lands straight in the target: the bytes before it, the target's own memory, the
        bytes after it (offsets in the piece; none where there are no such bytes). None
        when the box or the target is not one contiguous run of bytes."""
        if not self.length:
            return []
        target = self.target
        if last - first != math.prod(self.lengths) * self.dtype.itemsize \
                or not target.is_cpu or not target.is_contiguous() \
                or target.dtype != self.dtype:
            return None
        segments = [(first, byte_view(target))]
        if first > self.start:
            segments.insert(0, (self.start, _buffer(first - self.start)))
        if self.start + self.length > last:
            segments.append((last, _buffer(self.start + self.length - last)))
        return segments

    def ranges(self) -> list[Range]:
        """The reads that fill the span (a box that does not land gets its buffer now)."""
        if not self.landed and not self._segments:
            self._segments = [(self.start, _buffer(self.length))]
        return [Range(self.piece.file, self.piece.begin + start, view)
                for start, view in self._segments]

    def check_and_land(self, what: str) -> None:
        """Once :meth:`ranges` are read: check the bytes read, put the box in the target
        (when it did not land there) and let go of the buffers.

        Raises:
            CorruptCheckpointError: a hash differs; its message starts with ``what``.
        """
        views = [view for _, view in self._segments]
        if self.length == self.piece.end - self.piece.begin:
            self._check_whole(views, what)
        elif self.length:
            self._check_blocks(views, what)
        if not self.landed:
            with torch.no_grad():
                self.target.copy_(self._box_of(views[0]))
        self._segments = []

    def _check_whole(self, views: Sequence[memoryview], what: str) -> None:
        hasher = xxhash.xxh3_128()
        for view in views:
            hasher.update(view)
        actual = HASH_PREFIX + hasher.hexdigest()
        if actual != self.piece.hash:
            raise CorruptCheckpointError(
                f"{what}: content hash {actual} differs from the manifest's {self.piece.hash}")

    def _check_blocks(self, views: Sequence[memoryview], what: str) -> None:
        """Hash the span's bytes (``views``, in order) BLOCK by BLOCK against ``blocks``."""
        expected = self.piece.blocks[self.start // BLOCK:]
        hasher, filled, number = xxhash.xxh3_128(), 0, 0
        for view in views:
            while len(view):
                taken = view[:BLOCK - filled]
                hasher.update(taken)
                view, filled = view[len(taken):], filled + len(taken)
                if filled == BLOCK:
                    self._compare(hasher, expected[number], number, what)
                    hasher, filled, number = xxhash.xxh3_128(), 0, number + 1
        if filled:  # a piece's last block may be short
            self._compare(hasher, expected[number], number, what)

    def _compare(self, hasher: xxhash.xxh3_128, wanted: str, number: int, what: str) -> None:
        actual = HASH_PREFIX + hasher.hexdigest()
        if actual != wanted:
            raise CorruptCheckpointError(
                f"{what}: content hash {actual} of bytes from {self.start + number * BLOCK} "
                f"differs from the manifest's {wanted}")

    def _box_of(self, data: memoryview) -> torch.Tensor:
        """The box, as a view of the span's bytes read into ``data``."""
        flat = torch.frombuffer(data, dtype=torch.uint8).view(self.dtype)
        strides = _strides(self.piece.size)
        first = sum(o * s for o, s in zip(self.offsets, strides, strict=True)) \
            - self.start // self.dtype.itemsize
        return flat.as_strided(self.lengths, strides, first)


def _buffer(nbytes: int) -> memoryview:
    """New memory to read into (not zeroed: every byte of it is read)."""
    return byte_view(torch.empty(nbytes, dtype=torch.uint8))


def _strides(size: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of shape ``size``, in elements."""
    strides, step = [], 1
    for dim in reversed(size):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))

"""What a reader reads of a saved piece for a box of it (ckpts._tensors.pieces).

A restore at another world size needs boxes of the saved shards; one process reads
each piece whole. These tests pin the byte arithmetic without a process group: the
span read is the box rounded out to whole 1 MiB blocks (never the whole piece), a
contiguous box lands straight in the live tensor with only the boundary blocks' other
bytes buffered, every block is checked against its hash whichever piece of memory its
bytes landed in, and a whole piece is one read, checked against its own hash.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ckpts._format.manifest import BLOCK, Shard, digest
from ckpts._format.safetensors import byte_view
from ckpts._tensors.pieces import BoxRead
from ckpts.errors import CorruptCheckpointError
from ckpts.storage._port import Range

ROWS, COLUMNS = 1024, 768  # float32: 3 MiB, three blocks


def saved_chunk() -> tuple[torch.Tensor, Shard]:
    chunk = torch.randn(ROWS, COLUMNS, generator=torch.Generator().manual_seed(0))
    data = byte_view(chunk)
    blocks = tuple(digest(data[start:start + BLOCK]) for start in range(0, len(data), BLOCK))
    return chunk, Shard(file="model-rank00000.safetensors", begin=0, end=len(data),
                        hash=digest(data), origin=(0, 0), size=(ROWS, COLUMNS), blocks=blocks)


def read(chunk: torch.Tensor, ranges: list[Range]) -> None:
    """What the storage would do: copy the chunk's bytes at each range's offset."""
    data = byte_view(chunk)
    for part in ranges:
        part.view[:] = data[part.offset:part.offset + len(part.view)]


@pytest.mark.parametrize(("first_row", "rows"), [(0, 512), (512, 512), (100, 300), (1023, 1)])
def test_a_row_box_lands_in_the_live_tensor_reading_at_most_two_extra_blocks(
        first_row: int, rows: int) -> None:
    chunk, piece = saved_chunk()
    target = torch.zeros(rows, COLUMNS)
    box = BoxRead(piece, torch.float32, (first_row, 0), (rows, COLUMNS), target)
    box_bytes = rows * COLUMNS * 4
    assert box.start % BLOCK == 0 and box.start <= first_row * COLUMNS * 4
    assert box.start + box.length >= (first_row + rows) * COLUMNS * 4
    assert box.length <= box_bytes + 2 * BLOCK and box.length < piece.end  # never all
    assert box.landed
    ranges = box.ranges()
    assert ranges[0].offset == box.start
    assert sum(len(part.view) for part in ranges) == box.length
    read(chunk, ranges)
    assert torch.equal(target, chunk[first_row:first_row + rows])  # its own memory was read
    box.check_and_land("test")
    assert torch.equal(target, chunk[first_row:first_row + rows])


@pytest.mark.parametrize("where", ["before the box", "inside the box", "after the box"])
def test_a_flipped_byte_anywhere_in_the_blocks_read_is_caught(where: str) -> None:
    chunk, piece = saved_chunk()
    box = BoxRead(piece, torch.float32, (100, 0), (300, COLUMNS), torch.zeros(300, COLUMNS))
    ranges = box.ranges()
    read(chunk, ranges)
    view = {"before the box": ranges[0].view, "inside the box": ranges[1].view,
            "after the box": ranges[2].view}[where]
    view[len(view) // 2] ^= 0xFF
    with pytest.raises(CorruptCheckpointError, match=r"test: content hash \S+ of bytes from"):
        box.check_and_land("test")


def test_a_column_box_is_not_contiguous_so_it_is_read_through_a_buffer() -> None:
    chunk, piece = saved_chunk()
    target = torch.zeros(ROWS, 20)
    box = BoxRead(piece, torch.float32, (0, 10), (ROWS, 20), target)
    assert not box.landed
    (part,) = box.ranges()
    assert (part.offset, len(part.view)) == (box.start, box.length)
    read(chunk, [part])
    box.check_and_land("test")
    assert torch.equal(target, chunk[:, 10:30])


@pytest.mark.parametrize("flipped", [False, True])
def test_a_chunk_without_block_hashes_is_read_and_checked_whole(flipped: bool) -> None:
    chunk, piece = saved_chunk()
    small = dataclasses.replace(piece, blocks=())
    target = torch.zeros(512, COLUMNS)
    box = BoxRead(small, torch.float32, (512, 0), (512, COLUMNS), target)
    assert (box.start, box.length) == (0, piece.end)
    ranges = box.ranges()
    read(chunk, ranges)
    if not flipped:
        box.check_and_land("test")
        assert torch.equal(target, chunk[512:])
        return
    ranges[0].view[0] ^= 1
    with pytest.raises(CorruptCheckpointError, match=f"differs from the manifest's {piece.hash}"):
        box.check_and_land("test")


def test_a_whole_piece_is_one_read_checked_against_its_own_hash() -> None:
    chunk, piece = saved_chunk()
    target = torch.zeros(ROWS, COLUMNS)
    box = BoxRead(piece, torch.float32, (0, 0), (ROWS, COLUMNS), target)
    (part,) = box.ranges()
    assert (part.offset, len(part.view)) == (0, piece.end)
    read(chunk, [part])
    part.view[len(part.view) - 1] ^= 1
    with pytest.raises(CorruptCheckpointError, match=f"differs from the manifest's {piece.hash}"):
        box.check_and_land("test")


def test_an_empty_box_reads_nothing() -> None:
    _, piece = saved_chunk()
    box = BoxRead(piece, torch.float32, (0, 0), (0, COLUMNS), torch.zeros(0, COLUMNS))
    assert box.length == 0 and box.landed
    assert box.ranges() == []

"""What a rank reads of a saved chunk when it restores part of it (ckpts._distributed).

A restore at another world size needs boxes of the saved shards. These tests pin the
byte arithmetic without a process group: the span read is the box rounded out to
whole 1 MiB blocks (never the whole chunk), a contiguous box lands straight in the
live tensor with only the boundary blocks' other bytes buffered, and every block is
checked against its hash whichever piece of memory its bytes landed in.
"""

from __future__ import annotations

import pytest
import torch

from ckpts._checkpoint.sharded import BLOCK, _Piece, _Span
from ckpts._format.manifest import digest
from ckpts._format.safetensors import byte_view
from ckpts.errors import CorruptCheckpointError

ROWS, COLUMNS = 1024, 768  # float32: 3 MiB, three blocks


def saved_chunk() -> tuple[torch.Tensor, _Piece]:
    chunk = torch.randn(ROWS, COLUMNS, generator=torch.Generator().manual_seed(0))
    data = byte_view(chunk)
    blocks = tuple(digest(data[start:start + BLOCK]) for start in range(0, len(data), BLOCK))
    return chunk, _Piece(file="model-rank00000.safetensors", begin=0, end=len(data),
                         hash=digest(data), blocks=blocks, size=(ROWS, COLUMNS),
                         dtype=torch.float32)


def read(chunk: torch.Tensor, span: _Span, segments: list[tuple[int, memoryview]]) -> None:
    """What the storage would do: copy the chunk's bytes at each segment's offset."""
    data = byte_view(chunk)
    for start, view in segments:
        view[:] = data[start:start + len(view)]


@pytest.mark.parametrize(("first_row", "rows"), [(0, 512), (512, 512), (100, 300), (1023, 1)])
def test_a_row_box_lands_in_the_live_tensor_reading_at_most_two_extra_blocks(
        first_row: int, rows: int) -> None:
    chunk, piece = saved_chunk()
    span = _Span.of(piece, (first_row, 0), (rows, COLUMNS))
    box_bytes = rows * COLUMNS * 4
    assert span.start % BLOCK == 0 and span.start <= first_row * COLUMNS * 4
    assert span.start + span.length >= (first_row + rows) * COLUMNS * 4
    assert span.length <= box_bytes + 2 * BLOCK and span.length < piece.end  # never all
    target = torch.zeros(rows, COLUMNS)
    segments = span.landing(piece, (first_row, 0), (rows, COLUMNS), target)
    assert segments is not None
    assert segments[0][0] == span.start
    assert sum(len(view) for _, view in segments) == span.length
    assert len(segments[1][1]) == box_bytes  # the live tensor's own memory
    read(chunk, span, segments)
    span.check(piece, [view for _, view in segments], "test")
    assert torch.equal(target, chunk[first_row:first_row + rows])


@pytest.mark.parametrize("where", ["before the box", "inside the box", "after the box"])
def test_a_flipped_byte_anywhere_in_the_blocks_read_is_caught(where: str) -> None:
    chunk, piece = saved_chunk()
    span = _Span.of(piece, (100, 0), (300, COLUMNS))
    target = torch.zeros(300, COLUMNS)
    segments = span.landing(piece, (100, 0), (300, COLUMNS), target)
    assert segments is not None
    read(chunk, span, segments)
    view = {"before the box": segments[0][1], "inside the box": segments[1][1],
            "after the box": segments[2][1]}[where]
    view[len(view) // 2] ^= 0xFF
    with pytest.raises(CorruptCheckpointError, match="content hash"):
        span.check(piece, [v for _, v in segments], "test")


def test_a_column_box_is_not_contiguous_so_it_is_read_through_a_buffer() -> None:
    chunk, piece = saved_chunk()
    offsets, lengths = (0, 10), (ROWS, 20)
    span = _Span.of(piece, offsets, lengths)
    assert span.landing(piece, offsets, lengths, torch.zeros(lengths)) is None
    buffer = memoryview(bytearray(span.length))
    read(chunk, span, [(span.start, buffer)])
    span.check(piece, [buffer], "test")
    assert torch.equal(span.view(piece, buffer, offsets, lengths), chunk[:, 10:30])


def test_a_chunk_without_block_hashes_is_read_and_checked_whole() -> None:
    chunk, piece = saved_chunk()
    small = _Piece(piece.file, 0, piece.end, piece.hash, (), piece.size, piece.dtype)
    span = _Span.of(small, (512, 0), (512, COLUMNS))
    assert (span.start, span.length) == (0, piece.end)
    buffer = memoryview(bytearray(span.length))
    read(chunk, span, [(0, buffer)])
    span.check(small, [buffer], "test")
    buffer[0] ^= 1
    with pytest.raises(CorruptCheckpointError):
        span.check(small, [buffer], "test")


def test_an_empty_box_reads_nothing() -> None:
    _, piece = saved_chunk()
    span = _Span.of(piece, (0, 0), (0, COLUMNS))
    assert span.length == 0
    assert span.landing(piece, (0, 0), (0, COLUMNS), torch.zeros(0, COLUMNS)) == []

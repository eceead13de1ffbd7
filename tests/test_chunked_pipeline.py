"""The chunked pipeline that saves and restores tensors outside host memory (CUDA).

These run the pipeline's logic on the host: ``through_chunks=True`` sends host tensors
down the path device tensors take, and a recording ``Transfers`` shows when each copy
is issued, waited for and written. The copies themselves (pinned memory, a side
stream) only run on a GPU machine (benchmarks/gpu.py, ../shared/gpu/cuda_check.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from ckpts._format.manifest import BLOCK, TensorEntry
from ckpts._tensors.reading import read_tensors
from ckpts._tensors.streaming import (
    ChunkPool,
    Fence,
    RunningHash,
    Transfers,
    chunk_plan,
    file_pieces,
    shared_pool,
)
from ckpts._tensors.writing import WrittenFile, write_tensor_files
from ckpts.errors import CorruptCheckpointError
from ckpts.storage import LocalStorage, Staged
from faulty_storage import FaultyStorage, raising

MIB = 2**20


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    """Tensors of every shape the pipeline must cut right: empty, one value, a few bytes,
    many small ones sharing a chunk, one spanning three 8 MiB chunks, views to resolve."""
    gen = torch.Generator().manual_seed(0)
    items = [("empty", torch.empty(0)), ("scalar", torch.tensor(3.5)),
             ("flags", torch.tensor([True, False, True])),
             ("half", torch.randn(1000, generator=gen).to(torch.bfloat16))]
    items += [(f"small.{i}", torch.randn(300 + i, generator=gen)) for i in range(50)]
    items += [("large", torch.randn(5 * MIB + 3, generator=gen)),  # 20 MiB + 12 bytes
              ("transposed", torch.randn(300, 200, generator=gen).t()),
              ("conjugate", torch.randn(64, dtype=torch.complex64, generator=gen).conj())]
    return items


def write(run: Path, name: str, items: Sequence[tuple[str, torch.Tensor]], *,
          through_chunks: bool) -> tuple[list[WrittenFile], bytes]:
    storage = LocalStorage(run)
    staged = storage.stage(name)
    [written] = write_tensor_files(storage, staged, [("model.safetensors", items)],
                                   block=BLOCK, through_chunks=through_chunks)
    return [written], (Path(staged.where) / "model.safetensors").read_bytes()


def test_a_file_through_chunks_is_byte_for_byte_the_file_written_from_memory(
        tmp_path: Path) -> None:
    items = mixed_tensors()
    direct, direct_bytes = write(tmp_path, "direct", items, through_chunks=False)
    chunked, chunked_bytes = write(tmp_path, "chunked", items, through_chunks=True)
    assert chunked_bytes == direct_bytes
    assert chunked == direct  # the same offsets, tensor hashes, header hash and block hashes
    assert len(chunked[0].blocks["large"]) == 21  # 20 MiB + 12 bytes: 21 blocks


def test_restore_through_chunks_fills_the_live_tensors_and_checks_every_hash(
        tmp_path: Path) -> None:
    items = [(k, t) for k, t in mixed_tensors() if k not in ("transposed", "conjugate")]
    storage = LocalStorage(tmp_path)
    staged = storage.stage("step")
    [written] = write_tensor_files(storage, staged, [("model.safetensors", items)])
    storage.commit(staged, b"{}")
    entries = {("model", k): TensorEntry("model.safetensors", _dtype(t), tuple(t.shape),
                                         *written.tensors[k])
               for k, t in items}
    files = {"model.safetensors": {"nbytes": written.nbytes, "header": written.header,
                                   "hash": written.header_hash}}
    targets = {("model", k): torch.zeros_like(t) for k, t in items}
    loaded = read_tensors(storage, "step", files, entries, targets, fill_targets=True,
                          through_chunks=True)
    for key, tensor in items:
        assert loaded[("model", key)] is targets[("model", key)]  # filled in place
        assert torch.equal(targets[("model", key)], tensor), key

    path = tmp_path / "step" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[written.tensors["large"][0] + 9 * MIB] ^= 1  # a byte in the large tensor's 2nd chunk
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors: tensor 'large'"):
        read_tensors(storage, "step", files, entries, targets, fill_targets=True,
                     through_chunks=True)
    pool = shared_pool(pinned=False)
    assert pool.idle == pool.allocated  # every buffer back, even after the failure


def _dtype(tensor: torch.Tensor) -> str:
    from ckpts._format.safetensors import DTYPES

    return DTYPES[tensor.dtype]


class RecordingTransfers(Transfers):
    """Plain copies, logged with the chunk each belongs to; each chunk's fence logs its
    wait. ``fail_at``: the copy of that chunk raises (a device error mid-save)."""

    def __init__(self, log: list[tuple[str, int]], fail_at: int | None = None) -> None:
        self.log, self.fail_at, self.chunks = log, fail_at, 0

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        if self.chunks == self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access (injected)")
        self.log.append(("copy", self.chunks))
        super().copy(destination, source)

    def fence(self) -> Fence:
        chunk, self.chunks = self.chunks, self.chunks + 1
        return lambda: self.log.append(("wait", chunk))


def stream(tensors: Sequence[torch.Tensor], pool: ChunkPool, transfers: Transfers,
           log: list[tuple[str, int]]) -> tuple[bytes, list[RunningHash], set[int]]:
    """Consume a file's pieces as a writer would; the bytes, hashes and buffers seen."""
    hashes = [RunningHash() for _ in tensors]
    out, buffers = bytearray(), set()
    for index, piece in enumerate(file_pieces(memoryview(b"HEAD"), tensors, hashes, pool,
                                              transfers)):
        out += piece
        if index:  # the header is not a chunk
            log.append(("write", index - 1))
            buffers.add(torch.frombuffer(piece, dtype=torch.uint8).data_ptr() if len(piece)
                        else 0)
    return bytes(out), hashes, buffers


def test_the_next_chunk_is_copied_while_this_one_is_written_and_each_is_waited_for_first(
) -> None:
    tensors = [torch.arange(n, dtype=torch.int32) for n in (1000, 300_000, 5, 700_000)]
    pool = ChunkPool(pinned=False, chunk=MIB, count=4)
    log: list[tuple[str, int]] = []
    data, _, _ = stream(tensors, pool, RecordingTransfers(log), log)
    assert data == b"HEAD" + b"".join(bytes(t.numpy().tobytes()) for t in tensors)  # in order
    chunks = len(chunk_plan([t.numel() * 4 for t in tensors], MIB))
    assert chunks == 4
    for chunk in range(chunks):
        write_at = log.index(("write", chunk))
        assert log.index(("wait", chunk)) < write_at  # its copy completed before the write
        if chunk + 1 < chunks:  # the next copy was already under way
            assert log.index(("copy", chunk + 1)) < write_at


def test_the_pool_reuses_a_few_buffers_for_a_state_many_times_their_size() -> None:
    tensors = [torch.randn(100_000) for _ in range(30)]  # 12 MB through 1 MiB chunks
    pool = ChunkPool(pinned=False, chunk=MIB, count=4)
    log: list[tuple[str, int]] = []
    first, hashes, buffers = stream(tensors, pool, Transfers(), log)
    assert pool.allocated == 2 and len(buffers) == 2  # one being written, one being filled
    assert [h.result()[0] for h in hashes] == [_hash(t) for t in tensors]
    again, _, buffers_again = stream(tensors, pool, Transfers(), log)
    assert again == first and pool.allocated == 2 and buffers_again == buffers
    assert pool.idle == 2


def _hash(tensor: torch.Tensor) -> str:
    from ckpts._format.manifest import digest

    return digest(tensor.numpy().tobytes())


def test_a_reserved_pool_allocates_nothing_later() -> None:
    pool = ChunkPool(pinned=False, chunk=MIB, count=3)
    pool.reserve()
    assert pool.allocated == pool.idle == 3
    stream([torch.randn(1_000_000)], pool, Transfers(), [])
    assert pool.allocated == pool.idle == 3
    pool.reserve()  # again: nothing more
    assert pool.allocated == pool.idle == 3


def test_a_pool_smaller_than_two_buffers_still_streams_without_overlap() -> None:
    tensors = [torch.randn(600_000)]
    pool = ChunkPool(pinned=False, chunk=MIB, count=1)
    data, _, _ = stream(tensors, pool, Transfers(), [])
    assert data == b"HEAD" + tensors[0].numpy().tobytes()


def test_a_copy_failing_midway_stops_the_file_and_gives_every_buffer_back(
        tmp_path: Path) -> None:
    tensors = [torch.randn(1_000_000)]  # 4 MB: four 1 MiB chunks
    pool = ChunkPool(pinned=False, chunk=MIB, count=4)
    storage = LocalStorage(tmp_path)
    staged = storage.stage("step")
    log: list[tuple[str, int]] = []
    pieces = file_pieces(memoryview(b"HEAD"), tensors, [RunningHash()], pool,
                         RecordingTransfers(log, fail_at=2))
    with pytest.raises(RuntimeError, match="injected"):
        storage.write_stream(staged, "model.safetensors", pieces)
    assert ("copy", 1) in log and ("copy", 3) not in log
    assert pool.idle == pool.allocated == 2
    storage.abort(staged)
    assert list(tmp_path.iterdir()) == []


class FailingStreams(LocalStorage):
    """A disk that fills up after ``pieces`` pieces of a streamed file."""

    def __init__(self, run: Path, pieces: int) -> None:
        super().__init__(run)
        self.pieces = pieces

    def write_stream(self, staged: Staged, file: str, pieces: Iterator[memoryview]) -> None:
        def until_full() -> Iterator[memoryview]:
            for n, piece in enumerate(pieces):
                if n == self.pieces:
                    raise OSError(28, "No space left on device (injected)")
                yield piece
        super().write_stream(staged, file, until_full())


def test_a_write_failing_midway_raises_and_leaves_the_pool_whole(tmp_path: Path) -> None:
    storage = FailingStreams(tmp_path, pieces=2)
    staged = storage.stage("step")
    pool = shared_pool(pinned=False)
    with pytest.raises(OSError, match="injected"):
        write_tensor_files(storage, staged, [("model.safetensors", mixed_tensors())],
                           through_chunks=True)
    assert pool.idle == pool.allocated
    storage.abort(staged)
    assert list(tmp_path.iterdir()) == []


def test_a_read_failing_midway_raises_and_leaves_the_pool_whole(tmp_path: Path) -> None:
    tensor = torch.randn(5 * MIB)  # three 8 MiB chunks
    storage = FaultyStorage(tmp_path)
    staged = storage.stage("step")
    [written] = write_tensor_files(storage, staged, [("model.safetensors", [("w", tensor)])])
    storage.commit(staged, b"{}")
    entries = {("model", "w"): TensorEntry("model.safetensors", "F32", tuple(tensor.shape),
                                           *written.tensors["w"])}
    files = {"model.safetensors": {"nbytes": written.nbytes, "header": written.header,
                                   "hash": written.header_hash}}
    reads = len(storage.calls)
    calls = [0]

    def second_chunk_fails() -> None:
        calls[0] += 1
        if calls[0] == 3:  # the header, the first chunk, then this
            raising(OSError(5, "Input/output error (injected)"))()

    storage.hooks["read_ranges"] = second_chunk_fails
    with pytest.raises(OSError, match="injected"):
        read_tensors(storage, "step", files, entries, {("model", "w"): torch.zeros_like(tensor)},
                     fill_targets=True, through_chunks=True)
    assert storage.calls[reads:].count("read_ranges") == 3
    pool = shared_pool(pinned=False)
    assert pool.idle == pool.allocated


def test_chunk_plan_cuts_items_into_chunks_in_order() -> None:
    plan = chunk_plan([5, 0, 12, 3], 8)
    covered = [(p.item, p.start, p.stop, p.at) for chunk in plan for p in chunk]
    assert covered == [(0, 0, 5, 0), (2, 0, 3, 5), (2, 3, 11, 0), (2, 11, 12, 0), (3, 0, 3, 1)]
    assert [sum(p.stop - p.start for p in chunk) for chunk in plan] == [8, 8, 4]
    assert chunk_plan([0, 0], 8) == []


def test_block_hashes_do_not_depend_on_how_the_bytes_are_cut() -> None:
    data = memoryview(torch.randn(700_000).numpy().tobytes())  # 2.67 blocks of 1 MiB
    whole = RunningHash(MIB)
    whole.update(data)
    cut = RunningHash(MIB)
    for start in range(0, len(data), 300_001):
        cut.update(data[start:start + 300_001])
    assert cut.result() == whole.result()
    assert len(whole.result()[1]) == 3

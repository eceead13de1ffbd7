"""The parallel writer and reader under small chunks, and how files are split and shared out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

import ckpts
from ckpts._format.manifest import HASH_PREFIX
from ckpts._tensors.writing import write_tensor_files
from ckpts.storage import LocalStorage, _io


def _tensors(seed: int, count: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 3000, (count,), generator=generator).tolist()
    return [(f"t{i}", torch.randn(n, generator=generator)) for i, n in enumerate(sizes)]


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 4 KB and 3 threads: many jobs, split tensors, files shared by threads."""
    monkeypatch.setattr(_io, "CHUNK", 4096)
    monkeypatch.setattr(_io, "IO_THREADS", 3)


@pytest.mark.usefixtures("tiny_chunks")
def test_files_written_in_small_chunks_are_whole_safetensors(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    staged = storage.stage("step-00000001")
    files = [(f"f{i}.safetensors", _tensors(i, 5 + 20 * i)) for i in range(4)]
    written = write_tensor_files(storage, staged, files)
    for (name, items), record in zip(files, written, strict=True):
        path = Path(staged.where) / name
        data = path.read_bytes()
        assert record.nbytes == len(data)
        assert record.header_hash == HASH_PREFIX + xxhash.xxh3_128(data[:record.header]).hexdigest()
        loaded = load_file(path)
        assert loaded.keys() == dict(items).keys()
        for key, tensor in items:
            begin, end, tensor_hash = record.tensors[key]
            assert torch.equal(loaded[key], tensor)
            assert tensor_hash == HASH_PREFIX + xxhash.xxh3_128(data[begin:end]).hexdigest()


@pytest.mark.usefixtures("tiny_chunks")
def test_ranges_read_in_small_chunks_land_in_their_buffers(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    pieces = [(0, 10), (10, 5000), (5000, 70_000), (100_000, 256_000)]
    views = [memoryview(bytearray(end - begin)) for begin, end in pieces]
    _io.read_ranges([(tmp_path / "f", [(b, v) for (b, _), v in zip(pieces, views, strict=True)])])
    for (begin, end), view in zip(pieces, views, strict=True):
        assert bytes(view) == data[begin:end]
    with pytest.raises(ckpts.CorruptCheckpointError, match="ends at byte"):
        _io.read_ranges([(tmp_path / "f", [(255_000, memoryview(bytearray(2000)))])])


def test_a_thread_takes_its_next_chunk_from_a_file_nobody_is_writing() -> None:
    chunk: list[_io._Region] = []
    turns = _io._WriteTurns([[chunk] * 2, [chunk] * 5, [chunk] * 3])
    first = turns._take(None)
    second = turns._take(None)
    third = turns._take(None)
    assert first is not None and second is not None and third is not None
    assert [first[0], second[0], third[0]] == [1, 2, 0]  # most chunks left first
    # file 1 is done with by its writer: it has most left and nobody on it now
    assert turns._take(first[0]) == (1, chunk)
    # all three files have a writer: a fourth thread joins the one with most left
    fourth = turns._take(None)
    assert fourth is not None and fourth[0] == 1


def test_large_objects_split_into_files_of_about_equal_size_under_the_cap(
        tmp_path: Path) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32, bias=False) for _ in range(10)],
                                torch.nn.Linear(32, 200, bias=False))
    cap = 30_000  # ten 4,096-byte weights and one of 25,600
    checkpoint = ckpts.CheckpointManager(tmp_path, max_shard_size=cap).save(
        1, ckpts.TrainState(model=model))
    sizes = sorted(len(load_file(p)) for p in checkpoint.path.glob("model-*.safetensors"))
    on_disk = [p.stat().st_size for p in checkpoint.path.glob("model-*.safetensors")]
    assert all(size <= cap for size in on_disk)
    # 66,560 bytes: three files of about 22 KB: the big weight alone, then five and five
    assert sizes == [1, 5, 5]


@pytest.mark.usefixtures("tiny_chunks")
def test_a_failed_write_stops_every_thread_and_is_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine's own thread hand-off, below the storage port: a unit test of _io
    files = [(tmp_path / f"f{i}.safetensors",
              [memoryview(bytes(4096 * 11))] * (i + 3)) for i in range(3)]
    calls: list[int] = []
    real_pwrite = _io._pwrite

    def failing_pwrite(job: list[_io._Region]) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_pwrite(job)

    monkeypatch.setattr(_io, "_pwrite", failing_pwrite)
    total_bytes = sum(len(part) for _, parts in files for part in parts)
    assert total_bytes // _io.CHUNK > 30
    with pytest.raises(OSError, match="No space left"):
        _io.write_files(files)
    assert len(calls) <= 3 + _io.IO_THREADS  # each other thread finishes at most its chunk


def test_the_collector_runs_again_after_nested_threaded_and_failed_pauses() -> None:
    import gc
    import threading

    from ckpts._tensors.gc import paused_gc

    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other_thread() -> None:
        with paused_gc():
            inside.set()
            release.wait(timeout=10)

    thread = threading.Thread(target=other_thread)
    thread.start()
    inside.wait(timeout=10)
    def failed_save() -> None:
        with paused_gc(), paused_gc():
            assert not gc.isenabled()
            raise RuntimeError("a failed save")

    with pytest.raises(RuntimeError):
        failed_save()
    assert not gc.isenabled()  # the other thread's pause still holds
    release.set()
    thread.join()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a program that turned it off keeps it off
    finally:
        gc.enable()

"""The parallel writer and reader under small chunks, and how files are split and shared out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

import ckpts
from ckpts import _io
from ckpts._manifest import HASH_PREFIX, TensorEntry


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
def test_files_written_in_small_chunks_are_whole_and_hashed(tmp_path: Path) -> None:
    files = [(tmp_path / f"f{i}.safetensors", _tensors(i, 5 + 20 * i)) for i in range(4)]
    records = _io.write_files(files)
    for (path, items), record in zip(files, records, strict=True):
        data = path.read_bytes()
        assert record.nbytes == len(data)
        assert record.hash == HASH_PREFIX + xxhash.xxh3_128(data).hexdigest()
        loaded = load_file(path)
        assert loaded.keys() == dict(items).keys()
        for key, tensor in items:
            assert torch.equal(loaded[key], tensor)


@pytest.mark.usefixtures("tiny_chunks")
def test_files_read_in_small_chunks_land_in_the_live_tensors(tmp_path: Path) -> None:
    items = _tensors(7, 30)
    path = tmp_path / "f.safetensors"
    (record,) = _io.write_files([(path, items)])
    targets = {key: torch.zeros_like(tensor) for key, tensor in items}
    entries = {key: TensorEntry(file=path.name, dtype="F32", shape=tuple(t.shape))
               for key, t in items}
    (loaded,) = _io.read_files_into([_io.ReadRequest(path, record.hash, entries, targets)])
    for key, tensor in items:
        assert loaded[key] is targets[key]
        assert torch.equal(targets[key], tensor)


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
    files = [(tmp_path / f"f{i}.safetensors", _tensors(i, 40)) for i in range(3)]
    calls: list[int] = []
    real_pwrite = _io._pwrite

    def failing_pwrite(job: list[_io._Region]) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_pwrite(job)

    monkeypatch.setattr(_io, "_pwrite", failing_pwrite)
    total_bytes = sum(t.numel() * t.element_size() for _, items in files for _, t in items)
    assert total_bytes // _io.CHUNK > 30
    with pytest.raises(OSError, match="No space left"):
        _io.write_files(files)
    assert len(calls) <= 3 + _io.IO_THREADS  # each other thread finishes at most its chunk

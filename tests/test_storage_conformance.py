"""Every Storage backend keeps the port's promises: one suite, run on each backend.

The backends: LocalStorage on ``tmp_path``, FsspecStorage on ``memory://`` and on S3 (a
moto server on loopback, see s3_server.py), and DictStorage (dict_storage.py), a backend
written from ``ckpts.storage``'s public names alone, as a third party would. The tests go
through the Storage protocol only, so a new backend joins by adding one parameter to
``run``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest

from ckpts.errors import CorruptCheckpointError, LockedError
from ckpts.storage import MANIFEST, LocalStorage, Range, Storage, checkpoint_name, open_storage
from dict_storage import DictStorage
from s3_server import S3Bucket

STEP = checkpoint_name(500)


@dataclass(frozen=True)
class RunAt:
    """Where one test's run lives; ``open()`` opens it again (each call a new Storage)."""

    location: str
    storage_options: dict[str, Any] | None = None
    other_processes_see_it: bool = True  # memory:// lives in one process
    backend: Callable[[str], Storage] | None = None  # None: open_storage picks it

    def open(self, below: str | None = None) -> Storage:
        """The run, or the location ``below`` inside it (a run in a folder of runs)."""
        location = self.location if below is None else f"{self.location}/{below}"
        if self.backend is not None:
            return self.backend(location)
        return open_storage(location, self.storage_options)


@pytest.fixture(params=["local", "memory", "s3", "third-party"])
def run_at(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunAt]:
    if request.param == "local":
        yield RunAt(str(tmp_path / "run"))
    elif request.param == "memory":
        url = f"memory://ckpts-{uuid.uuid4().hex}/run"
        yield RunAt(url, other_processes_see_it=False)
        with contextlib.suppress(FileNotFoundError):  # a test may leave nothing
            fsspec.filesystem("memory").rm(url.rsplit("/", 1)[0], recursive=True)
    elif request.param == "third-party":
        at = RunAt(f"dict-{uuid.uuid4().hex}/run", other_processes_see_it=False,
                   backend=DictStorage)
        yield at
        at.open().destroy()
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        yield RunAt(bucket.url(), bucket.storage_options)


@pytest.fixture
def run(run_at: RunAt) -> Storage:
    return run_at.open()


def save(storage: Storage, name: str, files: dict[str, bytes], manifest: bytes = b"{}") -> None:
    staged = storage.stage(name)
    storage.write(staged, [(file, [memoryview(data)]) for file, data in files.items()])
    storage.commit(staged, manifest)


def test_commit_lists_the_checkpoint_with_every_file_size(run: Storage) -> None:
    save(run, STEP, {"model.safetensors": b"x" * 100, "optim.safetensors": b"y" * 7},
         manifest=b'{"step": 500}')
    [listed] = run.committed()
    assert listed.name == STEP and listed.step == 500
    expected = {"model.safetensors": 100, "optim.safetensors": 7, MANIFEST: 13}
    assert dict(listed.sizes) == expected
    assert run.sizes(STEP) == expected
    assert run.read(STEP, MANIFEST) == b'{"step": 500}'


def test_nothing_is_listed_before_commit(run: Storage) -> None:
    assert run.committed() == []
    staged = run.stage(STEP)
    run.write(staged, [("model.safetensors", [memoryview(b"abc")])])
    assert run.committed() == []
    run.commit(staged, b"{}")
    assert [c.name for c in run.committed()] == [STEP]


def test_many_files_and_parts_round_trip_through_read(run: Storage) -> None:
    files = {f"shard-{i:03d}.safetensors": os.urandom(1000 + i) for i in range(40)}
    staged = run.stage(STEP)
    # each file given as several parts, written as their concatenation
    run.write(staged, [(f, [memoryview(d[:300]), memoryview(d[300:])]) for f, d in files.items()])
    run.commit(staged, b"{}")
    assert all(run.read(STEP, file) == data for file, data in files.items())


def test_a_file_larger_than_a_part_round_trips_through_read_ranges(run: Storage) -> None:
    data = os.urandom(20 * 2**20 + 12345)  # over two 8 MiB parts (FsspecStorage.PART_SIZE)
    views = [memoryview(data)[:5_000_000], memoryview(data)[5_000_000:]]
    staged = run.stage(STEP)
    run.write(staged, [("model.safetensors", views), ("small.json", [memoryview(b"{}")])])
    run.commit(staged, b"{}")
    assert run.read(STEP, "model.safetensors") == data
    spans = [(0, 10), (8 * 2**20 - 100, 200), (16 * 2**20 - 5, 4 * 2**20), (0, len(data)),
             (len(data) - 1, 1)]  # the middle ones cross part boundaries
    buffers = [bytearray(length) for _, length in spans]
    run.read_ranges(STEP, [Range("model.safetensors", offset, memoryview(buffer))
                           for (offset, _), buffer in zip(spans, buffers, strict=True)])
    for (offset, length), buffer in zip(spans, buffers, strict=True):
        assert bytes(buffer) == data[offset:offset + length], offset


def test_many_adjacent_small_ranges_of_two_files_each_get_their_bytes(run: Storage) -> None:
    first, second = os.urandom(300_000), os.urandom(9 * 2**20)
    staged = run.stage(STEP)
    run.write(staged, [("a.safetensors", [memoryview(first)]),
                       ("b.safetensors", [memoryview(second)])])
    run.commit(staged, b"{}")
    # like a restore: a header, then tensors back to back, with a gap in one file
    cuts = {"a.safetensors": [0, 8, 1000, 1004, 200_000, 300_000],
            "b.safetensors": [0, 16, 4096, 8 * 2**20 + 3, 9 * 2**20]}
    wanted = [(file, begin, end) for file, points in cuts.items()
              for begin, end in itertools.pairwise(points) if begin != 1000]
    buffers = [bytearray(end - begin) for _, begin, end in wanted]
    run.read_ranges(STEP, [Range(file, begin, memoryview(buffer))
                           for (file, begin, _), buffer in zip(wanted, buffers, strict=True)])
    data = {"a.safetensors": first, "b.safetensors": second}
    for (file, begin, end), buffer in zip(wanted, buffers, strict=True):
        assert bytes(buffer) == data[file][begin:end], (file, begin)


def test_an_empty_file_reads_back_empty(run: Storage) -> None:
    save(run, STEP, {"empty.json": b"", "model.safetensors": b"x" * 10})
    assert run.read(STEP, "empty.json") == b""
    assert run.sizes(STEP)["empty.json"] == 0


def test_committing_a_name_again_replaces_the_old_checkpoint(run: Storage) -> None:
    save(run, STEP, {"a.safetensors": b"old", "b.safetensors": b"old"}, manifest=b'{"v": 1}')
    save(run, STEP, {"c.safetensors": b"new!"}, manifest=b'{"v": 2}')
    [listed] = run.committed()
    assert dict(listed.sizes) == {"c.safetensors": 4, MANIFEST: 8}
    assert run.read(STEP, MANIFEST) == b'{"v": 2}'
    with pytest.raises(FileNotFoundError):
        run.read(STEP, "a.safetensors")


def test_a_file_written_from_a_stream_of_reused_pieces_reads_back_whole(run: Storage) -> None:
    data = os.urandom(3 * 2**20 + 7)  # a multipart upload on S3 needs 5 MiB parts: sent in one
    buffer = bytearray(2**20)  # one buffer refilled for every piece, as the chunk pool does

    def pieces() -> Iterator[memoryview]:
        for start in range(0, len(data), len(buffer)):
            piece = data[start:start + len(buffer)]
            buffer[:len(piece)] = piece
            yield memoryview(buffer)[:len(piece)]

    staged = run.stage(STEP)
    run.write_stream(staged, "model.safetensors", pieces())
    run.commit(staged, b"{}")
    assert run.read(STEP, "model.safetensors") == data


def test_a_stream_that_fails_midway_raises_and_abort_leaves_nothing(run: Storage) -> None:
    def pieces() -> Iterator[memoryview]:
        yield memoryview(b"x" * 1000)
        raise OSError(28, "No space left on device (injected)")

    staged = run.stage(STEP)
    with pytest.raises(OSError, match="injected"):
        run.write_stream(staged, "model.safetensors", pieces())
    run.abort(staged)
    assert run.committed() == [] and run.sizes(STEP) == {}
    assert run.clean(check_manifests=True) == []


def test_abort_leaves_nothing(run: Storage) -> None:
    save(run, checkpoint_name(100), {"model.safetensors": b"kept"})
    staged = run.stage(STEP)
    run.write(staged, [("model.safetensors", [memoryview(b"abc")])])
    run.abort(staged)
    run.abort(staged)  # what is already gone is fine
    assert [c.name for c in run.committed()] == [checkpoint_name(100)]
    assert run.sizes(STEP) == {}
    assert run.clean(check_manifests=True) == []


def test_delete_removes_the_checkpoint_and_again_is_fine(run: Storage) -> None:
    save(run, STEP, {"model.safetensors": b"abc"})
    save(run, checkpoint_name(600), {"model.safetensors": b"def"})
    run.delete(STEP)
    assert [c.name for c in run.committed()] == [checkpoint_name(600)]
    assert run.sizes(STEP) == {}
    run.delete(STEP)
    run.delete(checkpoint_name(700))  # never existed


def test_update_replaces_the_manifest_with_the_edit_of_the_current_one(run: Storage) -> None:
    save(run, STEP, {"model.safetensors": b"abc"}, manifest=b'{"loss": 1}')
    seen = []

    def edit(manifest: bytes) -> bytes:
        seen.append(manifest)
        return b'{"loss": 0.5, "tags": ["best"]}'

    assert run.update(STEP, edit) == b'{"loss": 0.5, "tags": ["best"]}'
    assert seen == [b'{"loss": 1}']
    assert run.read(STEP, MANIFEST) == b'{"loss": 0.5, "tags": ["best"]}'
    assert run.read(STEP, "model.safetensors") == b"abc"
    with pytest.raises(FileNotFoundError):
        run.update(checkpoint_name(600), lambda manifest: b"{}")


def test_updates_from_many_threads_at_once_all_count(run: Storage) -> None:
    save(run, STEP, {"model.safetensors": b"abc"}, manifest=b"[]")

    def add(number: int) -> None:
        run.update(STEP, lambda manifest: json.dumps([*json.loads(manifest), number]).encode())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(40)))
    assert sorted(json.loads(run.read(STEP, MANIFEST))) == list(range(40))
    assert sorted(run.sizes(STEP)) == [MANIFEST, "model.safetensors"]  # no temporary left


def test_clean_removes_an_uncommitted_save_and_names_it(run_at: RunAt) -> None:
    killed = run_at.open()
    save(killed, checkpoint_name(100), {"model.safetensors": b"kept"})
    staged = killed.stage(STEP)
    killed.write(staged, [("model.safetensors", [memoryview(b"half")])])
    # the writer dies here; the next writer cleans up
    removed = run_at.open().clean(check_manifests=True)
    assert len(removed) == 1 and STEP in removed[0]
    assert [c.name for c in killed.committed()] == [checkpoint_name(100)]
    assert killed.read(checkpoint_name(100), "model.safetensors") == b"kept"
    assert run_at.open().clean(check_manifests=True) == []


WRITER = """
import json, sys
from ckpts.storage import open_storage
storage = open_storage(sys.argv[1], json.loads(sys.argv[2]))
storage.lock()
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
storage.unlock()
"""


def test_a_writer_in_another_process_is_refused_naming_it(run_at: RunAt) -> None:
    if not run_at.other_processes_see_it:
        pytest.skip("no other process can reach this run")
    holder = subprocess.Popen(
        [sys.executable, "-c", WRITER, run_at.location, json.dumps(run_at.storage_options)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        second = run_at.open()
        with pytest.raises(LockedError) as refused:
            second.lock()
        assert str(holder.pid) in str(refused.value)
        assert socket.gethostname() in str(refused.value)
        holder.stdin.close()  # the holder unlocks and exits
        assert holder.wait(timeout=60) == 0
        second.lock()
        second.lock()  # twice from one storage is fine
        second.unlock()
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdout.close()


def test_history_appends_and_reads_back(run: Storage) -> None:
    assert run.read_history() == b""
    save(run, STEP, {"model.safetensors": b"abc"})  # the run exists
    run.append_history(b'{"step": 1, "loss": 2.0}\n')
    run.append_history(b'{"step": 2, "loss": 1.5}\n')
    assert run.read_history() == b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert [c.name for c in run.committed()] == [STEP]  # the history is no checkpoint


def test_reading_an_absent_file_raises_file_not_found(run: Storage) -> None:
    save(run, STEP, {"model.safetensors": b"abc"})
    with pytest.raises(FileNotFoundError):
        run.read(STEP, "optim.safetensors")
    with pytest.raises(FileNotFoundError):
        run.read(checkpoint_name(600), MANIFEST)
    with pytest.raises(FileNotFoundError):
        run.read_ranges(STEP, [Range("optim.safetensors", 0, memoryview(bytearray(2)))])


@pytest.mark.parametrize("offset", [5, 10, 50])  # past the end: partly, at it, beyond
def test_a_range_past_the_end_of_a_file_is_corrupt(run: Storage, offset: int) -> None:
    save(run, STEP, {"model.safetensors": b"0123456789"})
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        run.read_ranges(STEP, [Range("model.safetensors", offset, memoryview(bytearray(10)))])


def test_free_space_is_a_count_or_unknown(run: Storage) -> None:
    space = run.free_space()
    assert space is None or space > 0
    assert isinstance(run, Storage)
    assert run.where(STEP).startswith(run.location) and run.where(STEP).endswith(STEP)


def test_reuse_puts_a_committed_file_into_a_new_checkpoint_that_outlives_its_source(
        run: Storage) -> None:
    frozen = os.urandom(3000)
    save(run, STEP, {"base.safetensors": frozen, "adapter.safetensors": b"a" * 10})
    later = checkpoint_name(600)
    staged = run.stage(later)
    assert run.reuse(staged, STEP, "base.safetensors", len(frozen))
    run.write(staged, [("adapter.safetensors", [memoryview(b"b" * 10)])])
    run.commit(staged, b"{}")
    run.delete(STEP)  # the source goes: the new checkpoint holds the file all the same
    assert [listed.name for listed in run.committed()] == [later]
    assert run.read(later, "base.safetensors") == frozen
    assert run.sizes(later)["base.safetensors"] == len(frozen)


def test_reuse_declines_a_missing_file_or_another_size_and_stages_nothing(run: Storage) -> None:
    save(run, STEP, {"base.safetensors": b"x" * 100})
    staged = run.stage(checkpoint_name(600))
    assert not run.reuse(staged, STEP, "base.safetensors", 99)
    assert not run.reuse(staged, STEP, "missing.safetensors", 100)
    assert not run.reuse(staged, checkpoint_name(1), "base.safetensors", 100)
    run.commit(staged, b"{}")
    assert set(run.sizes(checkpoint_name(600))) == {MANIFEST}


def test_the_listing_tells_shared_files_apart_from_copies(run: Storage) -> None:
    """A hard link shows in ``Listed.shared`` (both names, one identity); a copy, as on
    an object store, is a file of its own and is not listed as shared."""
    save(run, STEP, {"base.safetensors": b"x" * 100, "own.safetensors": b"y"})
    staged = run.stage(checkpoint_name(600))
    assert run.reuse(staged, STEP, "base.safetensors", 100)
    run.commit(staged, b"{}")
    first, second = sorted(run.committed(), key=lambda listed: listed.step)
    assert "own.safetensors" not in first.shared
    if isinstance(run, LocalStorage):
        assert first.shared["base.safetensors"] == second.shared["base.safetensors"]
    else:
        assert not first.shared and not second.shared


# --- the run as a whole --------------------------------------------------------------------

def test_destroy_removes_the_whole_run_and_again_is_fine(run_at: RunAt) -> None:
    run = run_at.open()
    save(run, STEP, {"model.safetensors": b"abc"})
    save(run, checkpoint_name(600), {"model.safetensors": b"def"})
    run.append_history(b'{"step": 600}\n')
    staged = run.stage(checkpoint_name(700))  # a save left behind
    run.write(staged, [("model.safetensors", [memoryview(b"half")])])

    run.destroy()

    for storage in (run, run_at.open()):  # this storage, and a new one of the location
        assert storage.committed() == []
        assert storage.read_history() == b""
        assert storage.folders() == []
        assert storage.clean(check_manifests=True) == []
    run.destroy()  # a run that is gone counts as destroyed
    save(run, STEP, {"model.safetensors": b"new"})  # the location can hold a run again
    assert run.read(STEP, "model.safetensors") == b"new"


def test_destroy_leaves_the_runs_beside_it(run_at: RunAt) -> None:
    save(run_at.open("exp1"), STEP, {"model.safetensors": b"one"})
    save(run_at.open("exp2"), STEP, {"model.safetensors": b"two"})
    run_at.open("exp1").destroy()
    assert run_at.open("exp1").committed() == []
    assert run_at.open("exp2").read(STEP, "model.safetensors") == b"two"


def test_folders_names_what_is_directly_inside_the_location(run_at: RunAt) -> None:
    run = run_at.open()
    assert run.folders() == []  # no location yet
    save(run, STEP, {"model.safetensors": b"abc"})
    save(run_at.open("exp1"), checkpoint_name(1), {"model.safetensors": b"abc"})
    run.append_history(b'{"step": 1}\n')  # a file, not a folder
    assert run.folders() == ["exp1", STEP]
    assert run_at.open("exp1").folders() == [checkpoint_name(1)]


def test_export_puts_files_in_a_local_folder_that_outlives_the_checkpoint(
        run: Storage, tmp_path: Path) -> None:
    files = {"model.safetensors": os.urandom(3 * 2**20 + 5), "optim.safetensors": b"o"}
    save(run, STEP, files, manifest=b'{"step": 500}')
    view = tmp_path / "views" / "view"

    found = run.export(STEP, [MANIFEST, "model.safetensors"], view,
                       extra={"trainer_state.json": b'{"global_step": 500}'})

    assert found == view
    assert sorted(p.name for p in view.iterdir()) == [MANIFEST, "model.safetensors",
                                                      "trainer_state.json"]
    run.delete(STEP)  # the folder's files stay whole
    assert (view / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert (view / MANIFEST).read_bytes() == b'{"step": 500}'
    assert (view / "trainer_state.json").read_bytes() == b'{"global_step": 500}'


def test_export_of_a_missing_file_or_into_an_occupied_name_raises(
        run: Storage, tmp_path: Path) -> None:
    save(run, STEP, {"model.safetensors": b"abc"})
    with pytest.raises(FileNotFoundError):
        run.export(STEP, ["model.safetensors", "optim.safetensors"], tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == b"abc"  # what came first
    with pytest.raises(FileExistsError):
        run.export(STEP, ["model.safetensors"], tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        run.export(checkpoint_name(600), [MANIFEST], tmp_path / "b")


# --- optional capabilities: each backend's own, or the protocol's default ------------------

def test_a_mapped_file_is_its_bytes_or_the_backend_does_not_map(run: Storage) -> None:
    data = os.urandom(5000)
    save(run, STEP, {"model.safetensors": data, "empty.json": b""})
    mapped = run.map_file(STEP, "model.safetensors")
    assert mapped is None or bytes(mapped) == data
    empty = run.map_file(STEP, "empty.json")
    assert empty is None or bytes(empty) == b""
    if isinstance(run, LocalStorage):
        assert mapped is not None


def test_sync_of_staged_files_keeps_them_for_the_commit(run: Storage) -> None:
    staged = run.stage(STEP)
    run.write(staged, [("model-rank00001.safetensors", [memoryview(b"rank 1")])])
    run.sync(staged, ["model-rank00001.safetensors"])
    run.commit(staged, b"{}")
    assert run.read(STEP, "model-rank00001.safetensors") == b"rank 1"


def test_sharing_the_host_never_raises_the_thread_count(run: Storage) -> None:
    alone = run.io_threads()
    assert alone >= 1
    run.share_host(4 * (os.cpu_count() or 1))  # more processes than cores
    assert 1 <= run.io_threads() <= alone
    save(run, STEP, {"model.safetensors": b"x" * 100_000})  # still writes and reads
    assert run.read(STEP, "model.safetensors") == b"x" * 100_000


# --- a local run: what only a path has -----------------------------------------------------

def test_destroy_of_a_symbolic_link_removes_the_link_and_never_its_target(
        tmp_path: Path) -> None:
    target = LocalStorage(tmp_path / "real")
    save(target, STEP, {"model.safetensors": b"kept"})
    (tmp_path / "last.ckpt").symlink_to(tmp_path / "real")
    (tmp_path / "old.ckpt").write_bytes(b"a file of another framework")

    LocalStorage(tmp_path / "last.ckpt").destroy()
    LocalStorage(tmp_path / "old.ckpt").destroy()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["real"]
    assert target.read(STEP, "model.safetensors") == b"kept"


def test_a_local_export_is_hard_links(tmp_path: Path) -> None:
    run = LocalStorage(tmp_path / "run")
    save(run, STEP, {"model.safetensors": b"abc"})
    view = run.export(STEP, ["model.safetensors"], tmp_path / "run" / ".view")
    assert (view / "model.safetensors").samefile(tmp_path / "run" / STEP / "model.safetensors")

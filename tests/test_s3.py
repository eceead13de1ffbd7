"""FsspecStorage on a real S3 server (moto on loopback): what only an object store does.

Bad URLs fail before anything is written, a server that goes away surfaces as OSError
within seconds and leaves the run intact, the writer lease is refused while its holder
renews it and taken over once the holder is killed, the manifest's conditional create lets
exactly one of two racing writers commit, and listing a run costs one request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import fsspec
import pytest

from ckpts.errors import CheckpointError, LockedError
from ckpts.storage import MANIFEST, Range, checkpoint_name, open_storage
from ckpts.storage._fsspec import PART_SIZE, FsspecStorage
from s3_server import S3Bucket


def bucket_contents(bucket: S3Bucket) -> list[str]:
    fs = fsspec.filesystem("s3", **bucket.storage_options, skip_instance_cache=True)
    return sorted(fs.find(bucket.name))


def save(storage: FsspecStorage, step: int, files: dict[str, bytes]) -> None:
    staged = storage.stage(checkpoint_name(step))
    storage.write(staged, [(file, [memoryview(data)]) for file, data in files.items()])
    storage.commit(staged, b"{}")


def server_requests(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The requests moto's server logged (one werkzeug line each), as 'METHOD /path'."""
    return [" ".join(r.getMessage().split('"')[1].split()[:2]) for r in caplog.records
            if r.name == "werkzeug" and '"' in r.getMessage()]


# --- bad URLs ------------------------------------------------------------------------------

def test_an_unknown_protocol_names_the_url_and_known_ones() -> None:
    with pytest.raises(CheckpointError, match=r"foo://x/run.*s3://") as refused:
        open_storage("foo://x/run")
    assert isinstance(refused.value.__cause__, ValueError)


def test_a_missing_bucket_is_refused_before_anything_is_written(s3_bucket: S3Bucket) -> None:
    url = "s3://no-such-bucket-here/run"
    with pytest.raises(CheckpointError, match=r"s3://no-such-bucket-here/run.*create the bucket"):
        open_storage(url, s3_bucket.storage_options)
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options, skip_instance_cache=True)
    assert not fs.exists("no-such-bucket-here")
    assert bucket_contents(s3_bucket) == []


def test_wrong_credentials_are_refused_with_the_fix(s3_bucket: S3Bucket) -> None:
    s3_bucket.server.require_credentials(True)  # moto knows no keys: every key is wrong
    try:
        with pytest.raises(CheckpointError, match="AWS_ACCESS_KEY_ID") as refused:
            open_storage(s3_bucket.url(), s3_bucket.storage_options)
    finally:
        s3_bucket.server.require_credentials(False)
    assert s3_bucket.url() in str(refused.value)
    assert "storage_options" in str(refused.value)
    assert bucket_contents(s3_bucket) == []


@pytest.mark.parametrize(("hidden", "named"), [("fsspec", "pip install 'ckpts[s3]'"),
                                                ("s3fs", "pip install 'ckpts[s3]'")])
def test_a_missing_package_names_the_extra_to_install(hidden: str, named: str) -> None:
    script = (f"import sys; sys.modules[{hidden!r}] = None\n"
              "from ckpts.storage import open_storage\n"
              "from ckpts.errors import CheckpointError\n"
              "try:\n    open_storage('s3://bucket/run')\n"
              "except CheckpointError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)
    assert named in result.stdout and "s3://bucket/run" in result.stdout


# --- a server that goes away ---------------------------------------------------------------

def test_a_server_stopped_between_write_and_commit(s3_bucket: S3Bucket) -> None:
    storage = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    save(storage, 100, {"model.safetensors": b"old"})
    staged = storage.stage(checkpoint_name(200))
    storage.write(staged, [("model.safetensors", [memoryview(b"new")])])
    s3_bucket.server.stop()
    started = time.monotonic()
    try:
        with pytest.raises(OSError, match=re.escape(s3_bucket.url())):
            storage.commit(staged, b"{}")
        with pytest.raises(OSError, match="EndpointConnectionError"):
            storage.committed()
    finally:
        s3_bucket.server.start()
    assert time.monotonic() - started < 10  # gave up in seconds, not after minutes of retries
    assert [c.name for c in storage.committed()] == [checkpoint_name(100)]
    assert storage.clean(check_manifests=True) == [checkpoint_name(200)]
    save(storage, 200, {"model.safetensors": b"again"})
    assert sorted(c.name for c in storage.committed()) == [checkpoint_name(100),
                                                          checkpoint_name(200)]
    assert storage.read(checkpoint_name(100), "model.safetensors") == b"old"


def test_a_server_stopped_during_a_multipart_upload(s3_bucket: S3Bucket,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    save(storage, 100, {"model.safetensors": b"old"})
    call_s3 = storage.fs.call_s3
    calls: list[str] = []

    def stop_at_second_part(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        if calls.count("upload_part") == 2 and method == "upload_part":
            s3_bucket.server.stop()
        return call_s3(method, *args, **kwargs)

    monkeypatch.setattr(storage.fs, "call_s3", stop_at_second_part)  # fsspec's, not ckpts'
    data = os.urandom(30 * 2**20)
    staged = storage.stage(checkpoint_name(200))
    try:
        with pytest.raises(OSError, match=re.escape(s3_bucket.url())):
            storage.write(staged, [("model.safetensors", [memoryview(data)])])
    finally:
        s3_bucket.server.start()
    monkeypatch.undo()
    assert calls.count("upload_part") >= 2 and "complete_multipart_upload" not in calls
    assert [c.name for c in storage.committed()] == [checkpoint_name(100)]
    assert storage.sizes(checkpoint_name(200)) == {}  # no object from the broken upload
    save(storage, 200, {"model.safetensors": data})
    assert storage.read(checkpoint_name(200), "model.safetensors") == data
    assert storage.read(checkpoint_name(100), "model.safetensors") == b"old"


def test_a_large_file_goes_up_as_parallel_parts_of_bounded_size(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    call_s3 = storage.fs.call_s3
    in_flight, most_in_flight, part_sizes = [0], [0], []
    guard = threading.Lock()

    def count_parts(method: str, *args: Any, **kwargs: Any) -> Any:
        if method != "upload_part":
            return call_s3(method, *args, **kwargs)
        with guard:
            in_flight[0] += 1
            most_in_flight[0] = max(most_in_flight[0], in_flight[0])
            part_sizes.append(len(kwargs["Body"]))
        try:
            return call_s3(method, *args, **kwargs)
        finally:
            with guard:
                in_flight[0] -= 1

    monkeypatch.setattr(storage.fs, "call_s3", count_parts)  # fsspec's, not ckpts'
    data = os.urandom(30 * 2**20)
    halves = [memoryview(data)[:7_000_000], memoryview(data)[7_000_000:]]
    staged = storage.stage(checkpoint_name(200))
    storage.write(staged, [("model.safetensors", halves)])
    storage.commit(staged, b"{}")
    assert part_sizes and max(part_sizes) <= PART_SIZE and sum(part_sizes) == len(data)
    assert most_in_flight[0] > 1
    assert storage.read(checkpoint_name(200), "model.safetensors") == data


# --- the writer lease ----------------------------------------------------------------------

def write_lease(bucket: S3Bucket, *, expires: float) -> None:
    fs = fsspec.filesystem("s3", **bucket.storage_options, skip_instance_cache=True)
    lease = {"owner": "someone-else", "host": "other-host", "pid": 4242,
             "since": time.time() - 100, "expires": expires}
    fs.pipe_file(f"{bucket.name}/run/.ckpts.lock", json.dumps(lease).encode())


def test_a_live_lease_is_refused_naming_its_holder(s3_bucket: S3Bucket) -> None:
    write_lease(s3_bucket, expires=time.time() + 60)
    with pytest.raises(LockedError, match=r"other-host.*4242.*expires"):
        FsspecStorage(s3_bucket.url(), s3_bucket.storage_options).lock()


def test_an_expired_lease_is_taken_over(s3_bucket: S3Bucket) -> None:
    write_lease(s3_bucket, expires=time.time() - 1)
    storage = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    storage.lock()
    with pytest.raises(LockedError, match=str(os.getpid())):
        FsspecStorage(s3_bucket.url(), s3_bucket.storage_options).lock()
    storage.unlock()
    assert bucket_contents(s3_bucket) == []  # unlock deleted the lease


def test_of_two_takers_of_an_expired_lease_exactly_one_wins(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    write_lease(s3_bucket, expires=time.time() - 1)
    first = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    second = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    get = first._objects.get

    def the_other_takes_it_right_after_this_read(path: str) -> tuple[bytes, str] | None:
        found = get(path)
        second.lock()  # read the same expired lease, and wrote on that version first
        return found

    monkeypatch.setattr(first._objects, "get", the_other_takes_it_right_after_this_read)
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        first.lock()  # its write, conditional on the version both read, is refused
    second.unlock()


HOLDER = """
import sys, time
from ckpts.storage._fsspec import PART_SIZE, FsspecStorage
storage = FsspecStorage(sys.argv[1], {options}, lease_seconds=1.0)
storage.lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_renewed_lease_holds_and_a_killed_holders_lease_expires(s3_bucket: S3Bucket) -> None:
    script = HOLDER.format(options=repr(s3_bucket.storage_options))
    holder = subprocess.Popen([sys.executable, "-c", script, s3_bucket.url()],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        time.sleep(2.5)  # longer than the lease: only renewals keep it
        storage = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options, lease_seconds=1.0)
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            storage.lock()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        time.sleep(1.5)  # the lease's last renewal expires
        storage.lock()
        storage.unlock()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()


# --- two writers, one commit ---------------------------------------------------------------

def test_two_writers_racing_to_commit_a_step_one_wins(s3_bucket: S3Bucket) -> None:
    writers = [FsspecStorage(s3_bucket.url(), s3_bucket.storage_options) for _ in range(2)]
    staged = [writer.stage(checkpoint_name(500)) for writer in writers]
    writers[0].write(staged[0], [("model.safetensors", [memoryview(b"weights")])])
    with pytest.raises(FileExistsError):  # no upload of a save replaces an object
        writers[1].write(staged[1], [("model.safetensors", [memoryview(b"others")])])
    writers[1].write(staged[1], [("optimizer.safetensors", [memoryview(b"moments")])])
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def commit(index: int) -> None:
        start.wait()
        try:
            writers[index].commit(staged[index], f'{{"writer": {index}}}'.encode())
            outcomes.append("committed")
        except LockedError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("committed") == 1
    [refusal] = [o for o in outcomes if o != "committed"]
    assert "another writer committed this step" in refusal
    assert [c.name for c in writers[0].committed()] == [checkpoint_name(500)]


# --- cost ----------------------------------------------------------------------------------

def test_listing_a_run_of_50_checkpoints_is_one_request(s3_bucket: S3Bucket,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    storage = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    objects = {}
    for step in range(50):
        prefix = f"{s3_bucket.name}/run/{checkpoint_name(step)}"
        objects.update({f"{prefix}/model.safetensors": b"w" * step,
                        f"{prefix}/optim.safetensors": b"o", f"{prefix}/{MANIFEST}": b"{}"})
    objects[f"{s3_bucket.name}/run/{checkpoint_name(50)}/model.safetensors"] = b"uncommitted"
    storage.fs.pipe(objects)
    caplog.set_level(logging.INFO, logger="werkzeug")
    caplog.clear()
    listed = storage.committed()
    assert len(listed) == 50
    assert {c.step: c.sizes["model.safetensors"] for c in listed} == {s: s for s in range(50)}
    assert [r.split("?")[0] for r in server_requests(caplog)] == [f"GET /{s3_bucket.name}"]
    caplog.clear()
    assert storage.sizes(checkpoint_name(7)) == {"model.safetensors": 7,
                                                 "optim.safetensors": 1, MANIFEST: 2}
    assert len(server_requests(caplog)) == 1


def test_reading_many_adjacent_tensors_takes_a_get_per_part_not_per_tensor(
        s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture) -> None:
    storage = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    data = os.urandom(2 * PART_SIZE + 100)
    save(storage, 1, {"model.safetensors": data})
    tensors = [(begin, min(begin + 4096, len(data))) for begin in range(0, len(data), 4096)]
    buffers = [bytearray(end - begin) for begin, end in tensors]
    caplog.set_level(logging.INFO, logger="werkzeug")
    caplog.clear()
    storage.read_ranges(checkpoint_name(1), [
        Range("model.safetensors", begin, memoryview(buffer))
        for (begin, _), buffer in zip(tensors, buffers, strict=True)])
    assert b"".join(buffers) == data
    assert len(tensors) > 4000 and len(server_requests(caplog)) == 3  # ceil(size / PART_SIZE)


def test_foreign_checkpoints_at_the_run_level_are_named(s3_bucket: S3Bucket) -> None:
    storage = FsspecStorage(s3_bucket.url(), s3_bucket.storage_options)
    base = f"{s3_bucket.name}/run"
    storage.fs.pipe({f"{base}/pytorch_model.bin": b"x", f"{base}/notes.txt": b"x"})
    assert storage.foreign() == ["pytorch_model.bin"]
    # s3fs caches directory listings: a second call sees what another process added since
    another = fsspec.filesystem("s3", **s3_bucket.storage_options, skip_instance_cache=True)
    another.pipe({f"{base}/checkpoint-500/a": b"x", f"{base}/last.ckpt": b"x"})
    assert storage.foreign() == ["checkpoint-500", "last.ckpt", "pytorch_model.bin"]

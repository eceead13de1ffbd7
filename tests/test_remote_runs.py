"""The library on URLs, end to end, and the faults of S3, as a user meets them.

The first part runs one suite over a local directory, ``memory://`` and S3 (moto on
loopback, see s3_server.py): sync and async saves, listing, ``latest``/``best``,
``add_metrics``, pins, retention that really removes the objects from the store,
bit-exact restores, the fallback past a corrupt newest checkpoint, ``load_weights`` and
``load_state`` from records and URL strings, ``verify`` and re-saving a step. Everything
goes through ``ckpts.CheckpointManager(URL, storage_options=...)`` and the public
functions; the store is inspected (and damaged) through its own fsspec filesystem.

The second part is S3's faults through the manager: the server stopped in the middle of
a multipart upload, the writer SIGKILLed at random instants (``remote_worker.py``), two
writers on one run, and bad URLs.

``ckpts.verify`` and ``ckpts.load_weights`` take a URL string and no storage options, so
the S3 tests also set the AWS variables (key, secret, ``AWS_ENDPOINT_URL``) that reach
the test server, as a user would. CI kills the writer 4 times; ``CKPTS_LONG=1`` adds a run
of 40 kills::

    CKPTS_LONG=1 .venv/bin/pytest -q -m slow tests/test_remote_runs.py -p no:cacheprovider
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import ckpts
from ckpts._format.index import read_manifest
from ckpts.storage import checkpoint_name
from ckpts.storage._fsspec import PART_SIZE
from conftest import TinyNet, assert_state_dicts_equal, train_steps
from remote_worker import KEEP, LEASE_SECONDS, build, open_run, train_step
from s3_server import S3Bucket

WORKER = str(Path(__file__).with_name("remote_worker.py"))
LONG = os.environ.get("CKPTS_LONG") == "1"
CI_KILL_TRIALS, LONG_KILL_TRIALS = 4, 40
MIN_DELAY, MAX_DELAY = 0.1, 1.0  # seconds between the worker's "ready" and the SIGKILL
# the writer's lock (or lease), the lock of metadata updates, the history
METADATA = (".ckpts.lock", ".ckpts-updates.lock", ".ckpts-history.jsonl")


def reach_server_through_environment(bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let URL strings without storage options (``ckpts.verify(url)``) reach the test server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", bucket.storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bucket.storage_options["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", bucket.server.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@dataclass
class Run:
    """A run's location as the user passes it, and the store's own view of it."""

    location: str
    storage_options: dict[str, Any] | None
    fs: Any  # the store's fsspec filesystem, used to list and damage objects
    root: str  # the run's path in ``fs``

    def manager(self, **options: Any) -> ckpts.CheckpointManager:
        return ckpts.CheckpointManager(self.location, storage_options=self.storage_options,
                                       **options)

    def url_of(self, name: str) -> str:
        return f"{self.location}/{name}"

    def objects(self) -> list[str]:
        """Every object (file) below the run, relative to it, but the small metadata."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        relative = (path[len(self.root) + 1:] for path in found)
        return sorted(path for path in relative if path not in METADATA)

    def corrupt(self, name: str, file: str) -> None:
        """Flip the last byte (tensor data) of one object, as a new object of the same size."""
        path = f"{self.root}/{name}/{file}"
        data = bytearray(self.fs.cat_file(path))
        data[-1] ^= 0xFF
        self.fs.rm_file(path)  # a new file locally: an inode shared by hardlinks stays intact
        self.fs.pipe_file(path, bytes(data))


@pytest.fixture(params=["local", "memory", "s3"])
def run(request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    if request.param == "local":
        yield Run(str(tmp_path / "run"), None, fsspec.filesystem("file"), str(tmp_path / "run"))
    elif request.param == "memory":  # one store per process: a unique root per test
        fs = fsspec.filesystem("memory")
        root = f"/{uuid.uuid4().hex}/run"
        yield Run(f"memory:/{root}", None, fs, root)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        reach_server_through_environment(bucket, monkeypatch)
        fs = fsspec.filesystem("s3", **bucket.storage_options, skip_instance_cache=True)
        yield Run(bucket.url(), bucket.storage_options, fs, f"{bucket.name}/run")


def tiny(seed: int) -> tuple[ckpts.TrainState, TinyNet, torch.optim.AdamW]:
    """A TinyNet and AdamW after a few steps; ``seed`` makes different values."""
    torch.manual_seed(seed)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 3)
    return ckpts.TrainState(model=model, optimizer=optimizer), model, optimizer


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def files_of(manager: ckpts.CheckpointManager) -> list[str]:
    """The objects the listed checkpoints' manifests account for."""
    expected = []
    for checkpoint in manager.checkpoints():
        files = read_manifest(manager.storage, checkpoint.name)["files"]
        expected += [f"{checkpoint.name}/{file}" for file in [*files, "manifest.json"]]
    return sorted(expected)


# --- everything works on URLs ------------------------------------------------------------------

def test_sync_and_async_saves_are_listed_and_restore_bit_exact(run: Run) -> None:
    state, model, optimizer = tiny(0)
    with run.manager() as manager:
        first = manager.save(1, state, metrics={"val_loss": 0.5})
        train_steps(model, optimizer, 1)
        manager.save(2, state, metrics={"val_loss": 0.3})
    assert first is not None and str(first.path) == run.url_of("step-00000001")
    with run.manager(async_save=True) as manager:
        train_steps(model, optimizer, 1)
        manager.save(3, state, metrics={"val_loss": 0.4})
        saved = snapshot(model, optimizer)
        manager.wait()
        assert [c.step for c in manager.checkpoints()] == [1, 2, 3]
        latest, best = manager.latest(), manager.best("val_loss")
        assert latest is not None and latest.step == 3
        assert best is not None and best.step == 2
    assert run.objects() == files_of(run.manager())

    fresh, fresh_model, fresh_optimizer = tiny(1)
    with run.manager() as manager:
        assert manager.restore(fresh) == 3
    assert_state_dicts_equal(snapshot(fresh_model, fresh_optimizer), saved)


def test_retention_deletes_the_objects_on_the_store_and_spares_a_pinned_checkpoint(
        run: Run) -> None:
    state, model, optimizer = tiny(0)
    with run.manager(keep=[ckpts.KeepLast(2)]) as manager:
        for step in (1, 2):
            manager.save(step, state)
        assert manager.pin(1).tags == ("pinned",)
        for step in (3, 4):
            train_steps(model, optimizer, 1)
            manager.save(step, state)
        assert [c.step for c in manager.checkpoints()] == [1, 3, 4]
        assert {p.split("/")[0] for p in run.objects()} == {
            "step-00000001", "step-00000003", "step-00000004"}
        assert manager.unpin(1).tags == ()
        assert [c.step for c in manager.checkpoints()] == [3, 4]
        assert run.objects() == files_of(manager)  # no stray object of a deleted step
    assert {p.split("/")[0] for p in run.objects()} == {"step-00000003", "step-00000004"}


def test_add_metrics_is_stored_and_reranks_best(run: Run) -> None:
    state, _, _ = tiny(0)
    with run.manager() as manager:
        for step, loss in [(1, 0.3), (2, 0.2), (3, 0.4)]:
            manager.save(step, state, metrics={"val_loss": loss})
        assert manager.add_metrics(3, {"val_loss": 0.1}).metrics == {"val_loss": 0.1}
        manager.add_metrics(1, {"accuracy": 0.9})
    reader = run.manager()  # a new process's view: the metrics are on the store
    best, most_accurate = reader.best("val_loss"), reader.best("accuracy", "max")
    assert best is not None and best.step == 3
    assert most_accurate is not None and most_accurate.step == 1
    assert reader.checkpoints()[0].metrics == {"val_loss": 0.3, "accuracy": 0.9}


def test_restore_falls_back_past_a_corrupt_newest_checkpoint_that_verify_reports(
        run: Run, caplog: pytest.LogCaptureFixture) -> None:
    state, model, optimizer = tiny(0)
    with run.manager() as manager:
        manager.save(1, state)
        at_step_1 = snapshot(model, optimizer)
        train_steps(model, optimizer, 1)
        manager.save(2, state)
    assert ckpts.verify(run.location) == []
    run.corrupt("step-00000002", "model.safetensors")
    problems = ckpts.verify(run.location)
    assert problems and all(p.startswith("step-00000002: ") for p in problems), problems
    assert ckpts.verify(run.url_of("step-00000001")) == []

    fresh, fresh_model, fresh_optimizer = tiny(1)
    with caplog.at_level(logging.WARNING, logger="ckpts"), run.manager() as manager:
        assert manager.restore(fresh) == 1
    assert_state_dicts_equal(snapshot(fresh_model, fresh_optimizer), at_step_1)
    assert any("skipping corrupt checkpoint" in r.getMessage()
               and run.url_of("step-00000002") in r.getMessage() for r in caplog.records)


def test_load_weights_and_load_state_read_a_record_and_a_url(run: Run) -> None:
    state, model, optimizer = tiny(0)
    with run.manager() as manager:
        record = manager.save(7, state)
    assert record is not None
    from_record, from_url = TinyNet(), TinyNet()
    ckpts.load_weights(record, from_record)
    ckpts.load_weights(run.url_of("step-00000007"), from_url)
    assert_state_dicts_equal(from_record.state_dict(), model.state_dict())
    assert_state_dicts_equal(from_url.state_dict(), model.state_dict())
    saved_optimizer = ckpts.load_state(run.url_of("step-00000007"), "optimizer")
    assert_state_dicts_equal(saved_optimizer, optimizer.state_dict())


def test_readers_take_storage_options_for_a_url_without_aws_variables(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(variable, raising=False)
    state, model, optimizer = tiny(0)
    url, options = s3_bucket.url(), s3_bucket.storage_options
    with ckpts.CheckpointManager(url, storage_options=options) as manager:
        manager.save(7, state)
    step = f"{url}/step-00000007"
    loaded = TinyNet()
    ckpts.load_weights(step, loaded, storage_options=options)
    assert_state_dicts_equal(loaded.state_dict(), model.state_dict())
    assert_state_dicts_equal(ckpts.load_state(step, "optimizer", storage_options=options),
                             optimizer.state_dict())
    assert ckpts.verify(url, storage_options=options) == []
    assert ckpts.verify(step, storage_options=options) == []


def test_saving_a_step_again_replaces_it_whole(run: Run) -> None:
    state, model, optimizer = tiny(0)
    with run.manager(max_shard_size=600) as manager:  # many small files
        manager.save(5, state)
    many_files = run.objects()
    train_steps(model, optimizer, 2)
    replaced = snapshot(model, optimizer)
    with run.manager() as manager:  # one file per object this time
        manager.save(5, state)
        assert [c.step for c in manager.checkpoints()] == [5]
        assert run.objects() == files_of(manager)  # none of the first save's files is left
    assert len(run.objects()) < len(many_files)
    assert ckpts.verify(run.location) == []
    fresh, fresh_model, fresh_optimizer = tiny(1)
    with run.manager() as manager:
        assert manager.restore(fresh) == 5
    assert_state_dicts_equal(snapshot(fresh_model, fresh_optimizer), replaced)


# --- a server that goes away in the middle of an upload -------------------------------------

def big_state(seed: int) -> tuple[ckpts.TrainState, torch.nn.Linear]:
    """16 MiB of float32 weights: a multipart upload of two parts."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(2048, 2048, bias=False)
    assert model.weight.nbytes > PART_SIZE
    return ckpts.TrainState(model=model), model


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_server_stopped_mid_upload_fails_the_save_and_leaves_the_run_intact(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, async_save: bool) -> None:
    reach_server_through_environment(s3_bucket, monkeypatch)
    url = s3_bucket.url()
    state, model = big_state(0)
    manager = ckpts.CheckpointManager(url, storage_options=s3_bucket.storage_options,
                                      async_save=async_save)
    manager.save(1, state)
    manager.wait()
    at_step_1 = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)

    fs = manager.storage.fs  # type: ignore[attr-defined]  # s3fs's, not ckpts'
    call_s3, parts = fs.call_s3, []

    def stop_at_the_second_part(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part":
            parts.append(kwargs["PartNumber"])
            if len(parts) == 2:
                s3_bucket.server.stop()
        return call_s3(method, *args, **kwargs)

    failure = rf"step 2 to {re.escape(url)}.*earlier ones are intact"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fs, "call_s3", stop_at_the_second_part)
        try:
            if async_save:
                manager.save(2, state)  # returns once staged; the upload fails behind it
                with pytest.raises(ckpts.WriteError, match=failure):
                    manager.wait()
            else:
                with pytest.raises(ckpts.WriteError, match=failure):
                    manager.save(2, state)
        finally:
            s3_bucket.server.start()
    assert len(parts) >= 2

    assert [c.step for c in manager.checkpoints()] == [1]
    assert ckpts.verify(url) == []
    from_store = torch.nn.Linear(2048, 2048, bias=False)
    ckpts.load_weights(f"{url}/step-00000001", from_store)
    assert_state_dicts_equal(from_store.state_dict(), at_step_1)

    manager.save(2, state)  # the same manager goes on
    manager.close()
    assert [c.step for c in manager.checkpoints()] == [1, 2]
    ckpts.load_weights(f"{url}/step-00000002", from_store)
    assert_state_dicts_equal(from_store.state_dict(), model.state_dict())


def test_the_next_save_removes_the_objects_a_failed_save_could_not(s3_bucket: S3Bucket) -> None:
    state, _, _ = tiny(0)
    # dedup=False: step 2 holds the same tensors, which would be server-side copies
    manager = ckpts.CheckpointManager(s3_bucket.url(), storage_options=s3_bucket.storage_options,
                                      dedup=False)
    manager.save(1, state)
    fs = manager.storage.fs  # type: ignore[attr-defined]  # s3fs's, not ckpts'
    pipe_file, find, connected = fs.pipe_file, fs.find, [True]

    def lose_the_connection_after_an_upload(path: str, *args: Any, **kwargs: Any) -> Any:
        if not connected[0]:
            raise ConnectionError(f"{path}: the connection is lost")
        pipe_file(path, *args, **kwargs)
        if "/step-00000002/" in path:
            connected[0] = False  # the object landed; the store is gone from now on
            raise ConnectionError(f"{path}: the connection is lost")

    def find_while_connected(*args: Any, **kwargs: Any) -> Any:
        if not connected[0]:
            raise ConnectionError("the connection is lost")
        return find(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fs, "pipe_file", lose_the_connection_after_an_upload)
        patch.setattr(fs, "find", find_while_connected)
        with pytest.raises(ckpts.WriteError, match="step 2"):
            manager.save(2, state)  # the abort fails too: the store is gone
    manager.save(3, state)  # the store is back
    manager.close()
    store = fsspec.filesystem("s3", **s3_bucket.storage_options, skip_instance_cache=True)
    assert not [p for p in store.find(s3_bucket.name) if "/step-00000002/" in p]


# --- the writer SIGKILLed at random instants -----------------------------------------------

def start_and_kill(bucket: S3Bucket, seed: int, delay: float, log: Path) -> tuple[int, list[int]]:
    """Run the worker, SIGKILL it ``delay`` s after it printed ``ready``; its ready step and
    the steps it printed as committed."""
    lines: list[str] = []
    ready = threading.Event()
    with open(log, "ab") as stderr, subprocess.Popen(
            [sys.executable, WORKER, bucket.url(), bucket.server.endpoint, str(seed)],
            stdout=subprocess.PIPE, stderr=stderr, text=True) as worker:
        assert worker.stdout is not None
        stdout = worker.stdout

        def read() -> None:
            for line in stdout:
                lines.append(line.strip())
                if line.startswith("ready"):
                    ready.set()
            ready.set()  # EOF: the worker died on its own; the return code says so

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        ready.wait(120)
        time.sleep(delay)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
        reader.join(timeout=60)
    assert worker.returncode == -signal.SIGKILL, log.read_text()
    assert lines and lines[0].startswith("ready "), (lines, log.read_text())
    return int(lines[0].split()[1]), [int(line.split()[1]) for line in lines[1:]]


def take_over(bucket: S3Bucket, state: ckpts.TrainState
              ) -> tuple[ckpts.CheckpointManager, int | None]:
    """A manager that restored ``state`` from the run, once the killed writer's lease expired."""
    deadline = time.monotonic() + 5 * LEASE_SECONDS
    while True:
        manager = ckpts.CheckpointManager(open_run(bucket.url(), bucket.server.endpoint),
                                          keep=[ckpts.KeepLast(KEEP)])
        try:
            return manager, manager.restore(state)  # takes the lease first
        except ckpts.LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def kill_and_take_over(s3_bucket: S3Bucket, trials: int, seed: int, logs: Path) -> int:
    """``trials`` times: run the worker on the run, SIGKILL it at a random instant, check
    what is listed, take the run over, save one step and restore it bit-exact. Returns how
    many kills cut a save (or a retention delete) short: a step prefix without manifest."""
    url, delays = s3_bucket.url(), random.Random(seed)
    store = fsspec.filesystem("s3", **s3_bucket.storage_options, skip_instance_cache=True)
    run = Run(url, s3_bucket.storage_options, store, f"{s3_bucket.name}/run")
    newest, cut_short = 0, 0  # the newest step this test saved; kills in the middle of a save
    for trial in range(trials):
        ready, committed = start_and_kill(s3_bucket, 0, delays.uniform(MIN_DELAY, MAX_DELAY),
                                          logs / f"worker-{trial}.log")
        assert ready == newest  # the worker restored the newest checkpoint
        listed = [c.step for c in ckpts.CheckpointManager(url).checkpoints()]
        if committed:  # durable once save() returned; KeepLast(2) keeps it past one more save
            assert committed[-1] in listed, (committed, listed)
        if listed:
            assert ckpts.verify(url) == [], f"trial {trial}: a listed checkpoint is damaged"
        prefixes = {path.split("/")[0] for path in run.objects()}
        cut_short += bool(prefixes - {checkpoint_name(step) for step in listed})

        state, model, optimizer = build(0)
        manager, restored = take_over(s3_bucket, state)
        assert restored == (listed[-1] if listed else None)
        newest = (restored or 0) + 1
        train_step(model, optimizer, newest)
        manager.save(newest, state)
        manager.close()
        fresh, fresh_model, fresh_optimizer = build(1)
        with ckpts.CheckpointManager(open_run(url, s3_bucket.server.endpoint)) as reader:
            assert reader.restore(fresh) == newest
        assert_state_dicts_equal(snapshot(fresh_model, fresh_optimizer),
                                 snapshot(model, optimizer))
        assert run.objects() == files_of(ckpts.CheckpointManager(url)), f"trial {trial}: strays"
    return cut_short


def test_a_writer_killed_at_random_instants_never_leaves_a_listed_checkpoint_with_missing_objects(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reach_server_through_environment(s3_bucket, monkeypatch)
    kill_and_take_over(s3_bucket, CI_KILL_TRIALS, 9, tmp_path)  # about half cut a save short


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="set CKPTS_LONG=1 for the long SIGKILL run on S3")
@pytest.mark.timeout(1800)
def test_a_writer_killed_many_times_never_leaves_a_listed_checkpoint_with_missing_objects(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reach_server_through_environment(s3_bucket, monkeypatch)
    cut_short = kill_and_take_over(s3_bucket, LONG_KILL_TRIALS, 1000, tmp_path)
    assert cut_short >= LONG_KILL_TRIALS // 4  # most kills land in the middle of a save


# --- s3fs's listing cache: stale views of a run another process changes ------------------

def write_expired_lease(bucket: S3Bucket) -> None:
    """What a writer killed a while ago leaves: its lease object, expired."""
    store = fsspec.filesystem("s3", **bucket.storage_options, skip_instance_cache=True)
    lease = {"owner": "killed-writer", "host": "other-host", "pid": 4242,
             "since": time.time() - 100, "expires": time.time() - 1}
    store.pipe_file(f"{bucket.name}/run/.ckpts.lock", json.dumps(lease).encode())


def test_a_process_that_listed_the_run_takes_over_an_expired_lease(s3_bucket: S3Bucket) -> None:
    url, options = s3_bucket.url(), s3_bucket.storage_options
    state, _, _ = tiny(0)
    with ckpts.CheckpointManager(ckpts.storage.FsspecStorage(url, options)) as manager:
        manager.save(1, state)
    assert [c.step for c in manager.checkpoints()] == [1]  # a listing, cached by s3fs
    write_expired_lease(s3_bucket)  # another process wrote the run since, and was killed
    with ckpts.CheckpointManager(ckpts.storage.FsspecStorage(url, options)) as manager:
        manager.save(2, state)
        assert [c.step for c in manager.checkpoints()] == [1, 2]


def read_step_2_by_url(url: str) -> None:
    from_store = TinyNet()
    ckpts.load_weights(f"{url}/step-00000002", from_store)


def verify_by_url(url: str) -> None:
    assert ckpts.verify(url) == []


def list_by_url(url: str) -> None:
    assert [c.step for c in ckpts.CheckpointManager(url).checkpoints()] == [1, 2]


@pytest.mark.parametrize("read", [
    pytest.param(read_step_2_by_url, id="load_weights"),
    pytest.param(verify_by_url, id="verify"),
    pytest.param(list_by_url, id="checkpoints"),
])
def test_a_reader_that_looked_at_a_run_mid_save_sees_the_step_once_committed(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, read: Any) -> None:
    reach_server_through_environment(s3_bucket, monkeypatch)
    url = s3_bucket.url()
    state, _, _ = tiny(0)
    writer = ckpts.CheckpointManager(url, storage_options=s3_bucket.storage_options)
    writer.save(1, state)
    # step 2 is being written: its first object is up, its manifest not yet
    store = fsspec.filesystem("s3", **s3_bucket.storage_options, skip_instance_cache=True)
    store.pipe_file(f"{s3_bucket.name}/run/step-00000002/rng.safetensors", b"partial")
    assert ckpts.verify(url) == []  # an evaluation job looks at the run now
    writer.save(2, state)
    writer.close()
    assert [c.step for c in writer.checkpoints()] == [1, 2]  # the writer's own view is right
    read(url)


# --- two writers on one run ----------------------------------------------------------------

def test_a_second_writer_gets_locked_error_naming_the_holder_and_commits_nothing(
        s3_bucket: S3Bucket) -> None:
    url, options = s3_bucket.url(), s3_bucket.storage_options
    state, _, _ = tiny(0)
    first = ckpts.CheckpointManager(ckpts.storage.FsspecStorage(url, options))
    second = ckpts.CheckpointManager(ckpts.storage.FsspecStorage(url, options))
    first.save(1, state)
    with pytest.raises(ckpts.LockedError, match=rf"{re.escape(url)}.*pid {os.getpid()}"):
        second.save(2, state)
    assert [c.step for c in second.checkpoints()] == [1]
    first.close()  # the lease is released: the second may write now
    second.save(2, state)
    second.close()
    assert [c.step for c in first.checkpoints()] == [1, 2]


def test_two_writers_saving_at_once_exactly_one_commits(s3_bucket: S3Bucket) -> None:
    url, options = s3_bucket.url(), s3_bucket.storage_options
    managers = [ckpts.CheckpointManager(ckpts.storage.FsspecStorage(url, options))
                for _ in range(2)]
    states = [tiny(seed)[0] for seed in range(2)]
    start = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def save(index: int) -> None:
        start.wait()
        try:
            managers[index].save(1, states[index])
            outcomes[index] = "committed"
        except ckpts.LockedError as e:
            outcomes[index] = str(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for manager in managers:
        manager.close()
    assert sorted(outcomes) == [0, 1] and list(outcomes.values()).count("committed") == 1
    [refused] = [text for text in outcomes.values() if text != "committed"]
    assert url in refused
    assert [c.step for c in managers[0].checkpoints()] == [1]


# --- bad URLs ------------------------------------------------------------------------------

def test_an_unknown_protocol_is_refused_naming_the_url_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckpts.CheckpointError, match=r"nosuchproto://b/run.*check the protocol"):
        ckpts.CheckpointManager("nosuchproto://b/run")
    assert list(tmp_path.iterdir()) == []  # no local folder named 'nosuchproto:'


def bucket_objects(bucket: S3Bucket) -> list[str]:
    fs = fsspec.filesystem("s3", **bucket.storage_options, skip_instance_cache=True)
    return sorted(fs.find(bucket.name))


def test_a_missing_bucket_is_refused_naming_the_url_and_writes_nothing(
        s3_bucket: S3Bucket) -> None:
    url = "s3://no-such-bucket-for-ckpts/run"
    with pytest.raises(ckpts.CheckpointError, match=rf"{re.escape(url)}.*create the bucket"):
        ckpts.CheckpointManager(url, storage_options=s3_bucket.storage_options)
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options, skip_instance_cache=True)
    assert not fs.exists("no-such-bucket-for-ckpts")
    assert bucket_objects(s3_bucket) == []


def test_wrong_credentials_are_refused_naming_the_url_and_the_fix(s3_bucket: S3Bucket) -> None:
    s3_bucket.server.require_credentials(True)  # moto knows no key: every key is wrong
    try:
        with pytest.raises(ckpts.CheckpointError, match="AWS_ACCESS_KEY_ID") as refused:
            ckpts.CheckpointManager(s3_bucket.url(), storage_options=s3_bucket.storage_options)
    finally:
        s3_bucket.server.require_credentials(False)
    assert s3_bucket.url() in str(refused.value) and "storage_options" in str(refused.value)
    assert bucket_objects(s3_bucket) == []

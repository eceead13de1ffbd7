"""Metadata updates of committed checkpoints (``add_metrics``, ``pin``, ``unpin``) from many
threads and processes at once lose nothing and never tear a manifest; an evaluation job's
retention holds the writer lock for its deletions only; a full disk fails an update
cleanly. Real processes (``metadata_worker.py``), on a local run and on S3 (moto).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckpts
from s3_server import S3Bucket
from test_remote_runs import reach_server_through_environment

WORKER = str(Path(__file__).with_name("metadata_worker.py"))
PER_PROCESS = 80


@pytest.fixture(params=["local", "s3"])
def run(request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> str:
    """A run with steps 1, 2 and 3 (val_loss 0.5, 0.4, 0.3), on disk or on S3."""
    if request.param == "local":
        location = str(tmp_path / "run")
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        reach_server_through_environment(bucket, monkeypatch)
        location = bucket.url()
    with ckpts.CheckpointManager(location) as manager:
        for step, val_loss in ((1, 0.5), (2, 0.4), (3, 0.3)):
            manager.save(step, ckpts.TrainState(model=torch.nn.Linear(2, 2)),
                         metrics={"val_loss": val_loss})
    return location


def start_workers(run: str, *workers: tuple[str, str, int]) -> list[subprocess.Popen[str]]:
    """Start ``(mode, prefix, count)`` workers, wait until each is ready, then let them go."""
    started = [subprocess.Popen([sys.executable, WORKER, run, mode, prefix, str(count)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).parent)
               for mode, prefix, count in workers]
    for worker in started:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
    for worker in started:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    return started


def finish(workers: list[subprocess.Popen[str]]) -> None:
    for worker in workers:
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0 and out.strip().endswith("done"), out


def step_one(run: str) -> ckpts.Checkpoint:
    return next(c for c in ckpts.CheckpointManager(run).checkpoints() if c.step == 1)


def test_two_processes_adding_metrics_at_once_keep_all_of_them(run: str) -> None:
    finish(start_workers(run, ("metrics", "a", PER_PROCESS), ("metrics", "b", PER_PROCESS)))
    metrics = step_one(run).metrics
    added = {f"{prefix}{i}": float(i) for prefix in "ab" for i in range(PER_PROCESS)}
    assert metrics == {"val_loss": 0.5, **added}, f"{len(metrics) - 1} of {len(added)} kept"
    assert ckpts.verify(run) == []


@pytest.mark.parametrize("run", ["local"], indirect=True)  # S3: the same update as metrics
def test_two_processes_pinning_at_once_keep_every_tag(run: str) -> None:
    count = PER_PROCESS // 4
    finish(start_workers(run, ("tags", "a", count), ("tags", "b", count)))
    tags = set(step_one(run).tags)
    assert tags == {f"{prefix}{i}" for prefix in "ab" for i in range(count)}


@pytest.mark.parametrize("run", ["local"], indirect=True)  # every backend: test_storage_conformance
def test_threads_of_one_process_updating_at_once_never_tear_the_manifest(run: str) -> None:
    manager = ckpts.CheckpointManager(run)

    def update(i: int) -> None:
        if i % 3 == 0:
            manager.add_metrics(1, {f"m{i}": float(i)})
        elif i % 3 == 1:
            manager.pin(1, f"t{i}")
        else:
            manager.unpin(1, f"t{i - 1}")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(update, range(60)))
    checkpoint = step_one(run)  # still listed: the manifest was never torn
    assert set(checkpoint.metrics) == {"val_loss", *(f"m{i}" for i in range(0, 60, 3))}
    assert set(checkpoint.tags) <= {f"t{i}" for i in range(1, 60, 3)}
    model = torch.nn.Linear(2, 2)
    assert manager.restore(ckpts.TrainState(model=model)) == 3
    manager.close()


def test_an_evaluation_job_holds_the_writer_lock_only_while_its_retention_deletes(
        run: str) -> None:
    [evaluator] = start_workers(run, ("evaluate", "-", 0))
    assert evaluator.stdout is not None
    try:
        assert evaluator.stdout.readline().strip() == "evaluated"
        # the evaluator goes on running; a trainer restarted now takes the run over
        trainer = ckpts.CheckpointManager(run)
        assert trainer.restore(ckpts.TrainState(model=torch.nn.Linear(2, 2))) == 3
        assert [c.step for c in trainer.checkpoints()] == [1, 3]  # step 2 went
        trainer.save(4, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
        trainer.close()
    finally:
        finish_evaluator(evaluator)


def finish_evaluator(evaluator: subprocess.Popen[str]) -> None:
    assert evaluator.stdin is not None
    evaluator.stdin.write("go\n")
    evaluator.stdin.flush()
    finish([evaluator])


@contextlib.contextmanager
def filled(disk: Path) -> Iterator[None]:
    """Every free byte of ``disk`` taken, for the time of the ``with``."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (2**20, 2**12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    try:
        yield
    finally:
        filler.unlink()


def test_add_metrics_on_a_full_disk_raises_write_error_and_leaves_no_temporary_file(
        small_disk: Path) -> None:
    run = small_disk / "run"
    manager = ckpts.CheckpointManager(run)
    manager.save(1, ckpts.TrainState(model=torch.nn.Linear(2, 2)), metrics={"loss": 1.0})
    manifest = (run / "step-00000001" / "manifest.json").read_bytes()
    files = sorted(p.name for p in (run / "step-00000001").iterdir())
    with filled(small_disk), pytest.raises(ckpts.WriteError) as info:
        manager.add_metrics(1, {"eval_acc": 0.9})
    assert "step-00000001/manifest.json" in str(info.value) and "unchanged" in str(info.value)
    assert sorted(p.name for p in (run / "step-00000001").iterdir()) == files
    assert (run / "step-00000001" / "manifest.json").read_bytes() == manifest
    assert manager.add_metrics(1, {"eval_acc": 0.9}).metrics == {"loss": 1.0, "eval_acc": 0.9}
    assert ckpts.verify(run) == []


def test_an_updated_manifest_keeps_its_permissions(tmp_path: Path) -> None:
    """A shared run stays readable by the others: the temporary file's 0600 is not kept."""
    manager = ckpts.CheckpointManager(tmp_path / "run")
    manager.save(1, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    manifest = tmp_path / "run" / "step-00000001" / "manifest.json"
    manifest.chmod(0o644)
    manager.add_metrics(1, {"eval_acc": 0.9})
    assert manifest.stat().st_mode & 0o777 == 0o644

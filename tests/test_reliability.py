"""One writer per run, full disks, I/O errors, and readers racing a prune."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ckpts
from conftest import run_contents

HOLDER = textwrap.dedent("""
    import sys, time, torch, ckpts
    manager = ckpts.CheckpointManager(sys.argv[1])
    for step in (1, 2):
        manager.save(step, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    print("holding", flush=True)
    time.sleep(300)
""")


def test_a_second_writer_gets_locked_error_naming_the_holder(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            check_locked_out(tmp_path, holder)
        finally:
            holder.kill()  # the holder dies without cleaning up
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(3, ckpts.TrainState(model=torch.nn.Linear(2, 2)))  # stale lock: recovered
    assert [c.step for c in manager.checkpoints()] == [1, 2, 3]
    lock = json.loads((tmp_path / ".ckpts.lock").read_text())
    assert lock["pid"] == os.getpid()


def check_locked_out(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "holding"
    manager = ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(1)])
    started = time.monotonic()
    with pytest.raises(ckpts.LockedError) as info:
        manager.save(3, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    assert time.monotonic() - started < 5
    assert f"pid {holder.pid}" in str(info.value)
    assert f"host {socket.gethostname()}" in str(info.value)
    with pytest.raises(ckpts.LockedError):
        manager.prune()  # deleting is writing
    # an evaluation job may attach metrics and pin while training runs
    assert manager.add_metrics(1, {"eval_acc": 0.5}).metrics == {"eval_acc": 0.5}
    assert manager.pin(2, "keep").tags == ("keep",)
    # restoring means writing next: a duplicate launch fails before it trains
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ckpts.LockedError):
        manager.restore(ckpts.TrainState(model=model))
    # readers need no lock
    ckpts.load_weights(tmp_path / "step-00000001", model)
    assert ckpts.verify(tmp_path) == []
    assert [c.step for c in manager.checkpoints()] == [1, 2]


def test_managers_in_one_process_share_the_lock(tmp_path: Path) -> None:
    first = ckpts.CheckpointManager(tmp_path)
    second = ckpts.CheckpointManager(tmp_path)
    first.save(1, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    second.save(2, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    first.close()
    second.save(3, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    second.close()
    assert [c.step for c in second.checkpoints()] == [1, 2, 3]


def big_state(megabytes: int) -> ckpts.TrainState:
    model = torch.nn.ModuleList(torch.nn.Linear(1024, 256, bias=False) for _ in range(megabytes))
    return ckpts.TrainState(model=model)


def test_a_save_too_big_for_the_disk_is_refused_before_writing(small_disk: Path) -> None:
    run = small_disk / "run"
    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(1)])
    manager.save(1, big_state(20))
    with pytest.raises(ckpts.InsufficientSpaceError) as info:
        manager.save(2, big_state(30))
    error = info.value
    assert error.needed is not None and error.needed > 30 * 2**20
    assert error.free is not None and error.free < error.needed
    assert error.reclaimable is not None and error.reclaimable > 20 * 2**20  # step 1 would go
    message = str(error)
    assert "needs about 31.5 MB" in message and "free" in message and "Retention would" in message
    assert run_contents(run) == ["step-00000001"]
    assert ckpts.verify(run) == []


def test_enospc_while_writing_removes_the_partial_data(small_disk: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = small_disk / "run"
    manager = ckpts.CheckpointManager(run)
    manager.save(1, big_state(8))
    # space taken by someone else between the estimate and the write
    monkeypatch.setattr(ckpts.CheckpointManager, "_check_space", lambda *args: None)
    with pytest.raises(ckpts.InsufficientSpaceError, match="disk filled up while writing step 2"):
        manager.save(2, big_state(45))
    assert run_contents(run) == ["step-00000001"]
    assert ckpts.verify(run) == []
    manager.save(3, big_state(8))  # training goes on
    assert [c.step for c in manager.checkpoints()] == [1, 3]


def test_eio_while_writing_raises_and_leaves_earlier_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, big_state(1))
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ckpts.WriteError, match="Input/output error"):
        manager.save(2, big_state(1))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert run_contents(tmp_path) == ["step-00000001"]
    manager.save(3, big_state(1))
    assert [c.step for c in manager.checkpoints()] == [1, 3]


READER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from ckpts.storage import LocalStorage
    run, deadline, seen, bad = Path(sys.argv[1]), time.monotonic() + float(sys.argv[2]), 0, 0
    while time.monotonic() < deadline:
        for path in [run / entry.name for entry in LocalStorage(run).committed()]:
            try:
                manifest = json.loads((path / "manifest.json").read_text())
                present = set(os.listdir(path))
            except FileNotFoundError:
                continue  # deleted after listing: gone, not half-there
            seen += 1
            if not set(manifest["files"]) <= present:
                bad += 1
    print(seen, bad)
""")


def test_a_reader_never_sees_a_half_deleted_checkpoint(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    model = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(32))
    for step in range(1, 41):
        manager.save(step, ckpts.TrainState(model=model))
    with subprocess.Popen([sys.executable, "-c", READER, str(tmp_path), "4"],
                          stdout=subprocess.PIPE, text=True) as reader:
        time.sleep(0.5)
        pruner = ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(1)])
        pruner.prune()
        out, _ = reader.communicate(timeout=60)
    seen, bad = map(int, out.split())
    assert seen > 0
    assert bad == 0
    assert [c.step for c in pruner.checkpoints()] == [40]


def test_symlinks_never_count_as_checkpoint_data(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    run = tmp_path / "run"
    ckpts.CheckpointManager(outside).save(5, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    manager = ckpts.CheckpointManager(run)
    manager.save(1, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    (run / "step-00000005").symlink_to(outside / "step-00000005")
    assert [c.step for c in manager.checkpoints()] == [1]  # the linked directory is not listed
    weights = run / "step-00000001" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "step-00000005" / "model.safetensors")
    problems = ckpts.verify(run / "step-00000001")
    assert problems and "not a regular file" in problems[0]
    with pytest.raises(ckpts.CorruptCheckpointError):
        ckpts.load_weights(run / "step-00000001", torch.nn.Linear(2, 2))

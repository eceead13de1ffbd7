"""Retention after a synchronous save runs beside training, once the commit is durable:
save() does not wait for the deletions, everything that reads the run's checkpoints
does, a failed deletion is reported by the next call, and a process killed before its
deletions loses nothing (the next save applies retention)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import ckpts
from ckpts.storage._local import LocalStorage


def _state(value: float, width: int = 4) -> ckpts.TrainState:
    model = torch.nn.Linear(width, width)
    with torch.no_grad():
        model.weight.fill_(value)
    return ckpts.TrainState(model=model)


def _folders(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("step-"))


def test_save_returns_before_retention_deletes(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    deleting, release = threading.Event(), threading.Event()
    original = LocalStorage.delete

    def held_delete(self: LocalStorage, name: str) -> None:
        deleting.set()
        assert release.wait(30), "the test never released the deletion"
        original(self, name)

    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(1)])
    manager.save(1, _state(1.0))
    monkeypatch.setattr(LocalStorage, "delete", held_delete)
    manager.save(2, _state(2.0))  # returns although the deletion of step 1 is held
    assert deleting.wait(30)
    assert _folders(run) == ["step-00000001", "step-00000002"]
    release.set()
    assert [c.step for c in manager.checkpoints()] == [2]  # waits for the deletion
    assert _folders(run) == ["step-00000002"]
    manager.close()


def test_a_failed_deletion_is_raised_by_the_next_call_and_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    original = LocalStorage.delete

    def failing_delete(self: LocalStorage, name: str) -> None:
        raise OSError(errno.EIO, "Input/output error", str(run / name))

    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(1)])
    manager.save(1, _state(1.0))
    monkeypatch.setattr(LocalStorage, "delete", failing_delete)
    assert manager.save(2, _state(2.0)) is not None  # committed; the deletion fails later
    with pytest.raises(ckpts.WriteError, match=r"step 2 was committed to .*step-00000002, "
                       r"but the clean-up after the commit failed: .*Input/output error"):
        manager.wait()
    manager.wait()  # raised once
    assert _folders(run) == ["step-00000001", "step-00000002"]  # both whole
    monkeypatch.setattr(LocalStorage, "delete", original)
    manager.save(3, _state(3.0))
    manager.wait()
    assert _folders(run) == ["step-00000003"]  # the next save's retention caught up
    restored = _state(0.0)
    assert manager.restore(restored) == 3
    assert torch.equal(restored.objects["model"].weight, torch.full((4, 4), 3.0))
    manager.close()


def test_the_next_save_raises_a_failed_deletion(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(1)])
    manager.save(1, _state(1.0))
    monkeypatch.setattr(LocalStorage, "delete", lambda self, name: (_ for _ in ()).throw(
        OSError(errno.EACCES, "Permission denied")))
    manager.save(2, _state(2.0))
    with pytest.raises(ckpts.WriteError, match="clean-up after the commit failed"):
        manager.save(3, _state(3.0))
    assert _folders(run) == ["step-00000001", "step-00000002"]  # step 3 was not written
    monkeypatch.undo()
    manager.close()


def test_a_process_killed_before_its_deletions_loses_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, time, torch, ckpts
        from ckpts.storage._local import LocalStorage
        manager = ckpts.CheckpointManager({str(run)!r}, keep=[ckpts.KeepLast(1)])
        model = torch.nn.Linear(4, 4)
        with torch.no_grad():
            model.weight.fill_(1.0)
        manager.save(1, ckpts.TrainState(model=model))
        manager.wait()
        LocalStorage.delete = lambda self, name: time.sleep(60)  # never gets to delete
        with torch.no_grad():
            model.weight.fill_(2.0)
        manager.save(2, ckpts.TrainState(model=model))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _folders(run) == ["step-00000001", "step-00000002"]
    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(1)])
    restored = _state(0.0)
    assert manager.restore(restored) == 2
    assert torch.equal(restored.objects["model"].weight, torch.full((4, 4), 2.0))
    manager.save(3, restored)
    assert [c.step for c in manager.checkpoints()] == [3]
    manager.close()
    assert _folders(run) == ["step-00000003"]
    assert not [name for name in os.listdir(run) if name.startswith(".")
                and "trash" in name]


def test_a_budget_is_kept_before_save_returns(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """KeepWithinBytes promises the disk: its deletions stay inside save()."""
    run = tmp_path / "run"
    threads: list[str] = []
    original = LocalStorage.delete

    def recording_delete(self: LocalStorage, name: str) -> None:
        threads.append(threading.current_thread().name)
        original(self, name)

    monkeypatch.setattr(LocalStorage, "delete", recording_delete)
    # a checkpoint holds 0.26 MB: the budget has room for one
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(400_000)]) as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(float(step), width=256))
            assert _folders(run) == [f"step-{step:08d}"]
    assert threads == [threading.current_thread().name] * 2

"""Async saves: staged state is private, failures surface, kills and exits are safe."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import ckpts
from conftest import TinyNet, run_contents, train_steps
from faulty_storage import FaultyStorage, raising


def test_state_changed_right_after_save_is_not_in_the_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(256, 256)
    with torch.no_grad():
        model.weight.fill_(1.0)
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        pending = manager.save(1, ckpts.TrainState(model=model))
        with torch.no_grad():
            model.weight.fill_(2.0)  # the training thread goes on at once
        assert pending is not None and pending.step == 1
    fresh = torch.nn.Linear(256, 256)
    ckpts.load_weights(tmp_path / "step-00000001", fresh)
    assert torch.equal(fresh.weight, torch.ones(256, 256))


def test_a_writer_failure_surfaces_on_the_next_call(tmp_path: Path) -> None:
    storage = FaultyStorage(tmp_path)
    manager = ckpts.CheckpointManager(storage, async_save=True)
    state = ckpts.TrainState(model=torch.nn.Linear(2, 2))
    manager.save(1, state)
    manager.wait()
    storage.hooks["write"] = raising(OSError(5, "Input/output error"))
    manager.save(2, state)  # returns: the failure happens in the background
    with pytest.raises(ckpts.CheckpointError, match="Input/output error"):
        manager.save(3, state)
    del storage.hooks["write"]
    manager.wait()  # raised once only
    assert [c.step for c in manager.checkpoints()] == [1]
    assert run_contents(tmp_path) == ["step-00000001"]  # no partial data
    manager.save(4, state)
    manager.close()
    assert [c.step for c in manager.checkpoints()] == [1, 4]


def test_wait_and_close_raise_the_failure(tmp_path: Path) -> None:
    for finish in ("wait", "close"):
        storage = FaultyStorage(tmp_path / finish)
        storage.hooks["write"] = raising(OSError(28, "No space left"))
        manager = ckpts.CheckpointManager(storage, async_save=True)
        manager.save(1, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
        with pytest.raises(ckpts.CheckpointError, match="No space left"):
            getattr(manager, finish)()


def test_two_quick_saves_both_commit_in_order(tmp_path: Path) -> None:
    model = torch.nn.Linear(512, 512)
    order: list[int] = []
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.fill_(float(step))
            manager.save(step, ckpts.TrainState(model=model))
            order.append(step)
    checkpoints = manager.checkpoints()
    assert [c.step for c in checkpoints] == [1, 2]
    assert checkpoints[0].created <= checkpoints[1].created
    for checkpoint in checkpoints:
        fresh = torch.nn.Linear(512, 512)
        ckpts.load_weights(checkpoint, fresh)
        assert torch.equal(fresh.weight, torch.full((512, 512), float(checkpoint.step)))


def test_latest_moves_only_when_the_checkpoint_is_durable(tmp_path: Path) -> None:
    release = threading.Event()
    storage = FaultyStorage(tmp_path)
    storage.hooks["commit"] = lambda: release.wait(timeout=30) and None
    manager = ckpts.CheckpointManager(storage, async_save=True)
    manager.save(1, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    time.sleep(0.2)
    assert manager.latest() is None
    release.set()
    manager.wait()
    latest = manager.latest()
    assert latest is not None and latest.step == 1


def test_async_resume_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters())
    with ckpts.CheckpointManager(tmp_path, async_save=True, keep=[ckpts.KeepLast(2)]) as manager:
        for step in range(1, 6):
            train_steps(model, optimizer, 1)
            manager.save(step, ckpts.TrainState(model=model, optimizer=optimizer))
    train_steps(model, optimizer, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = TinyNet()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    assert ckpts.CheckpointManager(tmp_path).restore(
        ckpts.TrainState(model=fresh, optimizer=fresh_optimizer)) == 5
    train_steps(fresh, fresh_optimizer, 2)
    for key, value in expected.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_repeated_saves_restores_and_prunes_do_not_deadlock(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters())
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    deadline = time.monotonic() + 60
    with ckpts.CheckpointManager(tmp_path, async_save=True, keep=[ckpts.KeepLast(3)]) as manager:
        for step in range(1, 41):
            assert time.monotonic() < deadline, "stress loop too slow: a stall?"
            train_steps(model, optimizer, 1)
            manager.save(step, state, metrics={"loss": 1.0 / step})
            if step % 5 == 0:
                assert manager.restore(state) is not None
            if step % 7 == 0:
                manager.prune()
                manager.add_metrics(manager.checkpoints()[-1].step, {"eval": float(step)})
    # 35 was restored from last, but newer steps were committed since: KeepLast(3)
    assert [c.step for c in manager.checkpoints()] == [38, 39, 40]
    assert ckpts.verify(tmp_path) == []


EXITER = textwrap.dedent("""
    import sys, torch, ckpts
    manager = ckpts.CheckpointManager(sys.argv[1], async_save=True)
    model = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(16))
    manager.save(7, ckpts.TrainState(model=model))
    print("returned", flush=True)
    # no wait(), no close(): the interpreter exits with the save in flight
""")


def test_interpreter_exit_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", EXITER, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "returned"
    assert [c.step for c in ckpts.CheckpointManager(tmp_path).checkpoints()] == [7]
    assert ckpts.verify(tmp_path) == []


ASYNC_SAVER = textwrap.dedent("""
    import sys, torch, ckpts
    manager = ckpts.CheckpointManager(sys.argv[1], async_save=True)
    manager.save(1, ckpts.TrainState(model=torch.nn.Linear(4, 4)))
    manager.wait()
    big = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(64))  # 256 MB
    print("committed", flush=True)
    step = 2
    while True:
        manager.save(step, ckpts.TrainState(model=big))
        step += 1
""")


def test_sigkill_during_an_async_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with subprocess.Popen([sys.executable, "-c", ASYNC_SAVER, str(run)],
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "committed"
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".tmp-") and any(p.iterdir()) for p in run.iterdir()):
            assert time.monotonic() < deadline, "the async save never started writing"
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.wait()
    manager = ckpts.CheckpointManager(run)
    committed = [c.step for c in manager.checkpoints()]
    assert committed[0] == 1 and committed == sorted(committed)
    assert ckpts.verify(run) == []
    assert manager.restore(ckpts.TrainState(model=torch.nn.ModuleList(
        torch.nn.Linear(1024, 1024) for _ in range(64))) if committed[-1] > 1 else
        ckpts.TrainState(model=torch.nn.Linear(4, 4))) == committed[-1]
    manager.save(100, ckpts.TrainState(model=torch.nn.Linear(4, 4)))
    assert all(name.startswith("step-") for name in run_contents(run))

"""Saving a step older than the run's newest, branching on purpose, and errors after a commit."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import ckpts
from conftest import run_contents


def state() -> ckpts.TrainState:
    return ckpts.TrainState(model=torch.nn.Linear(4, 4))


def steps(run: Path) -> list[int]:
    return [c.step for c in ckpts.CheckpointManager(run).checkpoints()]


def snapshot_files(run: Path) -> dict[str, bytes]:
    """Every file of the run, by relative path (the lock file excluded)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".ckpts.lock"}


@pytest.mark.parametrize("async_save", [False, True])
def test_an_older_step_is_refused_before_anything_is_written(
        tmp_path: Path, async_save: bool) -> None:
    with ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(1)]) as first:
        first.save(40, state())
    before = snapshot_files(tmp_path)
    fresh = ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(1)], async_save=async_save)
    with pytest.raises(ckpts.InvalidArgumentError) as info:
        fresh.save(10, state())
    message = str(info.value)
    assert "step 10" in message and "step 40" in message
    assert "restore(state)" in message and "new directory" in message
    assert "discard_newer=True" in message
    fresh.close()
    assert snapshot_files(tmp_path) == before  # nothing written, nothing removed
    assert run_contents(tmp_path) == ["step-00000040"]


def test_saving_the_newest_step_again_replaces_it(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    with ckpts.CheckpointManager(tmp_path) as manager:
        manager.save(5, ckpts.TrainState(model=model))
    with torch.no_grad():
        model.weight.fill_(2.0)
    with ckpts.CheckpointManager(tmp_path) as again:
        again.save(5, ckpts.TrainState(model=model))
    loaded = torch.nn.Linear(4, 4)
    ckpts.load_weights(tmp_path / "step-00000005", loaded)
    assert torch.equal(loaded.weight, torch.full((4, 4), 2.0))


@pytest.mark.parametrize("async_save", [False, True])
def test_branching_deletes_newer_steps_only_once_a_new_one_is_committed(
        tmp_path: Path, async_save: bool) -> None:
    model = torch.nn.Linear(4, 4)
    with ckpts.CheckpointManager(tmp_path) as first:
        for step in (10, 20, 30):
            with torch.no_grad():
                model.weight.fill_(float(step))
            first.save(step, ckpts.TrainState(model=model))

    manager = ckpts.CheckpointManager(tmp_path, async_save=async_save)
    assert manager.restore(ckpts.TrainState(model=model), step=20, discard_newer=True) == 20
    assert torch.equal(model.weight, torch.full((4, 4), 20.0))
    assert steps(tmp_path) == [10, 20, 30]  # nothing deleted by the restore itself
    with pytest.raises(ckpts.InvalidArgumentError, match="branched from step 20"):
        manager.save(15, ckpts.TrainState(model=model))
    assert steps(tmp_path) == [10, 20, 30]
    manager.save(25, ckpts.TrainState(model=model))
    manager.wait()
    assert steps(tmp_path) == [10, 20, 25]
    manager.save(26, ckpts.TrainState(model=model))  # an ordinary run again
    with pytest.raises(ckpts.InvalidArgumentError, match="already holds step 26"):
        manager.save(21, ckpts.TrainState(model=model))
    manager.close()
    assert steps(tmp_path) == [10, 20, 25, 26]


def test_branching_refuses_to_delete_pinned_steps_and_needs_a_step(tmp_path: Path) -> None:
    with ckpts.CheckpointManager(tmp_path) as manager:
        for step in (1, 2, 3):
            manager.save(step, state())
        manager.pin(3, "paper")
        with pytest.raises(ckpts.InvalidArgumentError, match=r"\[3\] .* pinned"):
            manager.restore(state(), step=1, discard_newer=True)
        with pytest.raises(ckpts.InvalidArgumentError, match="needs step=K"):
            manager.restore(state(), discard_newer=True)
    assert steps(tmp_path) == [1, 2, 3]


class RemovesTheCommittedFolder:
    """A retention policy that, like another program running `rm -rf`, removes the
    checkpoint just committed while retention runs."""

    def keeps(self, checkpoints: Sequence[ckpts.Checkpoint]) -> set[int]:
        shutil.rmtree(checkpoints[-1].path)
        return set()


@pytest.mark.parametrize("async_save", [False, True])
def test_no_os_error_escapes_when_the_committed_folder_disappears(
        tmp_path: Path, async_save: bool) -> None:
    manager = ckpts.CheckpointManager(tmp_path, keep=[RemovesTheCommittedFolder()],
                                      async_save=async_save)
    record = manager.save(1, state())
    manager.close()
    assert record is not None and record.step == 1
    assert record.path == tmp_path / "step-00000001"
    assert steps(tmp_path) == []


def _a_day_later() -> float:
    return time.time() + 86400


@pytest.mark.parametrize("keep", [ckpts.KeepBest(1, "val_loss"),
                                  ckpts.KeepSince(60, clock=_a_day_later)])
def test_the_step_just_saved_is_never_ranked_out_at_once(
        tmp_path: Path, keep: ckpts.KeepBest | ckpts.KeepSince) -> None:
    with ckpts.CheckpointManager(tmp_path, keep=[keep]) as manager:
        manager.save(1, state(), metrics={"val_loss": 0.5})
        record = manager.save(2, state(), metrics={"val_loss": 9.0})  # worse, and not recent
        assert record is not None and record.step == 2
        assert 2 in steps(tmp_path)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_run_restored_past_a_corrupt_newest_checkpoint_goes_on_from_there(
        tmp_path: Path, async_save: bool) -> None:
    with ckpts.CheckpointManager(tmp_path) as first:
        for step in (10, 20, 30):
            first.save(step, state())
    damaged = tmp_path / "step-00000030" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"!")  # same size, wrong hash
    manager = ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(1)], async_save=async_save)
    assert manager.restore(state()) == 20
    assert steps(tmp_path) == [10, 20, 30]  # nothing deleted before a new commit
    manager.save(21, state())
    manager.close()
    assert steps(tmp_path) == [21]

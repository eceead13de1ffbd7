"""Retention and save triggers: which checkpoints are written, which survive."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckpts

NAN = math.nan


def steps(manager: ckpts.CheckpointManager) -> list[int]:
    return [c.step for c in manager.checkpoints()]


def state() -> ckpts.TrainState:
    return ckpts.TrainState(model=torch.nn.Linear(1, 1))


RETENTION_CASES = {
    # name: (keep, [(step, metrics)], survivors)
    "keep_last": ([ckpts.KeepLast(2)], [(s, {}) for s in (1, 2, 3, 4)], [3, 4]),
    "keep_best_min": (
        [ckpts.KeepBest(2, "val_loss")],
        [(1, {"val_loss": 3.0}), (2, {"val_loss": 1.0}), (3, {"val_loss": 2.0}),
         (4, {"val_loss": 5.0})],
        [2, 3, 4],  # 4 is the newest: always kept
    ),
    "keep_best_max": (
        [ckpts.KeepBest(1, "acc", mode="max")],
        [(1, {"acc": 0.5}), (2, {"acc": 0.9}), (3, {"acc": 0.7}), (4, {"acc": 0.1})],
        [2, 4],
    ),
    "ties_keep_the_earlier": (
        [ckpts.KeepBest(1, "val_loss")],
        [(1, {"val_loss": 2.0}), (2, {"val_loss": 1.0}), (3, {"val_loss": 1.0}),
         (4, {"val_loss": 3.0})],
        [2, 4],
    ),
    "nan_ranks_last": (
        [ckpts.KeepBest(2, "val_loss")],
        [(1, {"val_loss": NAN}), (2, {"val_loss": 9.0}), (3, {"val_loss": NAN}),
         (4, {"val_loss": 8.0}), (5, {"val_loss": 7.0})],
        [4, 5],
    ),
    "nan_kept_only_when_nothing_better": (
        [ckpts.KeepBest(2, "val_loss")],
        [(1, {"val_loss": NAN}), (2, {"val_loss": 9.0}), (3, {"val_loss": NAN})],
        [1, 2, 3],
    ),
    "missing_metric_is_never_a_candidate": (
        [ckpts.KeepBest(2, "val_loss")],
        [(1, {}), (2, {"train_loss": 0.1}), (3, {"val_loss": 4.0}), (4, {})],
        [3, 4],
    ),
    "keep_every": ([ckpts.KeepEvery(10)], [(s, {}) for s in (5, 10, 15, 20, 25)], [10, 20, 25]),
    "union_of_policies": (
        [ckpts.KeepBest(1, "val_loss"), ckpts.KeepLast(2), ckpts.KeepEvery(100)],
        [(100, {"val_loss": 1.0}), (150, {"val_loss": 0.5}), (200, {"val_loss": 2.0}),
         (250, {"val_loss": 3.0}), (300, {"val_loss": 4.0}), (350, {"val_loss": 5.0})],
        [100, 150, 200, 300, 350],
    ),
    "no_policy_keeps_everything": (None, [(s, {}) for s in (1, 2, 3)], [1, 2, 3]),
}


@pytest.mark.parametrize("case", sorted(RETENTION_CASES))
def test_retention_keeps_the_expected_set(tmp_path: Path, case: str) -> None:
    keep, saves, survivors = RETENTION_CASES[case]
    manager = ckpts.CheckpointManager(tmp_path, keep=keep)
    for step, metrics in saves:
        manager.save(step, state(), metrics=metrics)
    assert steps(manager) == survivors


def test_a_restarted_run_keeps_what_an_uninterrupted_one_would(tmp_path: Path) -> None:
    keep = [ckpts.KeepBest(2, "val_loss"), ckpts.KeepLast(1)]
    losses = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0, 0.5, 7.0]
    straight = ckpts.CheckpointManager(tmp_path / "a", keep=keep)
    for step, loss in enumerate(losses, start=1):
        straight.save(step, state(), metrics={"val_loss": loss})

    first = ckpts.CheckpointManager(tmp_path / "b", keep=keep)
    for step, loss in enumerate(losses[:4], start=1):
        first.save(step, state(), metrics={"val_loss": loss})
    second = ckpts.CheckpointManager(tmp_path / "b", keep=keep)  # a new process
    second.restore(state())
    for step, loss in enumerate(losses[4:], start=5):
        second.save(step, state(), metrics={"val_loss": loss})
    assert steps(second) == steps(straight) == [4, 7, 8]


def test_the_checkpoint_restored_from_is_protected_until_a_newer_one_commits(
        tmp_path: Path) -> None:
    with ckpts.CheckpointManager(tmp_path) as manager:
        for step in (1, 2, 3):
            manager.save(step, state())
    resumed = ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(1)])
    assert resumed.restore(state(), step=2) == 2
    assert [c.step for c in resumed.prune()] == [1]  # 2 (restored from) and 3 (newest) stay
    resumed.save(4, state())
    assert steps(resumed) == [4]  # as an uninterrupted run with KeepLast(1) would keep
    resumed.close()


def test_pins_protect_until_unpinned(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(1)])
    manager.save(1, state())
    pinned = manager.pin(1, "paper-figure")
    assert pinned.tags == ("paper-figure",)
    for step in (2, 3):
        manager.save(step, state())
    assert steps(manager) == [1, 3]
    assert manager.unpin(1, "paper-figure").tags == ()
    assert steps(manager) == [3]


def test_metrics_added_later_rerank(tmp_path: Path) -> None:
    keep = [ckpts.KeepBest(1, "eval_acc", "max"), ckpts.KeepLast(3)]
    manager = ckpts.CheckpointManager(tmp_path, keep=keep)
    for step in (1, 2, 3):
        manager.save(step, state(), metrics={"train_loss": 1.0 / step})
    manager.add_metrics(1, {"eval_acc": 0.7})  # an evaluation job, later
    manager.save(4, state())
    assert steps(manager) == [1, 2, 3, 4]  # 1 is the best so far
    updated = manager.add_metrics(3, {"eval_acc": 0.9})
    assert updated.metrics == {"train_loss": 1.0 / 3, "eval_acc": 0.9}
    assert steps(manager) == [2, 3, 4]  # 3 now beats 1
    manager.save(5, state())
    assert steps(manager) == [3, 4, 5]
    assert manager.best("eval_acc", "max").step == 3
    assert ckpts.verify(tmp_path) == []


def test_best_handles_nan_missing_and_mode(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    assert manager.best("val_loss") is None
    for step, loss in ((1, NAN), (2, 2.0), (3, 1.0), (4, None)):
        manager.save(step, state(), metrics={} if loss is None else {"val_loss": loss})
    assert manager.best("val_loss").step == 3
    assert manager.best("val_loss", mode="max").step == 2
    assert manager.best("nope") is None
    with pytest.raises(ckpts.InvalidArgumentError, match="mode"):
        manager.best("val_loss", mode="mid")  # type: ignore[arg-type]


def test_add_metrics_and_pin_of_an_unknown_step_are_refused(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, state())
    with pytest.raises(ckpts.NotACheckpointError, match="step 2"):
        manager.add_metrics(2, {"x": 1.0})
    with pytest.raises(ckpts.NotACheckpointError, match="step 2"):
        manager.pin(2)
    with pytest.raises(ckpts.InvalidArgumentError, match="metric 'x'"):
        manager.add_metrics(1, {"x": "high"})


def test_every_steps(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path, save=ckpts.Every(steps=3))
    results = [manager.save(step, state()) for step in range(1, 10)]
    assert [r.step for r in results if r is not None] == [3, 6, 9]
    assert manager.save(10, state(), force=True) is not None


def test_every_epochs(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path, save=ckpts.Every(epochs=2))
    saved = [step for step in range(12)
             if manager.save(step, state(), epoch=step // 3) is not None]
    assert saved == [6]  # epoch 2 starts at step 6; epoch 4 would start at 12


def test_every_seconds_with_an_injected_clock(tmp_path: Path) -> None:
    now = [0.0]
    manager = ckpts.CheckpointManager(tmp_path, save=ckpts.Every(seconds=60,
                                                                 clock=lambda: now[0]))
    saved = []
    for step in range(10):
        now[0] = step * 25.0  # 0, 25, 50, 75, ...
        if manager.save(step, state()) is not None:
            saved.append(step)
    assert saved == [3, 6, 9]  # 75 s, then 150 s, then 225 s


def test_on_improvement_with_min_delta(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(
        tmp_path, save=ckpts.OnImprovement("val_loss", mode="min", min_delta=0.1))
    losses = [1.0, 0.95, 0.85, 0.9, 0.7, NAN, 0.65, 0.5]
    saved = [step for step, loss in enumerate(losses)
             if manager.save(step, state(), metrics={"val_loss": loss}) is not None]
    assert saved == [0, 2, 4, 7]
    # a new process starts from the best on disk, not from scratch
    again = ckpts.CheckpointManager(tmp_path, save=ckpts.OnImprovement("val_loss"))
    assert again.save(8, state(), metrics={"val_loss": 0.6}) is None
    assert again.save(9, state(), metrics={"val_loss": 0.4}) is not None


def test_any_trigger_in_a_list_saves(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(
        tmp_path, save=[ckpts.Every(steps=5), ckpts.OnImprovement("acc", mode="max")])
    accs = [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.1]
    saved = [step for step, acc in enumerate(accs, start=1)
             if manager.save(step, state(), metrics={"acc": acc}) is not None]
    assert saved == [1, 4, 5]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ckpts.Every(), "needs steps="),
        (lambda: ckpts.Every(steps=0), "steps must be an int >= 1"),
        (lambda: ckpts.Every(seconds=-1), "must be > 0"),
        (lambda: ckpts.OnImprovement("loss", mode="lower"), "mode must be"),
        (lambda: ckpts.OnImprovement("loss", min_delta=-1), "min_delta"),
        (lambda: ckpts.KeepBest(0, "loss"), "n must be"),
        (lambda: ckpts.KeepBest(1, "loss", mode="best"), "mode must be"),
        (lambda: ckpts.KeepEvery(0), "steps must be"),
        (lambda: ckpts.KeepSince(0), "must be > 0"),
        (lambda: ckpts.CheckpointManager("x", save=3), "not a save trigger"),
    ],
)
def test_bad_policy_arguments(make, match: str) -> None:
    with pytest.raises(ckpts.InvalidArgumentError, match=match):
        make()


def test_keep_since_with_an_injected_clock(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    for step in (1, 2):
        manager.save(step, state())
    checkpoints = manager.checkpoints()
    created = checkpoints[1].created.timestamp()
    policy = ckpts.KeepSince(10, clock=lambda: created + 5)
    assert policy.keeps(checkpoints) >= {2}
    assert ckpts.KeepSince(1, clock=lambda: created + 3600).keeps(checkpoints) == set()


SIGTERM_WORKER = textwrap.dedent("""
    import signal, sys, time, torch, ckpts
    manager = ckpts.CheckpointManager(sys.argv[1], save=ckpts.Every(steps=1000),
                                      save_on_signal=(signal.SIGTERM,))
    state = ckpts.TrainState(model=torch.nn.Linear(2, 2))
    for step in range(1, 100000):
        if step == 3:
            print("ready", flush=True)
        time.sleep(0.01)
        manager.save(step, state)
""")


def test_sigterm_saves_then_exits_with_the_signal_status(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with subprocess.Popen([sys.executable, "-c", SIGTERM_WORKER, str(run)],
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGTERM
    manager = ckpts.CheckpointManager(run)
    saved = steps(manager)
    assert len(saved) == 1 and saved[0] >= 3  # Every(1000) alone would never have saved
    assert ckpts.verify(run) == []

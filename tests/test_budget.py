"""KeepWithinBytes: the run's physical size stays within a disk budget, on real runs.

Budgets are computed from the sizes of real checkpoints measured here, never
hard-coded, and every size the library reports is cross-checked against the disk
(unique inodes, since a reused file is a hard link).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from rich.filesize import decimal

import ckpts
from ckpts._run.usage import physical_bytes
from ckpts.storage import checkpoint_name

WIDTH = 512  # a 512x512 float32 Linear: about 1 MB a checkpoint


class FrozenBase(torch.nn.Module):
    """A frozen base (whole files a save can reuse) and a small trainable adapter."""

    def __init__(self, width: int = WIDTH, rank: int = 4) -> None:
        super().__init__()
        self.base = torch.nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.down = torch.nn.Linear(width, rank, bias=False)
        self.up = torch.nn.Linear(rank, width, bias=False)


def dense_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(WIDTH, WIDTH)


def frozen_model() -> FrozenBase:
    torch.manual_seed(0)
    return FrozenBase()


def train(model: torch.nn.Module) -> None:
    """Change every trainable parameter, as a training step would."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)


def steps(manager: ckpts.CheckpointManager) -> list[int]:
    return [c.step for c in manager.checkpoints()]


def checkpoint_files(run: Path) -> Iterable[Path]:
    return (f for d in run.glob("step-*") for f in d.iterdir() if f.is_file())


def disk_bytes(run: Path) -> int:
    """What the run's checkpoints hold on disk: st_size over unique inodes."""
    inodes = {(s.st_dev, s.st_ino): s.st_size for s in map(os.stat, checkpoint_files(run))}
    return sum(inodes.values())


def folder_bytes(run: Path, step: int) -> int:
    """One checkpoint's logical size: all its files, shared or not."""
    return sum(f.stat().st_size for f in (run / checkpoint_name(step)).iterdir())


def physical(manager: ckpts.CheckpointManager) -> int:
    return physical_bytes(manager.storage.committed())


def check_within(manager: ckpts.CheckpointManager, run: Path, budget: int) -> None:
    """The run fits the budget, by the library's count and by the disk's."""
    assert physical(manager) == disk_bytes(run)
    assert disk_bytes(run) <= budget


def full_size(tmp_path: Path, model: torch.nn.Module) -> int:
    """The size of one checkpoint of ``model``, measured on a probe run."""
    probe = tmp_path / "probe"
    with ckpts.CheckpointManager(probe) as manager:
        manager.save(1, ckpts.TrainState(model=model))
    return folder_bytes(probe, 1)


def run_files(run: Path) -> dict[str, bytes]:
    """Every file of the run and its bytes (the writer's lock file aside)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".ckpts.lock"}


def assert_nothing_written(run: Path, before: dict[str, bytes]) -> None:
    after = run_files(run)
    assert after == before
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


# 1. eviction order


def test_budget_evicts_oldest_first_and_run_stays_within_it(tmp_path: Path) -> None:
    model = dense_model()
    size = full_size(tmp_path, model)
    budget = 3 * size + size // 2
    run = tmp_path / "run"
    sizes: dict[int, int] = {}
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        for step in range(1, 9):
            train(model)
            manager.save(step, ckpts.TrainState(model=model))
            sizes[step] = folder_bytes(run, step)
            # expected: the longest run of newest checkpoints whose sizes fit
            expected = [step]
            for older in range(step - 1, 0, -1):
                if sum(sizes[s] for s in [older, *expected]) > budget:
                    break
                expected.insert(0, older)
            assert steps(manager) == expected
            check_within(manager, run, budget)
    assert steps(manager) == [6, 7, 8]


# 2. shared files count once


@pytest.mark.parametrize("dedup", [True, False])
def test_shared_frozen_base_counts_once_so_more_checkpoints_fit(tmp_path: Path,
                                                                dedup: bool) -> None:
    model = frozen_model()
    size = full_size(tmp_path, model)
    budget = 3 * size
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)],
                                 dedup=dedup) as manager:
        for step in range(1, 11):
            train(model)
            manager.save(step, ckpts.TrainState(model=model))
            check_within(manager, run, budget)
        kept = steps(manager)
    if dedup:
        assert kept == list(range(1, 11))
        logical = sum(folder_bytes(run, s) for s in kept)
        assert logical > 3 * budget  # counted per checkpoint, it would not fit
    else:
        assert kept == [9, 10]


def test_dedup_run_evicts_oldest_and_keeps_the_shared_base(tmp_path: Path) -> None:
    model = frozen_model()
    size = full_size(tmp_path, model)
    budget = size + size // 4  # the base, and room for a few adapter-only saves
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        for step in range(1, 31):
            train(model)
            manager.save(step, ckpts.TrainState(model=model))
            check_within(manager, run, budget)
        kept = steps(manager)
    assert kept == list(range(kept[0], 31))  # a run of the newest
    assert 1 < kept[0] < 30  # some were evicted, several fit
    # step 1 wrote the base and is gone; its bytes live on, linked once per survivor
    base = [os.stat(run / checkpoint_name(s) / "model-00001-of-00002.safetensors")
            for s in kept]
    assert {b.st_ino for b in base} == {base[0].st_ino}
    assert base[0].st_nlink == len(kept)


# 3. protection


def test_newest_and_pinned_are_never_evicted(tmp_path: Path) -> None:
    model = dense_model()
    size = full_size(tmp_path, model)
    budget = 3 * size + size // 2
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        manager.save(1, ckpts.TrainState(model=model))
        manager.pin(1)
        for step in range(2, 8):
            train(model)
            manager.save(step, ckpts.TrainState(model=model))
            assert steps(manager)[0] == 1 and steps(manager)[-1] == step
            check_within(manager, run, budget)
        assert steps(manager) == [1, 6, 7]


def test_checkpoint_restored_from_is_not_evicted(tmp_path: Path) -> None:
    model = dense_model()
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run) as manager:
        for step in (1, 2, 3):
            train(model)
            manager.save(step, ckpts.TrainState(model=model))
    budget = 2 * folder_bytes(run, 1) + folder_bytes(run, 1) // 2
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        manager.restore(ckpts.TrainState(model=dense_model()), step=1)
        removed = manager.prune()
        assert [c.step for c in removed] == [2]
        assert steps(manager) == [1, 3]
        check_within(manager, run, budget)


def test_keep_best_pick_is_not_evicted(tmp_path: Path) -> None:
    model = dense_model()
    size = full_size(tmp_path, model)
    budget = 2 * size + size // 2
    run = tmp_path / "run"
    # KeepLast(3) picks 3, 4, 5 and KeepBest picks 2; the budget has room for two
    keep: list[ckpts.RetentionPolicy] = [
        ckpts.KeepBest(1, "val_loss"), ckpts.KeepLast(3), ckpts.KeepWithinBytes(budget)]
    with ckpts.CheckpointManager(run, keep=keep) as manager:
        for step, loss in enumerate([0.5, 0.1, 0.9, 0.8, 0.7], start=1):
            train(model)
            manager.save(step, ckpts.TrainState(model=model), metrics={"val_loss": loss})
            check_within(manager, run, budget)
        assert steps(manager) == [2, 5]


@pytest.mark.parametrize(("last", "fit", "expected"), [
    (5, 3, [6, 7, 8]),  # the budget caps KeepLast's picks, oldest first
    (2, 5, [7, 8]),     # a budget with room to spare: KeepLast still removes
])
def test_budget_caps_keep_last(tmp_path: Path, last: int, fit: int, expected: list[int]
                               ) -> None:
    model = dense_model()
    size = full_size(tmp_path, model)
    budget = fit * size + size // 2
    run = tmp_path / "run"
    keep: list[ckpts.RetentionPolicy] = [ckpts.KeepLast(last), ckpts.KeepWithinBytes(budget)]
    with ckpts.CheckpointManager(run, keep=keep) as manager:
        for step in range(1, 9):
            train(model)
            manager.save(step, ckpts.TrainState(model=model))
            check_within(manager, run, budget)
        assert steps(manager) == expected


# 4. nothing can be freed


def test_save_that_cannot_fit_is_refused_before_writing(tmp_path: Path) -> None:
    model = dense_model()
    size = full_size(tmp_path, model)
    budget = 2 * size + size // 2
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        for step in (1, 2):
            train(model)
            manager.save(step, ckpts.TrainState(model=model))
        manager.pin(1)
        manager.pin(2)
        before = run_files(run)
        train(model)
        with pytest.raises(ckpts.InsufficientSpaceError) as refused:
            manager.save(3, ckpts.TrainState(model=model))
        assert_nothing_written(run, before)
        message = str(refused.value)
        assert str(run) in message and "step 3" in message
        assert decimal(budget) in message
        assert "unpin" in message and "KeepWithinBytes" in message
        assert "Nothing was written" in message
        assert steps(manager) == [1, 2]

        manager.unpin(1)  # the run fits: unpinning alone removes nothing
        assert steps(manager) == [1, 2]
        manager.save(3, ckpts.TrainState(model=model))
        assert steps(manager) == [2, 3]
        check_within(manager, run, budget)


def test_budget_smaller_than_one_checkpoint_refuses_every_save(tmp_path: Path) -> None:
    model = dense_model()
    budget = full_size(tmp_path, model) // 2
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        with pytest.raises(ckpts.InsufficientSpaceError, match="does not fit the budget"):
            manager.save(1, ckpts.TrainState(model=model))
        assert manager.checkpoints() == []
        assert not list(run.glob("step-*")) and not list(run.glob("*.tmp-*"))
        # a state that fits (a tenth of the size) saves
        small = torch.nn.Linear(WIDTH // 10, WIDTH // 10)
        manager.save(1, ckpts.TrainState(model=small))
        assert steps(manager) == [1]
        check_within(manager, run, budget)


@pytest.mark.parametrize("surfaces_from", ["wait", "save"])
def test_async_refusal_surfaces_later_and_writes_nothing(tmp_path: Path,
                                                         surfaces_from: str) -> None:
    model = dense_model()
    size = full_size(tmp_path, model)
    budget = size + size // 2
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)],
                                 async_save=True) as manager:
        manager.save(1, ckpts.TrainState(model=model))
        manager.wait()
        manager.pin(1)
        before = run_files(run)
        train(model)
        manager.save(2, ckpts.TrainState(model=model))  # staged: the check runs behind
        later: Callable[[], object] = manager.wait if surfaces_from == "wait" else (
            lambda: manager.save(3, ckpts.TrainState(model=model)))
        with pytest.raises(ckpts.InsufficientSpaceError, match="does not fit the budget"):
            later()
        manager.wait()  # the failure was raised once
        assert_nothing_written(run, before)
        manager.unpin(1)
        manager.save(3, ckpts.TrainState(model=model))
        manager.wait()
        assert steps(manager) == [3]
        check_within(manager, run, budget)


# 5. budget values


@pytest.mark.parametrize(("budget", "nbytes"), [
    (4096, 4096),
    ("2MB", 2_000_000),
    ("1.5GiB", 3 * 2**29),
    (" 300 kib ", 300 * 1024),
])
def test_budget_accepts_ints_and_size_strings(budget: int | str, nbytes: int) -> None:
    keep = ckpts.KeepWithinBytes(budget)
    assert keep.nbytes == nbytes
    assert repr(budget) in repr(keep)


@pytest.mark.parametrize("budget", [0, -1, "lots", True, 1.5, "0MB", "-2GB", None])
def test_bad_budget_is_refused_at_construction(budget: object) -> None:
    with pytest.raises(ckpts.InvalidArgumentError) as refused:
        ckpts.KeepWithinBytes(budget)  # type: ignore[arg-type]
    assert repr(budget) in str(refused.value)


def test_string_budget_governs_a_run_like_its_int(tmp_path: Path) -> None:
    model = dense_model()
    size = full_size(tmp_path, model)
    kib = (2 * size + size // 2) // 1024
    kept = []
    for budget in (f"{kib}KiB", kib * 1024):
        run = tmp_path / f"run-{budget}"
        with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
            for step in range(1, 6):
                train(model)
                manager.save(step, ckpts.TrainState(model=model))
            kept.append(steps(manager))
            check_within(manager, run, kib * 1024)
    assert kept == [[4, 5], [4, 5]]


# 6. prune, add_metrics and unpin apply the budget again


def unbudgeted_run(run: Path, count: int) -> int:
    """``count`` checkpoints saved without retention; returns one's size."""
    model = dense_model()
    with ckpts.CheckpointManager(run) as manager:
        for step in range(1, count + 1):
            train(model)
            manager.save(step, ckpts.TrainState(model=model))
    return folder_bytes(run, 1)


def test_prune_applies_a_new_budget(tmp_path: Path) -> None:
    run = tmp_path / "run"
    size = unbudgeted_run(run, 5)
    budget = 2 * size + size // 2
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        assert [c.step for c in manager.prune(dry_run=True)] == [1, 2, 3]
        assert steps(manager) == [1, 2, 3, 4, 5]
        assert [c.step for c in manager.prune()] == [1, 2, 3]
        assert steps(manager) == [4, 5]
        check_within(manager, run, budget)


def test_add_metrics_reapplies_budget_with_the_new_ranking(tmp_path: Path) -> None:
    run = tmp_path / "run"
    size = unbudgeted_run(run, 5)
    budget = 2 * size + size // 2
    # KeepLast(5) keeps every step: only the budget removes any
    keep: list[ckpts.RetentionPolicy] = [
        ckpts.KeepBest(1, "acc", mode="max"), ckpts.KeepLast(5), ckpts.KeepWithinBytes(budget)]
    with ckpts.CheckpointManager(run, keep=keep) as manager:
        record = manager.add_metrics(2, {"acc": 0.9})
        assert record.step == 2 and record.metrics == {"acc": 0.9}
        assert steps(manager) == [2, 5]
        check_within(manager, run, budget)


def test_unpin_lets_eviction_proceed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    size = unbudgeted_run(run, 5)
    with ckpts.CheckpointManager(run) as manager:
        for step in (1, 2, 3):
            manager.pin(step)
    budget = 2 * size + size // 2
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        assert [c.step for c in manager.prune()] == [4]  # all else is protected
        assert steps(manager) == [1, 2, 3, 5]
        manager.unpin(2)
        assert steps(manager) == [1, 3, 5]
        manager.unpin(1)
        assert steps(manager) == [3, 5]
        check_within(manager, run, budget)


# 7. a save that reuses files counts only what it writes


@pytest.mark.parametrize("first", [0, 1])  # step 0 as the source of the reused base, too
@pytest.mark.parametrize("dedup", [True, False])
def test_adapter_save_fits_where_a_full_save_would_not(tmp_path: Path, dedup: bool,
                                                       first: int) -> None:
    model = frozen_model()
    size = full_size(tmp_path, model)
    budget = size + size // 4
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)],
                                 dedup=dedup) as manager:
        manager.save(first, ckpts.TrainState(model=model))
        manager.pin(first)  # the full checkpoint stays: only the new bytes can fit
        before = run_files(run)
        train(model)
        if not dedup:
            with pytest.raises(ckpts.InsufficientSpaceError, match="does not fit the budget"):
                manager.save(first + 1, ckpts.TrainState(model=model))
            assert_nothing_written(run, before)
            return
        for step in range(first + 1, first + 6):
            manager.save(step, ckpts.TrainState(model=model))
            check_within(manager, run, budget)
            train(model)
        assert steps(manager) == list(range(first, first + 6))
        base = [os.stat(run / checkpoint_name(s) / "model-00001-of-00002.safetensors")
                for s in steps(manager)]
        assert {b.st_ino for b in base} == {base[0].st_ino}  # one frozen-base file...
        assert base[0].st_nlink == 6  # ...linked into all six checkpoints


# the pre-write check protects only what retention protects once the save is committed


def test_resumed_run_saves_when_retention_can_remove_the_restored_step(tmp_path: Path
                                                                       ) -> None:
    model = dense_model()
    size = full_size(tmp_path, model)
    budget = size + size // 2
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        manager.save(1, ckpts.TrainState(model=model))
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepWithinBytes(budget)]) as manager:
        manager.restore(ckpts.TrainState(model=model))
        train(model)
        # once step 2 is committed, step 1 is neither the newest nor protected as
        # restored-from (the manager drops that protection), so retention removes it
        manager.save(2, ckpts.TrainState(model=model))
        assert steps(manager) == [2]
        check_within(manager, run, budget)

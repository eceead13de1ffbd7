"""Reuse of unchanged tensor files across checkpoints (dedup), on real files and stores.

A save compares each tensor file with the same-named file of the checkpoint this
manager saved or restored last, by hashing the bytes being saved (never by trusting
``requires_grad``); an equal file is reused: hard-linked on a local disk, copied on
the server on an object store. The model here (``dedup_worker.AdapterNet``) is a
frozen base of ~4 MB plus a small trainable adapter, so the base is a file of its own
that every later save reuses.

What must hold: reuse happens (same inode) and only for equal bytes; every
checkpoint stays whole whatever is deleted in whatever order, copied elsewhere or
killed mid-save; ``verify`` and ``restore`` see shared files as each checkpoint's own;
a source file damaged at rest is never reused, so no save commits a checkpoint that
fails ``verify`` (on a disk and on a store).

The SIGKILL tests run 2 worker lives per mode; ``CKPTS_LONG=1`` runs 12::

    CKPTS_LONG=1 .venv/bin/pytest -q tests/test_dedup.py -k sigkill
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

import ckpts
from dedup_worker import FROZEN_KEYS, KEEP, TRAINABLE_KEYS, AdapterNet, build, train_step
from faulty_storage import FaultyStorage, raising
from s3_server import S3Bucket
from test_kill_harness import leftovers, start_and_kill

if TYPE_CHECKING:
    from ckpts.storage import Staged

WORKER = str(Path(__file__).with_name("dedup_worker.py"))
CKPTS = str(Path(sys.executable).parent / "ckpts")
DATA = Path(__file__).with_name("data")
LONG = os.environ.get("CKPTS_LONG") == "1"
SEED = 7
SIGKILL_LIVES = 12 if LONG else 2
READY_TIMEOUT = 120.0

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------- helpers


def tensors_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Tensors:
    """Copies of every model and optimizer tensor, flat: what a restore must give back."""
    found = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, slots in optimizer.state_dict()["state"].items():
        found |= {f"optimizer.{index}.{k}": v.clone() for k, v in slots.items()
                  if isinstance(v, torch.Tensor)}
    return found


def assert_same(got: Tensors, expected: Tensors, where: str) -> None:
    assert got.keys() == expected.keys(), where
    differing = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differing, f"{where}: restored wrong values for {differing}"


def restored(run: str | Path, step: int, *, frozen: bool = True,
             storage_options: dict[str, Any] | None = None) -> Tensors:
    """``step`` restored by a fresh manager into a model built from another seed."""
    state, model, optimizer = build(SEED + 1000, frozen=frozen)
    with ckpts.CheckpointManager(run, storage_options=storage_options) as manager:
        assert manager.restore(state, step=step) == step
    return tensors_of(model, optimizer)


def read_back(checkpoint: str | Path) -> Tensors:
    """A checkpoint's tensors as the lock-free readers return them (hash-checked)."""
    found = {f"model.{k}": v for k, v in ckpts.load_state(checkpoint, "model").items()}
    for index, slots in ckpts.load_state(checkpoint, "optimizer")["state"].items():
        found |= {f"optimizer.{index}.{k}": v for k, v in slots.items()
                  if isinstance(v, torch.Tensor)}
    return found


def file_of(checkpoint: Path, keys: Sequence[str]) -> str:
    """The one model file holding ``keys`` (from the Hugging Face index)."""
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    files = {weight_map["weight_map"][key] for key in keys}
    assert len(files) == 1, f"{keys} are spread over {files}"
    return str(files.pop())


def inode(path: Path) -> int:
    return os.stat(path).st_ino


def tensor_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("*.safetensors"))


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:08d}"


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte in place (``offset`` < 0 counts from the end)."""
    where = offset if offset >= 0 else os.stat(path).st_size + offset
    with open(path, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0xFF]))


def middle_of(data: bytes, key: str) -> int:
    """The offset of the middle byte of tensor ``key``'s data in safetensors ``data``."""
    size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + size])[key]["data_offsets"]
    return 8 + size + (begin + end) // 2


def train_and_save(manager: ckpts.CheckpointManager, state: ckpts.TrainState,
                   model: AdapterNet, optimizer: torch.optim.Optimizer,
                   steps: Sequence[int]) -> dict[int, Tensors]:
    """Train and save each step; returns what each step saved."""
    saved = {}
    for step in steps:
        train_step(model, optimizer, step)
        manager.save(step, state)
        saved[step] = tensors_of(model, optimizer)
    manager.wait()
    return saved


@dataclass(frozen=True)
class KeepAllBut:
    """A user's retention policy: keep every checkpoint but ``step`` (deletes that one)."""

    step: int

    def keeps(self, checkpoints: Sequence[ckpts.Checkpoint]) -> set[int]:
        return {c.step for c in checkpoints} - {self.step}


# ---------------------------------------------------------------- 1. reuse happens


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_frozen_base_is_hard_linked_and_trainable_files_are_written_anew(
        tmp_path: Path, async_save: bool) -> None:
    state, model, optimizer = build(SEED)
    with ckpts.CheckpointManager(tmp_path, async_save=async_save) as manager:
        saved = train_and_save(manager, state, model, optimizer, [1, 2, 3])
    checkpoints = [step_dir(tmp_path, step) for step in (1, 2, 3)]
    frozen = file_of(checkpoints[0], FROZEN_KEYS)
    trainable = file_of(checkpoints[0], TRAINABLE_KEYS)
    assert frozen != trainable  # the frozen base is whole files of its own

    assert len({inode(c / frozen) for c in checkpoints}) == 1
    assert os.stat(checkpoints[0] / frozen).st_nlink == 3
    for name in (trainable, "optimizer.safetensors"):
        assert len({inode(c / name) for c in checkpoints}) == 3, name
        assert all(os.stat(c / name).st_nlink == 1 for c in checkpoints), name
    assert ckpts.verify(tmp_path) == []
    for step in (1, 2, 3):
        assert_same(restored(tmp_path, step), saved[step], f"step {step}")


def test_a_full_fine_tune_reuses_no_file(tmp_path: Path) -> None:
    state, model, optimizer = build(SEED, frozen=False)
    with ckpts.CheckpointManager(tmp_path) as manager:
        for step in (1, 2, 3):
            train_step(model, optimizer, step)
            torch.rand(())  # draws from the global RNG, as dropout would: rng changes too
            manager.save(step, state)
    files = [f for step in (1, 2, 3) for f in tensor_files(step_dir(tmp_path, step))]
    assert files and all(os.stat(f).st_nlink == 1 for f in files)
    assert len({inode(f) for f in files}) == len(files)
    assert ckpts.verify(tmp_path) == []


@pytest.mark.parametrize("dedup", [True, False])
def test_dedup_false_writes_every_file_even_when_nothing_changed(
        tmp_path: Path, dedup: bool) -> None:
    """Two saves of the same state: with dedup every tensor file is shared (the
    contrast that shows the check can fail), without it none is."""
    state, model, optimizer = build(SEED)
    train_step(model, optimizer, 1)
    with ckpts.CheckpointManager(tmp_path, dedup=dedup) as manager:
        manager.save(1, state)
        manager.save(2, state)
    first, second = tensor_files(step_dir(tmp_path, 1)), tensor_files(step_dir(tmp_path, 2))
    assert [f.name for f in first] == [f.name for f in second]
    shared = [a.name for a, b in zip(first, second, strict=True) if inode(a) == inode(b)]
    assert shared == ([f.name for f in first] if dedup else [])
    assert ckpts.verify(tmp_path) == []


# ---------------------------------------------------------------- 2. deletions in any order


def test_retention_deleting_the_oldest_leaves_every_kept_checkpoint_whole(tmp_path: Path) -> None:
    """KeepLast(2) deletes the first checkpoint (the one whose files the others link
    to) first; each kept one must verify and read back exactly after every save."""
    state, model, optimizer = build(SEED)
    saved: dict[int, Tensors] = {}
    with ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(2)]) as manager:
        for step in range(1, 6):
            saved |= train_and_save(manager, state, model, optimizer, [step])
            listed = [c.step for c in manager.checkpoints()]
            assert listed == list(range(max(1, step - 1), step + 1))
            assert ckpts.verify(tmp_path) == []
            for checkpoint in manager.checkpoints():
                assert_same(read_back(checkpoint.path), saved[checkpoint.step],
                            f"step {checkpoint.step} after saving {step}")
    frozen = file_of(step_dir(tmp_path, 5), FROZEN_KEYS)
    assert inode(step_dir(tmp_path, 4) / frozen) == inode(step_dir(tmp_path, 5) / frozen)
    for step in (4, 5):
        assert_same(restored(tmp_path, step), saved[step], f"step {step}")


@pytest.mark.parametrize("order", [(1, 2, 3, 4), (4, 3, 2, 1), (2, 4, 1, 3), (1, 3)],
                         ids=["oldest-first", "newest-first", "scattered", "first-then-middle"])
def test_deleting_sharing_checkpoints_in_any_order_leaves_the_rest_whole(
        tmp_path: Path, order: tuple[int, ...]) -> None:
    state, model, optimizer = build(SEED)
    with ckpts.CheckpointManager(tmp_path) as manager:
        saved = train_and_save(manager, state, model, optimizer, range(1, 6))
    frozen = file_of(step_dir(tmp_path, 1), FROZEN_KEYS)
    assert os.stat(step_dir(tmp_path, 1) / frozen).st_nlink == 5
    remaining = set(saved)
    for doomed in order:
        with ckpts.CheckpointManager(tmp_path, keep=[KeepAllBut(doomed)]) as pruner:
            assert [c.step for c in pruner.prune()] == [doomed]
        remaining.discard(doomed)
        assert [c.step for c in ckpts.CheckpointManager(tmp_path).checkpoints()] \
            == sorted(remaining)
        assert ckpts.verify(tmp_path) == []
        for step in sorted(remaining):
            assert_same(restored(tmp_path, step), saved[step],
                        f"step {step} after deleting {order[:order.index(doomed) + 1]}")
    survivor = step_dir(tmp_path, min(remaining))
    assert os.stat(survivor / frozen).st_nlink == len(remaining)


def test_ckpts_prune_then_a_new_save_keeps_sharing_with_the_survivor(tmp_path: Path) -> None:
    state, model, optimizer = build(SEED)
    with ckpts.CheckpointManager(tmp_path) as manager:
        saved = train_and_save(manager, state, model, optimizer, range(1, 5))
    pruned = subprocess.run([CKPTS, "prune", str(tmp_path), "--keep-last", "2"],
                            capture_output=True, text=True, timeout=120)
    assert pruned.returncode == 0, pruned.stderr
    assert [c.step for c in ckpts.CheckpointManager(tmp_path).checkpoints()] == [3, 4]
    assert ckpts.verify(tmp_path) == []
    for step in (3, 4):
        assert_same(restored(tmp_path, step), saved[step], f"step {step}")
    # the survivor is the restore source of a resumed run: its base is linked again
    state, model, optimizer = build(SEED + 1000)
    with ckpts.CheckpointManager(tmp_path) as manager:
        assert manager.restore(state) == 4
        saved |= train_and_save(manager, state, model, optimizer, [5])
    frozen = file_of(step_dir(tmp_path, 4), FROZEN_KEYS)
    assert inode(step_dir(tmp_path, 4) / frozen) == inode(step_dir(tmp_path, 5) / frozen)
    assert ckpts.verify(tmp_path) == []
    assert_same(restored(tmp_path, 5), saved[5], "step 5")


# ---------------------------------------------------------------- 3. a copied folder


def test_a_copied_checkpoint_folder_is_whole_after_the_run_is_deleted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state, model, optimizer = build(SEED)
    with ckpts.CheckpointManager(run) as manager:
        saved = train_and_save(manager, state, model, optimizer, [1, 2, 3])
    elsewhere = tmp_path / "copy" / "step-00000002"
    shutil.copytree(step_dir(run, 2), elsewhere)
    shutil.rmtree(run)
    assert all(os.stat(f).st_nlink == 1 for f in tensor_files(elsewhere))
    assert ckpts.verify(elsewhere) == []
    assert_same(read_back(elsewhere), saved[2], "the copy")
    assert_same(restored(elsewhere.parent, 2), saved[2], "the copy restored")


# ---------------------------------------------------------------- 4. SIGKILL during reusing saves


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train as the worker does, on one thread: same kernels, same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def replayed(step: int) -> Tensors:
    """The worker's tensors after ``step`` uninterrupted steps."""
    _, model, optimizer = build(SEED)
    with one_thread():
        for s in range(1, step + 1):
            train_step(model, optimizer, s)
    return tensors_of(model, optimizer)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_saves_that_reuse_files_leaves_every_checkpoint_whole(
        tmp_path: Path, mode: str) -> None:
    """Each life: the worker restores the newest checkpoint, reuses its base file in
    every save, and is killed at a seeded random instant. After each kill every
    listed checkpoint verifies, the newest restores to its exact state, all listed
    checkpoints share one base file, and the next writer (a save here, which also
    trains the next step so that the worker's replay stays exact) leaves no leftover."""
    run = tmp_path / "run"
    rng = random.Random(f"dedup-{mode}")
    durable = 0
    for life in range(SIGKILL_LIVES):
        killed = start_and_kill(run, mode, SEED, rng.uniform(0.05, 1.5),
                                tmp_path / "worker.stderr", worker=WORKER)
        assert killed.ready_step >= durable
        durable = max([durable, killed.ready_step, *killed.committed])
        listed = [c.step for c in ckpts.CheckpointManager(run).checkpoints()]
        assert durable in listed or durable == 0, f"life {life}: step {durable} lost: {listed}"
        assert ckpts.verify(run) == [], f"life {life}"
        if not listed:
            continue
        frozen = file_of(step_dir(run, listed[-1]), FROZEN_KEYS)
        assert len({inode(step_dir(run, s) / frozen) for s in listed}) == 1, \
            f"life {life}: the base is not one shared file in {listed}"

        state, model, optimizer = build(SEED + 1000)
        with ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(KEEP)]) as manager:
            newest = manager.restore(state)
            assert newest == listed[-1]
            assert_same(tensors_of(model, optimizer), replayed(newest), f"life {life}")
            with one_thread():  # the worker replays this step on one thread next life
                train_step(model, optimizer, newest + 1)
            manager.save(newest + 1, state)
        durable = newest + 1
        assert leftovers(run) == [], f"life {life}"
        assert ckpts.verify(run) == [], f"life {life}"
        assert inode(step_dir(run, newest) / frozen) == inode(step_dir(run, newest + 1) / frozen)


# ---------------------------------------------------------------- 5. verify of shared files


def test_a_flipped_byte_in_a_shared_file_fails_every_checkpoint_sharing_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Sharing is a trade-off: the bytes of a reused file exist once on disk, so one
    damaged sector damages every checkpoint that links it. ``verify`` reports it
    for each of them, and ``restore()`` falls back past all of them to the newest
    checkpoint with its own copy (here step 1, saved before the base changed)."""
    state, model, optimizer = build(SEED)
    with ckpts.CheckpointManager(tmp_path) as manager:
        saved = train_and_save(manager, state, model, optimizer, [1])
        with torch.no_grad():
            model.base_weight(0).mul_(0.5)  # a new base: step 2 writes it, 3 and 4 reuse it
        saved |= train_and_save(manager, state, model, optimizer, [2, 3, 4])
    assert ckpts.verify(tmp_path) == []
    frozen = file_of(step_dir(tmp_path, 4), FROZEN_KEYS)
    assert inode(step_dir(tmp_path, 1) / frozen) != inode(step_dir(tmp_path, 2) / frozen)
    flip_byte(step_dir(tmp_path, 3) / frozen, -5)

    problems = ckpts.verify(tmp_path)
    damaged = sorted({p.split(":")[0] for p in problems})
    assert damaged == ["step-00000002", "step-00000003", "step-00000004"], problems
    assert all(frozen in p for p in problems), problems
    assert ckpts.verify(step_dir(tmp_path, 1)) == []

    state, model, optimizer = build(SEED + 1000)
    with caplog.at_level(logging.WARNING, logger="ckpts"), \
            ckpts.CheckpointManager(tmp_path) as manager:
        assert manager.restore(state) == 1
    for step in (2, 3, 4):
        assert f"skipping corrupt checkpoint {step_dir(tmp_path, step)}" in caplog.text
    assert_same(tensors_of(model, optimizer), saved[1], "the fallback")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_source_damaged_at_rest_is_written_anew_and_every_later_checkpoint_verifies(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, async_save: bool) -> None:
    """The other side of the trade-off: a byte inside a base tensor flipped on disk
    after steps 1 and 2 committed the base (one inode: both are damaged). The
    manager's next save would link that file; it must read it back, see the damage,
    write the base from the bytes being saved, and warn naming the file; later saves
    reuse the intact copy. So every checkpoint committed after the damage verifies,
    and once KeepLast(2) has pruned the damaged ones the whole run does, its newest
    checkpoint restoring bit-exact."""
    state, model, optimizer = build(SEED)
    with caplog.at_level(logging.WARNING, logger="ckpts"), \
            ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(2)],
                                    async_save=async_save) as manager:
        saved = train_and_save(manager, state, model, optimizer, [1, 2])
        frozen = file_of(step_dir(tmp_path, 2), FROZEN_KEYS)
        damaged = step_dir(tmp_path, 2) / frozen
        damaged_inode = inode(damaged)
        assert damaged_inode == inode(step_dir(tmp_path, 1) / frozen)
        flip_byte(damaged, middle_of(damaged.read_bytes(), FROZEN_KEYS[0]))
        assert ckpts.verify(step_dir(tmp_path, 2)) != []
        for step in (3, 4, 5):
            saved |= train_and_save(manager, state, model, optimizer, [step])
            assert ckpts.verify(step_dir(tmp_path, step)) == [], f"step {step}"
            if step == 3:
                assert inode(step_dir(tmp_path, 3) / frozen) != damaged_inode
    assert [c.step for c in ckpts.CheckpointManager(tmp_path).checkpoints()] == [4, 5]
    assert ckpts.verify(tmp_path) == []
    assert inode(step_dir(tmp_path, 4) / frozen) == inode(step_dir(tmp_path, 5) / frozen)
    warned = [r.getMessage() for r in caplog.records
              if r.name == "ckpts" and frozen in r.getMessage()]
    assert len(warned) == 1, warned
    assert "step-00000002" in warned[0] and "ckpts verify" in warned[0], warned[0]
    assert_same(restored(tmp_path, 5), saved[5], "step 5")


@pytest.mark.parametrize("fault", ["truncated", "unreadable"])
def test_a_source_truncated_or_unreadable_is_written_not_reused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str) -> None:
    """The check reads the source back through the storage port: a source cut short
    is damage; one whose read fails (EIO from a bad sector, injected at the port) cannot
    be shown intact. Either way the save writes the file, warns, and commits a
    checkpoint that verifies."""
    storage = FaultyStorage(tmp_path)
    state, model, optimizer = build(SEED)
    with caplog.at_level(logging.WARNING, logger="ckpts"), \
            ckpts.CheckpointManager(storage) as manager:
        train_and_save(manager, state, model, optimizer, [1])
        frozen = file_of(step_dir(tmp_path, 1), FROZEN_KEYS)
        source = step_dir(tmp_path, 1) / frozen
        if fault == "truncated":
            os.truncate(source, os.stat(source).st_size - 100)
        else:
            storage.hooks["map_file"] = raising(OSError(errno.EIO, "Input/output error"))
        saved = train_and_save(manager, state, model, optimizer, [2])
        storage.hooks.clear()
    assert inode(source) != inode(step_dir(tmp_path, 2) / frozen)
    assert ckpts.verify(step_dir(tmp_path, 2)) == []
    warned = [r.getMessage() for r in caplog.records
              if r.name == "ckpts" and frozen in r.getMessage()]
    assert len(warned) == 1, warned
    assert ("is damaged" if fault == "truncated" else "could not be read back") in warned[0]
    assert_same(restored(tmp_path, 2), saved[2], "step 2")


# ---------------------------------------------------------------- 6. a frozen tensor modified


def change_through_torch(model: AdapterNet) -> None:
    with torch.no_grad():
        model.base_weight(2).data[0, 0] += 1


def change_through_numpy(model: AdapterNet) -> None:
    # a numpy view writes the storage without bumping torch's version counter
    model.base_weight(2).numpy()[-1, -1] += 1


@pytest.mark.parametrize("change", [change_through_torch, change_through_numpy],
                         ids=["no_grad", "numpy_view"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_modified_frozen_tensor_is_written_not_reused(
        tmp_path: Path, change: Any, async_save: bool) -> None:
    state, model, optimizer = build(SEED)
    with ckpts.CheckpointManager(tmp_path, async_save=async_save) as manager:
        train_and_save(manager, state, model, optimizer, [1])
        change(model)
        assert not model.base_weight(2).requires_grad  # still "frozen"
        saved = train_and_save(manager, state, model, optimizer, [2])
        reused = train_and_save(manager, state, model, optimizer, [3])
    frozen = file_of(step_dir(tmp_path, 1), FROZEN_KEYS)
    assert inode(step_dir(tmp_path, 1) / frozen) != inode(step_dir(tmp_path, 2) / frozen)
    assert inode(step_dir(tmp_path, 2) / frozen) == inode(step_dir(tmp_path, 3) / frozen)
    assert ckpts.verify(tmp_path) == []
    assert_same(restored(tmp_path, 2), saved[2], "step 2")
    assert_same(restored(tmp_path, 3), reused[3], "step 3")
    original = build(SEED)[1].base_weight(2)
    assert not torch.equal(restored(tmp_path, 2)["model.base.2.weight"], original)


def test_a_frozen_tensor_changed_and_changed_back_is_reused(tmp_path: Path) -> None:
    state, model, optimizer = build(SEED)
    weight = model.base_weight(2)
    with ckpts.CheckpointManager(tmp_path) as manager:
        train_and_save(manager, state, model, optimizer, [1])
        before = weight[5, 5].item()
        with torch.no_grad():
            weight[5, 5] = before + 3.0
            weight[5, 5] = before  # the same bits again: the same hash
        saved = train_and_save(manager, state, model, optimizer, [2])
    frozen = file_of(step_dir(tmp_path, 1), FROZEN_KEYS)
    assert inode(step_dir(tmp_path, 1) / frozen) == inode(step_dir(tmp_path, 2) / frozen)
    assert_same(restored(tmp_path, 2), saved[2], "step 2")


# ---------------------------------------------------------------- 7. object stores


class RecordingStorage(ckpts.storage.FsspecStorage):
    """The fsspec backend, recording which files each save sent and which it had the
    store copy (a wrapper around the storage port: no ckpts internals are patched)."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        super().__init__(url, storage_options)
        self.sent: list[tuple[str, str]] = []
        self.copied: list[tuple[str, str]] = []

    def write(self, staged: Staged, files: Sequence[tuple[str, Sequence[memoryview]]]) -> None:
        self.sent += [(staged.name, file) for file, _ in files]
        super().write(staged, files)

    def reuse(self, staged: Staged, source: str, file: str, nbytes: int) -> bool:
        done = super().reuse(staged, source, file, nbytes)
        if done:
            self.copied.append((staged.name, file))
        return done


@pytest.fixture(params=["s3", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    """A run URL on the moto S3 server, or in fsspec's memory filesystem."""
    if request.param == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        yield bucket.url(), bucket.storage_options
    else:
        import fsspec

        url = f"memory://dedup-{uuid.uuid4().hex[:12]}/run"
        yield url, {}
        fsspec.filesystem("memory").rm(url, recursive=True)


def test_on_an_object_store_reuse_is_a_server_side_copy(
        store: tuple[str, dict[str, Any]]) -> None:
    url, options = store
    storage = RecordingStorage(url, options)
    state, model, optimizer = build(SEED)
    with ckpts.CheckpointManager(storage, keep=[ckpts.KeepLast(2)]) as manager:
        saved = train_and_save(manager, state, model, optimizer, [1, 2, 3])
    names = {step: f"step-{step:08d}" for step in (1, 2, 3)}
    index = json.loads(storage.fs.cat_file(f"{url}/{names[3]}/model.safetensors.index.json"))
    frozen = index["weight_map"][FROZEN_KEYS[0]]
    trainable = index["weight_map"][TRAINABLE_KEYS[0]]
    assert (names[1], frozen) in storage.sent
    assert (names[2], frozen) not in storage.sent and (names[3], frozen) not in storage.sent
    assert storage.copied and {file for _, file in storage.copied} <= {frozen, "rng.safetensors"}
    assert {(names[s], frozen) for s in (2, 3)} <= set(storage.copied)
    assert all((names[s], trainable) in storage.sent for s in (1, 2, 3))

    # KeepLast(2) deleted step 1, whose object was copied: the later ones hold their own
    assert [c.step for c in ckpts.CheckpointManager(url, storage_options=options)
            .checkpoints()] == [2, 3]
    assert not storage.fs.exists(f"{url}/{names[1]}/{frozen}")
    assert storage.fs.cat_file(f"{url}/{names[2]}/{frozen}") \
        == storage.fs.cat_file(f"{url}/{names[3]}/{frozen}")
    assert ckpts.verify(url, storage_options=options) == []
    for step in (2, 3):
        assert_same(restored(url, step, storage_options=options), saved[step], f"step {step}")


def test_on_an_object_store_a_source_damaged_at_rest_is_sent_anew_not_copied(
        store: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    """A server-side copy never passes the bytes through ckpts, so the check reads the
    source object back: step 2's base object, damaged in place, is not copied into
    step 3; step 3 sends the base, and steps 4 and 5 copy step 3's."""
    url, options = store
    storage = RecordingStorage(url, options)
    state, model, optimizer = build(SEED)
    names = {step: f"step-{step:08d}" for step in range(1, 6)}
    with caplog.at_level(logging.WARNING, logger="ckpts"), \
            ckpts.CheckpointManager(storage, keep=[ckpts.KeepLast(2)]) as manager:
        saved = train_and_save(manager, state, model, optimizer, [1, 2])
        index = json.loads(storage.fs.cat_file(
            f"{url}/{names[2]}/model.safetensors.index.json"))
        frozen = index["weight_map"][FROZEN_KEYS[0]]
        assert (names[2], frozen) in storage.copied
        damaged = bytearray(storage.fs.cat_file(f"{url}/{names[2]}/{frozen}"))
        damaged[middle_of(damaged, FROZEN_KEYS[0])] ^= 0xFF
        storage.fs.pipe_file(f"{url}/{names[2]}/{frozen}", bytes(damaged))
        for step in (3, 4, 5):
            saved |= train_and_save(manager, state, model, optimizer, [step])
            assert ckpts.verify(f"{url}/{names[step]}", storage_options=options) == [], \
                f"step {step}"
    assert (names[3], frozen) in storage.sent and (names[3], frozen) not in storage.copied
    assert {(names[4], frozen), (names[5], frozen)} <= set(storage.copied)
    assert [c.step for c in ckpts.CheckpointManager(url, storage_options=options)
            .checkpoints()] == [4, 5]
    assert ckpts.verify(url, storage_options=options) == []
    warned = [r.getMessage() for r in caplog.records
              if r.name == "ckpts" and frozen in r.getMessage()]
    assert len(warned) == 1 and names[2] in warned[0] and "ckpts verify" in warned[0], warned
    assert_same(restored(url, 5, storage_options=options), saved[5], "step 5")


# ---------------------------------------------------------------- 8. bad inputs, edge cases


def test_a_v1_checkpoint_as_the_restore_source_is_written_in_full(tmp_path: Path) -> None:
    """Format v1 records no per-tensor hashes, so nothing can be shown equal: the
    next save writes every file, although it holds the very same bytes."""
    sys.path.insert(0, str(DATA))
    try:
        from make_small import build_state  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(DATA))
    run = tmp_path / "run"
    shutil.copytree(DATA / "v1-small", run)
    state = build_state()
    with ckpts.CheckpointManager(run) as manager:
        assert manager.restore(state) == 3
        manager.save(4, state)
    old, new = step_dir(run, 3), step_dir(run, 4)
    assert [f.name for f in tensor_files(old)] == [f.name for f in tensor_files(new)]
    assert all(os.stat(f).st_nlink == 1 for f in tensor_files(new))
    assert ckpts.verify(run) == []
    # the contrast: from the v2 checkpoint just written, the same state is reused
    with ckpts.CheckpointManager(run) as manager:
        assert manager.restore(build_state()) == 4
        manager.save(5, state)
    model_file = "model.safetensors"
    assert inode(step_dir(run, 4) / model_file) == inode(step_dir(run, 5) / model_file)


@pytest.mark.parametrize("gone", ["file", "checkpoint"])
def test_a_source_deleted_by_someone_else_is_written_instead(tmp_path: Path, gone: str) -> None:
    state, model, optimizer = build(SEED)
    with ckpts.CheckpointManager(tmp_path) as manager:
        train_and_save(manager, state, model, optimizer, [1])
        frozen = file_of(step_dir(tmp_path, 1), FROZEN_KEYS)
        if gone == "file":
            (step_dir(tmp_path, 1) / frozen).unlink()
        else:
            shutil.rmtree(step_dir(tmp_path, 1))
        saved = train_and_save(manager, state, model, optimizer, [2])
    assert (step_dir(tmp_path, 2) / frozen).is_file()
    assert os.stat(step_dir(tmp_path, 2) / frozen).st_nlink == 1
    assert ckpts.verify(step_dir(tmp_path, 2)) == []
    assert_same(restored(tmp_path, 2), saved[2], "step 2")


@pytest.mark.parametrize("first", [10, 0])
def test_a_budget_counts_a_file_shared_with_the_previous_checkpoint_once(
        tmp_path: Path, first: int) -> None:
    """KeepWithinBytes measures the run with shared files counted once, before the save
    writes a byte: a save that only adds its adapter and optimizer fits a budget of 1.5
    checkpoints next to a pinned one, whatever the previous checkpoint's step (0 too)."""
    state, model, optimizer = build(SEED)
    train_step(model, optimizer, 1)
    with ckpts.CheckpointManager(tmp_path) as manager:
        manager.save(first, state)
        manager.pin(first)
    one = sum(f.stat().st_size for f in step_dir(tmp_path, first).iterdir())
    budget = ckpts.KeepWithinBytes(one * 3 // 2)
    state, model, optimizer = build(SEED + 1000)
    with ckpts.CheckpointManager(tmp_path, keep=[budget]) as manager:
        assert manager.restore(state) == first
        saved = train_and_save(manager, state, model, optimizer, [first + 1])
    assert [c.step for c in ckpts.CheckpointManager(tmp_path).checkpoints()] \
        == [first, first + 1]
    frozen = file_of(step_dir(tmp_path, first), FROZEN_KEYS)
    assert inode(step_dir(tmp_path, first) / frozen) \
        == inode(step_dir(tmp_path, first + 1) / frozen)
    assert_same(restored(tmp_path, first + 1), saved[first + 1], f"step {first + 1}")

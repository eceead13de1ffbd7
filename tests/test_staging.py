"""Async staging: chunked, reused buffers, prepare(), and snapshots that stay private."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ckpts
from ckpts._checkpoint.staging import Stager
from conftest import TinyNet, train_steps


class Holder:
    """A Stateful whose state_dict is a plain dict of tensors the test controls."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = dict(state)


def many_tensors(count: int = 300) -> dict[str, torch.Tensor]:
    """Small tensors of mixed dtypes, shapes and sizes (0-d and empty ones too)."""
    gen = torch.Generator().manual_seed(count)
    tensors: dict[str, torch.Tensor] = {}
    dtypes = [torch.float32, torch.bfloat16, torch.int8, torch.float64, torch.int64,
              torch.bool, torch.float16, torch.uint8]
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        shape = [(), (0,), (3, 5), (1 + i % 7,), (2, 1 + i % 3, 4)][i % 5]
        values = torch.randn(shape, generator=gen) * 50
        tensors[f"t{i:04d}"] = values.to(dtype)
    return tensors


def staged_tensors(stager: Stager, state: ckpts.TrainState) -> dict[str, torch.Tensor]:
    staged = stager.stage(state.snapshot())
    return {f"{name}.{key}": t for name, snap in staged.items() for key, t in snap.tensors.items()}


def restored_holder(run: Path, like: dict[str, torch.Tensor], step: int | None = None
                    ) -> dict[str, torch.Tensor]:
    holder = Holder({key: torch.zeros_like(t) for key, t in like.items()})
    manager = ckpts.CheckpointManager(run)
    assert manager.restore(ckpts.TrainState(holder=holder), step=step) is not None
    manager.close()
    return holder.tensors


def assert_bit_exact(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        got = actual[key]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), key
        assert torch.equal(got.reshape(-1).view(torch.uint8),
                           tensor.reshape(-1).view(torch.uint8)), key


def test_many_small_tensors_are_staged_in_one_chunk_at_aligned_offsets() -> None:
    state = ckpts.TrainState(holder=Holder(many_tensors(500)))
    stager = Stager()
    staged = staged_tensors(stager, state)
    assert stager.chunk_count == 1 and stager.chunks_allocated == 1
    addresses = [t.data_ptr() for t in staged.values() if t.numel()]
    assert all(address % 64 == 0 for address in addresses)
    assert max(addresses) - min(addresses) < stager.allocated_bytes


def test_staged_copies_are_exact_and_private() -> None:
    tensors = many_tensors()
    tensors["strided"] = torch.arange(60.0).reshape(6, 10)[::2, 1::3]  # not contiguous
    expected = {f"holder.{key}": t.clone() for key, t in tensors.items()}
    state = ckpts.TrainState(holder=Holder(tensors))
    staged = staged_tensors(Stager(), state)
    for tensor in tensors.values():
        if tensor.numel():
            tensor.fill_(1)  # the live state moves on
    staged.pop("rng.torch", None)
    assert_bit_exact({k: v for k, v in staged.items() if k.startswith("holder.")}, expected)
    assert all(t.is_contiguous() for t in staged.values())


def test_a_save_with_the_same_layout_reuses_every_buffer() -> None:
    holder = Holder(many_tensors())
    state = ckpts.TrainState(holder=holder)
    stager = Stager()
    first = staged_tensors(stager, state)
    holder.tensors = {key: t + 1 if t.dtype.is_floating_point else t
                      for key, t in holder.tensors.items()}  # new tensors, same layout
    second = staged_tensors(stager, state)
    assert stager.chunks_allocated == 1
    assert all(second[key] is buffer for key, buffer in first.items())  # not even re-carved
    assert torch.equal(second["holder.t0003"], holder.tensors["t0003"])


def test_a_layout_change_carves_again_and_allocates_only_for_growth() -> None:
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(16)}  # 1 KiB each
    holder = Holder(tensors)
    state = ckpts.TrainState(holder=holder)
    stager = Stager(chunk_bytes=4096)
    staged_tensors(stager, state)
    chunks, allocated = stager.chunk_count, stager.chunks_allocated
    assert chunks >= 4  # 16 KiB of tensors in chunks of at most 4 KiB

    holder.tensors = {**tensors, "t3": torch.full((16, 16), 3.0)}  # same bytes, new shape
    staged = staged_tensors(stager, state)
    assert staged["holder.t3"].shape == (16, 16) and torch.equal(staged["holder.t3"],
                                                                 holder.tensors["t3"])
    assert stager.chunks_allocated == allocated  # re-carved into the chunks it had

    holder.tensors = {**tensors, "t99": torch.full((1024,), 9.0)}  # a key added: +4 KiB
    staged = staged_tensors(stager, state)
    assert torch.equal(staged["holder.t99"], holder.tensors["t99"])
    assert stager.chunks_allocated == allocated + 1

    holder.tensors = {"t0": tensors["t0"].double()}  # keys removed, a dtype changed
    staged = staged_tensors(stager, state)
    assert staged["holder.t0"].dtype == torch.float64 and "holder.t1" not in staged
    assert stager.chunk_count < chunks  # the chunks no longer needed are let go
    assert stager.chunks_allocated == allocated + 1


def test_a_tensor_bigger_than_a_chunk_gets_a_chunk_of_its_own() -> None:
    holder = Holder({"small": torch.ones(8), "big": torch.arange(3000.0), "tail": torch.ones(8)})
    stager = Stager(chunk_bytes=4096)
    staged = staged_tensors(stager, ckpts.TrainState(holder=holder))
    assert torch.equal(staged["holder.big"], holder.tensors["big"])
    assert stager.allocated_bytes >= 12000


def test_prepare_then_save_allocates_nothing_new(tmp_path: Path) -> None:
    holder = Holder(many_tensors())
    state = ckpts.TrainState(holder=holder)
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        manager.prepare(state)
        stager = manager._stager
        assert stager is not None and stager.chunks_allocated == 1
        prepared = stager.allocated_bytes
        manager.prepare(state)  # again, unchanged: nothing to do
        manager.save(1, state)
        manager.save(2, state)
        assert (stager.chunks_allocated, stager.allocated_bytes) == (1, prepared)
    assert_bit_exact(restored_holder(tmp_path, holder.tensors), holder.tensors)


def test_prepare_checks_its_argument(tmp_path: Path) -> None:
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager, \
            pytest.raises(ckpts.InvalidArgumentError, match=r"prepare\(\) needs a ckpts"):
        manager.prepare(TinyNet())  # type: ignore[arg-type]


def test_prepare_refuses_state_that_cannot_be_saved(tmp_path: Path) -> None:
    meta = torch.empty(2, device="meta")
    bad = ckpts.TrainState(holder=Holder({"ok": torch.ones(2), "meta": meta}))
    for async_save in (True, False):
        with ckpts.CheckpointManager(tmp_path, async_save=async_save) as manager, \
                pytest.raises(ckpts.UnserializableStateError, match="'meta'"):
            manager.prepare(bad)
    assert not any(tmp_path.glob("step-*"))


def test_prepare_in_sync_mode_writes_and_allocates_nothing(tmp_path: Path) -> None:
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.prepare(ckpts.TrainState(holder=Holder(many_tensors())))
        assert manager._stager is None
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("step-*"))


def test_a_mutation_after_a_save_with_reused_buffers_is_not_in_the_checkpoint(
        tmp_path: Path) -> None:
    weights = torch.zeros(64, 64)
    holder = Holder({"w": weights})
    state = ckpts.TrainState(holder=holder)
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        manager.prepare(state)
        for step in (1, 2, 3):
            weights.fill_(float(step))
            manager.save(step, state)
            weights.fill_(-1.0)  # the training thread goes on at once
    for step in (1, 2, 3):
        restored = restored_holder(tmp_path, {"w": weights}, step=step)
        assert torch.equal(restored["w"], torch.full((64, 64), float(step)))


def test_async_saves_across_layout_changes_restore_bit_exact(tmp_path: Path) -> None:
    first = many_tensors(40)
    grown = {**first, "t0001": torch.arange(12, dtype=torch.int64).reshape(3, 4),
             "added": torch.randn(33).to(torch.bfloat16)}
    shrunk = {key: t for key, t in first.items() if key < "t0020"}
    holder = Holder(first)
    state = ckpts.TrainState(holder=holder)
    expected = {}
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        for step, tensors in enumerate((first, grown, shrunk, first), start=1):
            holder.tensors = tensors
            manager.save(step, state)
            expected[step] = {key: t.clone() for key, t in tensors.items()}
    for step, tensors in expected.items():
        assert_bit_exact(restored_holder(tmp_path, tensors, step=step), tensors)


def aliases_of(run: Path, step: int, name: str) -> dict[str, str]:
    """The tied aliases recorded for object ``name``: in the index file the manifest names
    for it (format v4), a file the manifest lists."""
    checkpoint = run / f"step-{step:08d}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    index = manifest["objects"][name]["index"]
    assert index in manifest["files"]
    saved = json.loads((checkpoint / index).read_text())["objects"][name]
    return dict(saved["aliases"])


def test_views_sharing_an_address_are_tied_only_when_identical(tmp_path: Path) -> None:
    whole = torch.arange(12.0).reshape(3, 4)
    empty = torch.empty(0)
    tensors = {"whole": whole, "same": whole.view(3, 4), "row": whole[0], "flat": whole.view(12),
               "empty": empty, "other_empty": torch.empty(0), "empty_again": empty}
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        manager.save(1, ckpts.TrainState(holder=Holder(tensors)))
    assert aliases_of(tmp_path, 1, "holder") == {"same": "whole", "empty_again": "empty"}
    restored = restored_holder(tmp_path, tensors)
    assert_bit_exact(restored, {key: t.clone() for key, t in tensors.items()})


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.head = torch.nn.Linear(6, 10, bias=False)


def test_weights_tied_after_the_first_save_are_restored_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    state = ckpts.TrainState(model=model)
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        manager.prepare(state)
        manager.save(1, state)  # untied: two tensors staged
        model.head.weight = model.embed.weight  # tied from now on: one tensor staged
        manager.save(2, state)
        with torch.no_grad():
            model.embed.weight.add_(1.0)
        manager.save(3, state)
    assert [aliases_of(tmp_path, step, "model") for step in (1, 2, 3)] == \
        [{}, {"head.weight": "embed.weight"}, {"head.weight": "embed.weight"}]
    expected = model.embed.weight.detach().clone()
    fresh = Tied()
    fresh.head.weight = fresh.embed.weight
    restorer = ckpts.CheckpointManager(tmp_path)
    assert restorer.restore(ckpts.TrainState(model=fresh)) == 3
    restorer.close()
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, expected)


def test_a_trained_model_and_optimizer_restore_exactly_after_prepared_async_saves(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 1)
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        manager.prepare(state)
        for step in range(1, 4):
            train_steps(model, optimizer, 2)
            manager.save(step, state)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = TinyNet()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restorer = ckpts.CheckpointManager(tmp_path)
    assert restorer.restore(ckpts.TrainState(model=fresh, optimizer=fresh_optimizer)) == 3
    restorer.close()
    assert_bit_exact(fresh.state_dict(), expected)
    for live, saved in zip(fresh_optimizer.state_dict()["state"].values(),
                           optimizer.state_dict()["state"].values(), strict=True):
        assert_bit_exact(live, saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_staged_in_pinned_chunks() -> None:
    holder = Holder({"gpu": torch.randn(1000, device="cuda"), "cpu": torch.randn(10)})
    stager = Stager()
    staged = staged_tensors(stager, ckpts.TrainState(holder=holder))
    assert staged["holder.gpu"].device.type == "cpu" and staged["holder.gpu"].is_pinned()
    assert torch.equal(staged["holder.gpu"], holder.tensors["gpu"].cpu())


class LiveDict:
    """A Stateful whose state_dict() is its own live dict (no copy), like an optimizer's
    per-parameter state."""

    def __init__(self) -> None:
        self.state: dict[str, object] = {"w": torch.ones(4), "inner": {"m": torch.zeros(2)}}

    def state_dict(self) -> dict[str, object]:
        return self.state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.state = state


def test_the_structure_changed_right_after_an_async_save_is_not_in_the_checkpoint(
        tmp_path: Path) -> None:
    live = LiveDict()
    with ckpts.CheckpointManager(tmp_path, async_save=True) as manager:
        manager.save(1, ckpts.TrainState(live=live))
        # the training thread goes on at once: keys come and go, values are replaced
        live.state["added"] = torch.ones(3)
        del live.state["inner"]
        live.state["w"] = torch.full((4,), 7.0)
    fresh = LiveDict()
    restorer = ckpts.CheckpointManager(tmp_path)
    assert restorer.restore(ckpts.TrainState(live=fresh)) == 1
    restorer.close()
    assert sorted(fresh.state) == ["inner", "w"]
    assert torch.equal(fresh.state["w"], torch.ones(4))  # type: ignore[arg-type]


def test_an_odd_chunk_size_and_empty_tensors_stage_exactly() -> None:
    holder = Holder({"a": torch.ones(3, dtype=torch.float64), "b": torch.arange(7),
                     "empty": torch.empty(0, 4)})
    stager = Stager(chunk_bytes=1001)  # not a multiple of any element size
    staged = staged_tensors(stager, ckpts.TrainState(holder=holder))
    assert_bit_exact({k: staged[f"holder.{k}"] for k in holder.tensors}, holder.tensors)
    only_empty = Holder({"e": torch.empty(0), "f": torch.empty(2, 0, dtype=torch.int64)})
    staged = staged_tensors(Stager(), ckpts.TrainState(holder=only_empty))
    assert staged["holder.f"].shape == (2, 0)

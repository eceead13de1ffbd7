"""Tests for ResumableLoader: exact mid-epoch resume of a DataLoader without reloading data."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler

from ckpts._state.data import ResumableLoader
from ckpts.errors import IncompatibleStateError, InvalidArgumentError

N = 22  # with batch_size 4: 6 batches per epoch, the last one holds 2 samples
EPOCHS = 3
MISSING = object()


class Numbers(Dataset[torch.Tensor]):
    """Sample i is ``[i, noise]``, the noise drawn from the global RNG like an augmentation.

    Records which indices were loaded (in this process).
    """

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> torch.Tensor:
        self.loaded.append(index)
        return torch.stack([torch.tensor(float(index)), torch.rand(())])


class Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(N))


MakeLoader = Callable[[Numbers, int], DataLoader[Any]]

LOADERS: dict[str, MakeLoader] = {
    "shuffle": lambda ds, seed: DataLoader(ds, batch_size=4, shuffle=True),
    "loader_generator": lambda ds, seed: DataLoader(
        ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)
    ),
    "sampler_generator": lambda ds, seed: DataLoader(
        ds, batch_size=4, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    ),
    "batch_sampler": lambda ds, seed: DataLoader(
        ds,
        batch_sampler=BatchSampler(
            RandomSampler(ds, generator=torch.Generator().manual_seed(seed)), 4, drop_last=True
        ),
        generator=torch.Generator().manual_seed(seed + 1),
    ),
    "batch_size_none": lambda ds, seed: DataLoader(ds, batch_size=None, shuffle=True),
}

Seen = list[tuple[torch.Tensor, torch.Tensor]]


def train(loader: ResumableLoader, stop_at: tuple[int, int] | None = None) -> Seen:
    """A training loop: each batch is followed by a global-RNG draw (like dropout).

    Returns (batch, draw) pairs; stops right after batch ``stop_at = (epoch, batches_yielded)``.
    """
    seen: Seen = []
    while loader.epoch < EPOCHS:
        for batch in loader:
            seen.append((batch, torch.rand(3)))
            if stop_at == (loader.epoch, loader.batches_yielded):
                return seen
    return seen


def assert_same(actual: Seen, expected: Seen, *, indices_only: bool = False) -> None:
    assert len(actual) == len(expected)
    for (batch, draw), (want_batch, want_draw) in zip(actual, expected, strict=True):
        if indices_only:
            batch, want_batch = batch[..., 0], want_batch[..., 0]
        assert torch.equal(batch, want_batch)
        assert torch.equal(draw, want_draw)


def interrupt_and_resume(
    make: MakeLoader, stop_at: tuple[int, int]
) -> tuple[Seen, Seen, Seen, dict[str, Any]]:
    """The uninterrupted run, then a run stopped at ``stop_at`` and resumed in a fresh loader."""
    torch.manual_seed(0)
    full = train(ResumableLoader(make(Numbers(), 7)))

    torch.manual_seed(0)
    loader = ResumableLoader(make(Numbers(), 7))
    before = train(loader, stop_at)
    state, rng = loader.state_dict(), torch.get_rng_state()

    torch.manual_seed(99)  # a new process: other seeds everywhere
    resumed = ResumableLoader(make(Numbers(), 1234))
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    return full, before, train(resumed), state


@pytest.mark.parametrize("kind", list(LOADERS))
def test_resume_mid_epoch_replays_remaining_batches_and_later_epochs(kind: str) -> None:
    full, before, after, state = interrupt_and_resume(LOADERS[kind], stop_at=(1, 3))

    assert (state["epoch"], state["batches_yielded"]) == (1, 3)
    assert_same(before + after, full)  # batches, augmentation noise and the global RNG stream


@pytest.mark.parametrize("kind", ["shuffle", "loader_generator"])
def test_resume_at_exact_end_of_epoch_yields_nothing_then_next_epoch(kind: str) -> None:
    per_epoch = len(LOADERS[kind](Numbers(), 0))
    # right after the last batch of epoch 1, the epoch already counts as done
    full, before, after, state = interrupt_and_resume(LOADERS[kind], stop_at=(2, 0))

    assert (state["epoch"], state["batches_yielded"]) == (2, 0)
    assert len(before) == 2 * per_epoch
    assert len(after) == per_epoch  # epoch 2 only
    assert_same(before + after, full)


def test_resumable_loader_iterates_like_the_plain_dataloader() -> None:
    torch.manual_seed(0)
    plain = DataLoader(Numbers(), batch_size=4, shuffle=True)
    expected = [(batch, torch.rand(3)) for _ in range(EPOCHS) for batch in plain]

    torch.manual_seed(0)
    assert_same(train(ResumableLoader(DataLoader(Numbers(), batch_size=4, shuffle=True))), expected)


def test_resume_never_loads_skipped_samples() -> None:
    torch.manual_seed(0)
    loader = ResumableLoader(DataLoader(Numbers(), batch_size=4, shuffle=True))
    train(loader, stop_at=(0, 4))
    state = loader.state_dict()

    dataset = Numbers()
    resumed = ResumableLoader(DataLoader(dataset, batch_size=4, shuffle=True))
    resumed.load_state_dict(state)
    rest = list(resumed)

    assert len(rest) == 2
    assert dataset.loaded == torch.cat(rest)[:, 0].long().tolist()
    assert (resumed.epoch, resumed.batches_yielded) == (1, 0)


@pytest.mark.parametrize("persistent", [False, True], ids=["fresh_workers", "persistent_workers"])
def test_resume_with_worker_processes_keeps_index_order(persistent: bool) -> None:
    def make(ds: Numbers, seed: int) -> DataLoader[Any]:
        return DataLoader(
            ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=persistent
        )

    full, before, after, _ = interrupt_and_resume(make, stop_at=(1, 2))

    assert_same(before + after, full, indices_only=True)  # worker noise may differ, order not


def test_state_holds_only_plain_values_and_survives_json_and_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    loader = ResumableLoader(LOADERS["loader_generator"](Numbers(), 7))
    batches = iter(loader)
    next(batches), next(batches)
    state, rng = loader.state_dict(), torch.get_rng_state()
    expected = list(batches)

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if k not in tensors}
    assert set(tensors) == {"torch_rng", "generator_rng", "sampler_generator_rng"}
    assert all(v.dtype == torch.uint8 for v in tensors.values())
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(plain))

    restored = {**json.loads((tmp_path / "state.json").read_text())}
    restored.update(load_file(str(tmp_path / "rng.safetensors")))
    resumed = ResumableLoader(LOADERS["loader_generator"](Numbers(), 1))
    resumed.load_state_dict(restored)
    torch.set_rng_state(rng)

    got = list(resumed)
    assert len(got) == len(expected) == 4
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_len_and_state_before_any_iteration() -> None:
    loader = ResumableLoader(DataLoader(Numbers(), batch_size=4))

    assert len(loader) == 6
    assert loader.state_dict() == {
        "epoch": 0, "batches_yielded": 0,
        "torch_rng": None, "generator_rng": None, "sampler_generator_rng": None,
    }


def test_iterable_dataset_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"IterableDataset.*stateful"):
        ResumableLoader(DataLoader(Stream(), batch_size=4))


def test_out_of_order_loading_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="in_order=True"):
        ResumableLoader(DataLoader(Numbers(), num_workers=1, in_order=False))


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("torch_rng", MISSING, InvalidArgumentError),
        ("epoch", "1", InvalidArgumentError),
        ("batches_yielded", True, InvalidArgumentError),
        ("batches_yielded", -1, InvalidArgumentError),
        ("torch_rng", torch.zeros(3, dtype=torch.uint8), InvalidArgumentError),
        ("torch_rng", [1, 2, 3], InvalidArgumentError),
        ("generator_rng", torch.Generator().get_state(), IncompatibleStateError),
        ("batches_yielded", 7, IncompatibleStateError),
    ],
)
def test_bad_state_raises_naming_the_problem_and_changes_nothing(
    key: str, value: object, error: type[Exception]
) -> None:
    torch.manual_seed(0)
    loader = ResumableLoader(DataLoader(Numbers(), batch_size=4, shuffle=True))
    train(loader, stop_at=(0, 2))
    state = loader.state_dict()
    if value is MISSING:
        del state[key]
    else:
        state[key] = value
    torch.manual_seed(1)
    target = ResumableLoader(DataLoader(Numbers(), batch_size=4, shuffle=True))
    train(target, stop_at=(0, 1))
    before = target.state_dict()

    with pytest.raises(error, match=key):
        target.load_state_dict(state)

    after = target.state_dict()
    assert after.keys() == before.keys()
    for name, value_before in before.items():
        if isinstance(value_before, torch.Tensor):
            assert torch.equal(after[name], value_before)
        else:
            assert after[name] == value_before


def test_a_distributed_sampler_gets_each_epoch_and_a_resumed_epoch_replays_its_order() -> None:
    """ResumableLoader calls DistributedSampler.set_epoch itself: every epoch shuffles
    anew (as a loop that forgot set_epoch would not), and a resume mid-epoch 1 yields
    the rest of epoch 1's own order, then epoch 2's."""
    from torch.utils.data.distributed import DistributedSampler

    data = torch.arange(40.0)

    def loader() -> ResumableLoader:
        sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
        return ResumableLoader(DataLoader(data, batch_size=4, sampler=sampler))

    uninterrupted = loader()
    epochs = [[batch.tolist() for batch in uninterrupted] for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    first = loader()
    seen = [batch.tolist() for batch in first]
    assert seen == epochs[0]
    for step, _ in enumerate(first):
        if step == 1:
            state = first.state_dict()
            break
    resumed = loader()
    resumed.load_state_dict(state)
    assert [batch.tolist() for batch in resumed] == epochs[1][2:]
    assert [batch.tolist() for batch in resumed] == epochs[2]

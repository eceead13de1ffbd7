"""Restoring a module whose every tensor the read filled in place skips torch's
``Module.load_state_dict`` (ckpts._checkpoint.filling.module_filled_in_place: it would
copy each tensor onto itself, with a key scan that grows with modules x keys), and
ends exactly where torch's path would. Anything a ``load_state_dict`` could react to
(load hooks, BatchNorm's own loading, extra state) or a tensor that was not filled in
place takes torch's path, and restores all the same."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpts
from ckpts._checkpoint.filling import module_filled_in_place


@pytest.fixture
def module_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The class names of the modules whose ``Module.load_state_dict`` ran."""
    calls: list[str] = []
    original = torch.nn.Module.load_state_dict

    def spy(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy)
    return calls


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int,
          steps: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in model.state_dict().items()}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def save_and_restore(tmp_path: Path, build: Callable[[], torch.nn.Module], *,
                     seed: int = 1) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Save a trained ``build()`` model, then restore it into another, differently
    trained one; returns that one and the saved model's state."""
    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    train(model, optimizer, seed)
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, ckpts.TrainState(model=model, optimizer=optimizer))
    torch.manual_seed(seed + 100)
    live = build()
    live_optimizer = torch.optim.AdamW(live.parameters(), lr=0.01)
    train(live, live_optimizer, seed + 100)
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.restore(ckpts.TrainState(model=live, optimizer=live_optimizer))
    return live, snapshot(model)


@pytest.mark.parametrize("live_optimizer_state", [True, False])
def test_a_plain_mlp_restores_exactly_without_load_state_dict(
        tmp_path: Path, module_loads: list[str], live_optimizer_state: bool) -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    train(model, optimizer, seed=1, steps=3)
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.save(3, ckpts.TrainState(model=model, optimizer=optimizer))
    saved = snapshot(model)
    train(model, optimizer, seed=99, steps=1)  # the reference's next step
    after_next = snapshot(model)

    torch.manual_seed(5)
    live = mlp()
    live_optimizer = torch.optim.AdamW(live.parameters(), lr=0.5)
    if live_optimizer_state:
        train(live, live_optimizer, seed=7)
    addresses = [p.data_ptr() for p in live.parameters()]
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.restore(ckpts.TrainState(model=live, optimizer=live_optimizer))

    assert module_loads == []  # the fast path, for the module
    assert [p.data_ptr() for p in live.parameters()] == addresses  # filled in place
    assert_same(snapshot(live), saved)
    train(live, live_optimizer, seed=99, steps=1)
    assert_same(snapshot(live), after_next)
    assert live_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def test_non_persistent_buffers_and_non_contiguous_parameters_take_the_fast_path(
        tmp_path: Path, module_loads: list[str]) -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(6, 6).t())  # not contiguous
            self.register_buffer("scale", torch.randn(6))
            self.register_buffer("cache", torch.full((3,), 7.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.scale) @ self.weight

    live, saved = save_and_restore(tmp_path, lambda: torch.nn.Sequential(Odd(), Odd()))
    assert module_loads == []
    assert not live[0].weight.is_contiguous()
    assert_same(snapshot(live), saved)
    assert torch.equal(live[1].cache, torch.full((3,), 7.0))


def test_a_load_state_dict_post_hook_runs(tmp_path: Path, module_loads: list[str]) -> None:
    hooked: list[Any] = []

    def build() -> torch.nn.Module:
        model = mlp()
        model[2].register_load_state_dict_post_hook(
            lambda module, keys: hooked.append((module, list(keys.missing_keys))))
        return model

    live, saved = save_and_restore(tmp_path, build)
    assert module_loads == ["Sequential"]
    assert hooked == [(live[2], [])]
    assert_same(snapshot(live), saved)


def test_a_load_state_dict_pre_hook_runs(tmp_path: Path, module_loads: list[str]) -> None:
    prefixes: list[str] = []

    def build() -> torch.nn.Module:
        model = mlp()
        model[0].register_load_state_dict_pre_hook(
            lambda module, state_dict, prefix, *rest: prefixes.append(prefix))
        return model

    live, saved = save_and_restore(tmp_path, build)
    assert module_loads == ["Sequential"]
    assert prefixes == ["0."]
    assert_same(snapshot(live), saved)


def test_batch_norm_takes_torchs_path_and_restores_its_counter(
        tmp_path: Path, module_loads: list[str]) -> None:
    def build() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5),
                                   torch.nn.Linear(5, 3))

    live, saved = save_and_restore(tmp_path, build)
    assert module_loads == ["Sequential"]
    assert int(saved["1.num_batches_tracked"]) == 2
    assert_same(snapshot(live), saved)


def test_extra_state_is_handed_to_set_extra_state(tmp_path: Path,
                                                  module_loads: list[str]) -> None:
    class Counted(torch.nn.Linear):
        def __init__(self) -> None:
            super().__init__(6, 3)
            self.count = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return super().forward(x)

        def get_extra_state(self) -> Any:
            return {"count": self.count}

        def set_extra_state(self, state: Any) -> None:
            handed.append(state)
            self.count = state["count"]

    handed: list[Any] = []
    live, saved = save_and_restore(tmp_path, Counted)
    assert module_loads == ["Counted"]
    assert saved["_extra_state"] == {"count": 2}
    assert handed == [{"count": 2}] and live.count == 2
    assert_same(snapshot(live), saved)


def test_a_state_dict_in_other_dtype_or_memory_is_copied_in(
        tmp_path: Path, module_loads: list[str]) -> None:
    def build() -> torch.nn.Module:  # its state_dict() gives float64 copies
        model = mlp()
        def to_float64(module: Any, state_dict: Any, prefix: str, meta: Any) -> None:
            state_dict.update({k: v.double() for k, v in state_dict.items()})

        model.register_state_dict_post_hook(to_float64)
        return model

    live, saved = save_and_restore(tmp_path, build)
    assert module_loads == ["Sequential"]
    assert all(v.dtype == torch.float64 for v in saved.values())
    assert all(p.dtype == torch.float32 for p in live.parameters())
    assert_same(snapshot(live), saved)


def test_a_module_whose_state_dict_clones_is_copied_in(tmp_path: Path,
                                                       module_loads: list[str]) -> None:
    class Cloning(torch.nn.Sequential):
        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return {k: v.clone() for k, v in super().state_dict(*args, **kwargs).items()}

    def build() -> torch.nn.Module:
        return Cloning(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    live, saved = save_and_restore(tmp_path, build)
    assert module_loads == ["Cloning"]
    assert_same(snapshot(live), saved)


def tied_twice() -> torch.nn.Module:
    first = torch.nn.Linear(6, 6)
    second = torch.nn.Linear(6, 6)
    second.weight = first.weight  # two modules, one weight
    return torch.nn.Sequential(first, torch.nn.ReLU(), second, torch.nn.ReLU(),
                               torch.nn.Linear(6, 3))


def test_tied_weights_restore_still_tied(tmp_path: Path, module_loads: list[str]) -> None:
    live, saved = save_and_restore(tmp_path, tied_twice)
    assert live[0].weight is live[2].weight
    assert module_loads == []  # both keys were the one filled tensor
    assert_same(snapshot(live), saved)


def test_tied_weights_saved_restore_into_untied_ones(tmp_path: Path,
                                                     module_loads: list[str]) -> None:
    torch.manual_seed(0)
    model = tied_twice()
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, ckpts.TrainState(model=model))
    live = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6),
                               torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.restore(ckpts.TrainState(model=live))
    assert module_loads == ["Sequential"]  # "2.weight" was not filled in place
    assert live[0].weight is not live[2].weight
    assert_same(snapshot(live), snapshot(model))


def test_the_check_itself() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    plain = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    state = plain.state_dict()
    assert module_filled_in_place(plain, state)
    assert module_filled_in_place(plain, plain.state_dict(keep_vars=True))
    assert not module_filled_in_place(model, model.state_dict())  # BatchNorm
    assert not module_filled_in_place(plain, {**state, "extra": state["0.bias"]})
    assert not module_filled_in_place(plain, {k: v for k, v in state.items() if k != "1.bias"})
    assert not module_filled_in_place(plain, {**state, "1.bias": state["1.bias"].clone()})
    assert not module_filled_in_place(plain, {**state, "0.weight": state["0.weight"][:1]})
    assert not module_filled_in_place(plain, {**state, "1.bias": state["0.bias"]})
    assert not module_filled_in_place(plain, {**state, "0.weight": state["0.weight"].view(3, 2)})
    assert not module_filled_in_place(plain, {**state, "1.bias": state["1.bias"].view(
        torch.int32)})
    assert not module_filled_in_place(torch.optim.SGD(plain.parameters(), lr=0.1), state)
    complex_layer = torch.nn.Linear(2, 2, dtype=torch.complex64)
    complex_state = complex_layer.state_dict()
    assert module_filled_in_place(complex_layer, complex_state)
    assert not module_filled_in_place(complex_layer, {  # copying it in would conjugate
        **complex_state, "weight": complex_state["weight"].conj()})
    assert not module_filled_in_place(plain, list(state.values()))
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        assert not module_filled_in_place(plain, state)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)

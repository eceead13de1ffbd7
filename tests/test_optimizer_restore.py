"""Restoring an optimizer whose state tensors were filled in place skips torch's
second copy of them (ckpts._checkpoint.filling.optimizer_filled_in_place), and ends exactly
where torch's own ``load_state_dict`` would: same state, same parameter groups, same
next step. Anything unusual (an empty state, load hooks, a class with its own
``load_state_dict``) goes through torch's path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpts

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.02, amsgrad=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01, centered=True),
}


def trained(kind: str, seed: int, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    optimizer = OPTIMIZERS[kind](model.parameters())
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        step(model, optimizer, generator)
    return model, optimizer


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator) -> None:
    model(torch.randn(4, 6, generator=generator)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def flat(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.clone() for i, entry in state["state"].items()
               for k, v in entry.items() if isinstance(v, torch.Tensor)}
    return {"tensors": tensors, "groups": [{k: v for k, v in g.items() if k != "params"}
                                           for g in state["param_groups"]]}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["groups"] == b["groups"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key, tensor in a["tensors"].items():
        assert torch.equal(tensor, b["tensors"][key]), key


def saved_run(tmp_path: Path, kind: str) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    model, optimizer = trained(kind, seed=1, steps=3)
    run = tmp_path / "run"
    with ckpts.CheckpointManager(run) as manager:
        manager.save(3, ckpts.TrainState(model=model, optimizer=optimizer))
    step(model, optimizer, torch.Generator().manual_seed(99))  # the reference's next step
    return run, flat(optimizer), {k: v.clone() for k, v in model.state_dict().items()}


def restore(run: Path, kind: str, *, live_state: bool, hook: bool = False
            ) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[int]]:
    model, optimizer = trained(kind, seed=2, steps=2 if live_state else 0)
    for group in optimizer.param_groups:
        group["lr"] = 123.0  # the checkpoint's groups must come back
    calls: list[int] = []
    if hook:
        optimizer.register_load_state_dict_post_hook(lambda opt: calls.append(1))
    with ckpts.CheckpointManager(run) as manager:
        manager.restore(ckpts.TrainState(model=model, optimizer=optimizer))
    return model, optimizer, calls


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("path", ["in place", "torch hook", "fresh optimizer"])
def test_a_restored_optimizer_takes_the_same_next_step_as_the_saved_one(
        tmp_path: Path, kind: str, path: str) -> None:
    run, after_next_step, model_after = saved_run(tmp_path, kind)
    model, optimizer, calls = restore(run, kind, live_state=path != "fresh optimizer",
                                      hook=path == "torch hook")
    assert optimizer.param_groups[0]["lr"] != 123.0
    assert calls == ([1] if path == "torch hook" else [])
    step(model, optimizer, torch.Generator().manual_seed(99))
    assert_same(flat(optimizer), after_next_step)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, model_after[key]), key


def test_an_optimizer_class_with_its_own_load_state_dict_gets_it_called(tmp_path: Path) -> None:
    run, _, _ = saved_run(tmp_path, "adamw")
    seen: list[dict[str, Any]] = []

    class Recording(torch.optim.AdamW):
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            seen.append(state_dict)
            super().load_state_dict(state_dict)

    model, _ = trained("adamw", seed=2, steps=0)
    optimizer = Recording(model.parameters(), lr=0.01, weight_decay=0.1)
    step(model, optimizer, torch.Generator().manual_seed(5))
    with ckpts.CheckpointManager(run) as manager:
        manager.restore(ckpts.TrainState(model=model, optimizer=optimizer))
    assert len(seen) == 1

"""Save, change, restore: every supported object comes back exactly."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import ckpts
from conftest import TinyNet, assert_state_dicts_equal, train_steps

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_round_trip_continues_identically(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    train_steps(model, optimizer, 3)
    scheduler.step()
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(3, ckpts.TrainState(model=model, optimizer=optimizer, scheduler=scheduler))
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # state_dict() is live
    train_steps(model, optimizer, 2)  # the original goes on...
    scheduler.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # a fresh process would start with other weights
    model2 = TinyNet()
    optimizer2 = OPTIMIZERS[name](list(model2.parameters()))
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 1.0 / (1 + s))
    assert manager.restore(ckpts.TrainState(model=model2, optimizer=optimizer2,
                                            scheduler=scheduler2)) == 3
    assert_state_dicts_equal(optimizer2.state_dict(), saved_optimizer)
    train_steps(model2, optimizer2, 2)  # ...and the restored copy follows it exactly
    scheduler2.step()
    assert_state_dicts_equal(model2.state_dict(), expected)
    assert scheduler2.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_restore_into_a_trained_optimizer_overwrites_its_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters())
    train_steps(model, optimizer, 2)
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(2, ckpts.TrainState(model=model, optimizer=optimizer))
    snapshot = copy.deepcopy(optimizer.state_dict()["state"])
    train_steps(model, optimizer, 3)
    manager.restore(ckpts.TrainState(model=model, optimizer=optimizer))
    assert_state_dicts_equal(optimizer.state_dict()["state"], snapshot)


def test_grad_scaler_round_trip(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler._scale = torch.tensor(256.0)  # as after a few overflow backoffs
    scaler._growth_tracker = torch.tensor(5, dtype=torch.int32)
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(scaler=scaler))
    fresh = torch.amp.GradScaler("cpu")
    manager.restore(ckpts.TrainState(scaler=fresh))
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.state_dict()["scale"] == 256.0 and fresh.state_dict()["_growth_tracker"] == 5


def test_rng_states_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(model=torch.nn.Linear(1, 1)))
    expected = (random.random(), np.random.standard_normal(3), np.random.rand(2), torch.rand(4))

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    manager.restore(ckpts.TrainState(model=torch.nn.Linear(1, 1)))
    got = (random.random(), np.random.standard_normal(3), np.random.rand(2), torch.rand(4))
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1]) and np.array_equal(got[2], expected[2])
    assert torch.equal(got[3], expected[3])


def test_users_own_stateful_class_round_trips(tmp_path: Path) -> None:
    class Counter:
        def __init__(self) -> None:
            self.seen = 0
            self.history: list[float] = []

        def state_dict(self) -> dict[str, object]:
            return {"seen": self.seen, "history": list(self.history)}

        def load_state_dict(self, state: dict[str, object]) -> None:
            self.seen = state["seen"]  # type: ignore[assignment]
            self.history = state["history"]  # type: ignore[assignment]

    counter = Counter()
    counter.seen, counter.history = 41, [0.5, 0.25]
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(counter=counter))
    fresh = Counter()
    manager.restore(ckpts.TrainState(counter=fresh))
    assert (fresh.seen, fresh.history) == (41, [0.5, 0.25])

"""No pickle anywhere: every unpickling entry point raises, and every operation still works.

``pickle.load``/``loads``/``Unpickler`` (and their ``_pickle`` originals),
``torch.load`` and ``numpy.load`` are replaced by functions that record the call
and raise. Saving (sync and async), listing, restoring, ``load_weights``,
``verify`` and the ``ckpts ls``/``best``/``verify`` commands then run on a state
with a model, an optimizer, a scheduler, a resumable loader and the RNGs; none
may touch them, and no file written may be a pickle.
"""

from __future__ import annotations

import _pickle
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ckpts
from ckpts.cli import app
from conftest import TinyNet, assert_state_dicts_equal, train_steps

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
UNPICKLERS = [
    (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
    (_pickle, "load"), (_pickle, "loads"), (_pickle, "Unpickler"),
    (torch, "load"), (torch.serialization, "load"), (np, "load"),
]


@pytest.fixture
def unpickling_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every unpickling entry point raise; returns the names of those called."""
    calls: list[str] = []

    def refusing(name: str, original: Any) -> Any:
        def refuse(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} was called: ckpts must never unpickle")

        if isinstance(original, type):  # stays subclassable (torch._dynamo subclasses it)
            return type(original.__name__, (original,), {"__init__": refuse})
        return refuse

    for module, name in UNPICKLERS:
        monkeypatch.setattr(module, name,
                            refusing(f"{module.__name__}.{name}", getattr(module, name)))
    return calls


def build() -> tuple[ckpts.TrainState, TinyNet]:
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    data = torch.utils.data.TensorDataset(torch.arange(40.0).reshape(10, 4))
    loader = ckpts.ResumableLoader(torch.utils.data.DataLoader(data, batch_size=2, shuffle=True))
    state = ckpts.TrainState(model=model, optimizer=optimizer, scheduler=scheduler,
                             loader=loader)
    return state, model


def advance(state: ckpts.TrainState, model: TinyNet, steps: int) -> None:
    optimizer = state.objects["optimizer"]
    scheduler = state.objects["scheduler"]
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    train_steps(model, optimizer, steps)
    for _ in range(steps):
        scheduler.step()
    batches = iter(state.objects["loader"])  # type: ignore[call-overload]
    next(batches)  # one batch into the epoch


def not_a_pickle(path: Path) -> None:
    """A file is JSON, or a safetensors file (8-byte length, JSON header): never a pickle.

    Pickles of protocol 2 and up start with ``\\x80``. A safetensors file starts with
    its header length, whose low byte may happen to be 0x80, so such a file must
    prove it is safetensors: its length and JSON header account for the whole prefix.
    """
    data = path.read_bytes()
    assert not data.startswith(b"PK\x03\x04"), f"{path} is a zip (torch.save's format)"
    if path.suffix == ".safetensors":
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        assert isinstance(header, dict), path
        ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
        assert 8 + length + max(ends, default=0) == len(data), path
    elif path.suffix == ".jsonl":  # the run's metrics history: one JSON object a line
        for line in data.splitlines():
            json.loads(line)
    else:
        assert not data.startswith(b"\x80"), f"{path} starts like a pickle"
        json.loads(data)


def test_every_operation_works_with_unpickling_forbidden(
    tmp_path: Path, unpickling_calls: list[str]
) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    state, model = build()
    advance(state, model, 3)
    ckpts.CheckpointManager(run).save(3, state, metrics={"loss": 0.5}, epoch=0)
    advance(state, model, 2)
    with ckpts.CheckpointManager(run, async_save=True) as manager:
        manager.save(5, state, metrics={"loss": 0.25}, epoch=0)
    expected = {name: obj.state_dict() for name, obj in state.objects.items() if name != "rng"}

    assert [c.step for c in ckpts.CheckpointManager(run).checkpoints()] == [3, 5]
    assert ckpts.verify(run) == []
    restored, _ = build()
    assert ckpts.CheckpointManager(run).restore(restored) == 5
    for name, value in expected.items():
        assert_state_dicts_equal(restored.objects[name].state_dict(), value)
    fresh = TinyNet()
    ckpts.load_weights(run / "step-00000005", fresh)
    assert_state_dicts_equal(fresh.state_dict(), model.state_dict())

    runner = CliRunner()
    for command in (["ls", str(run)], ["ls", str(run), "--json"],
                    ["best", str(run), "--metric", "loss"], ["verify", str(run)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.output, result.exception)
    assert "step-00000005" in runner.invoke(app, ["best", str(run), "--metric", "loss"]).output

    assert unpickling_calls == []
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"manifest.json", "model.safetensors",
                                       "optimizer.safetensors", "rng.safetensors"}
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    for path in files:
        not_a_pickle(path)


def test_the_forbidding_fixture_catches_an_unpickling_call(
    tmp_path: Path, unpickling_calls: list[str]
) -> None:
    """The guard above can fail: torch.load of a torch.save'd file is caught."""
    with pytest.raises(AssertionError, match="never unpickle"):
        torch.load(tmp_path / "x.pt", weights_only=False)
    with pytest.raises(AssertionError, match="never unpickle"):
        pickle.loads(b"\x80\x04N.")
    with open(tmp_path / "y.pkl", "wb+") as f, \
            pytest.raises(AssertionError, match="never unpickle"):
        _pickle.Unpickler(f)
    assert unpickling_calls == ["torch.load", "pickle.loads", "_pickle.Unpickler"]

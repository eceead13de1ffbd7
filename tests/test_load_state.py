"""load_state: one object's saved state as plain data, without building the object."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpts
from conftest import assert_state_dicts_equal


class Config:
    """A Stateful of plain values, like the model_args a sampling script needs."""

    def __init__(self, **values: Any) -> None:
        self.values = values

    def state_dict(self) -> dict[str, Any]:
        return self.values

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = state


def test_plain_values_come_back_as_saved_types_included(tmp_path: Path) -> None:
    config = Config(model_args={"n_layer": 2, "dims": (64, 128), "dropout": None},
                    by_index={0: "a", 3: "b"}, best=math.inf)
    checkpoint = ckpts.CheckpointManager(tmp_path).save(
        7, ckpts.TrainState(config=config, model=torch.nn.Linear(2, 2)))
    state = ckpts.load_state(checkpoint, "config")
    assert state == config.values
    assert type(state["model_args"]["dims"]) is tuple
    assert list(state["by_index"]) == [0, 3]


def test_tensors_are_read_hash_checked_and_equal(tmp_path: Path, tiny_state) -> None:
    state, model, optimizer = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    assert_state_dicts_equal(ckpts.load_state(checkpoint.path, "model"), model.state_dict())
    saved = ckpts.load_state(str(checkpoint.path), "optimizer")
    assert saved["param_groups"] == optimizer.state_dict()["param_groups"]
    for index, slots in optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            assert torch.equal(saved["state"][index][slot], value)
            assert saved["state"][index][slot].device.type == "cpu"


def test_tensors_false_gives_meta_placeholders_without_opening_files(tmp_path: Path,
                                                                     tiny_state) -> None:
    state, model, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    (checkpoint.path / "model.safetensors").write_bytes(b"gone")  # never read
    placeholders = ckpts.load_state(checkpoint, "model", tensors=False)
    for key, value in model.state_dict().items():
        assert placeholders[key].device.type == "meta"
        assert placeholders[key].dtype == value.dtype and placeholders[key].shape == value.shape
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"model\.safetensors"):
        ckpts.load_state(checkpoint, "model")


def test_tied_weights_come_back_as_one_tensor_under_both_keys(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, ckpts.TrainState(model=model))
    state = ckpts.load_state(checkpoint, "model")
    assert state["1.weight"] is state["0.weight"]
    assert torch.equal(state["0.weight"], model[0].weight)


def test_missing_name_lists_the_objects_of_the_checkpoint(tmp_path: Path, tiny_state) -> None:
    state, _, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    with pytest.raises(ckpts.NotACheckpointError,
                       match=r"no object named 'modle'.*\['model', 'optimizer', 'rng'\]"):
        ckpts.load_state(checkpoint, "modle")


def test_a_path_without_a_manifest_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ckpts.NotACheckpointError, match=r"no manifest\.json"):
        ckpts.load_state(tmp_path, "model")


def test_rng_state_can_be_read_as_plain_data(tmp_path: Path) -> None:
    model = torch.nn.Linear(1, 1)
    torch.manual_seed(3)
    expected = torch.get_rng_state()
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, ckpts.TrainState(model=model))
    assert torch.equal(ckpts.load_state(checkpoint, "rng")["torch"], expected)

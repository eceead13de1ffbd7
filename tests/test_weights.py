"""load_weights: a module's tensors for inference, and not one byte of optimizer state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ckpts
from conftest import TinyNet
from faulty_storage import FaultyStorage


def test_load_weights_copies_into_the_live_parameters(tmp_path: Path, tiny_state) -> None:
    state, model, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    fresh = TinyNet()
    weight = fresh.fc1.weight
    ckpts.load_weights(checkpoint, fresh)
    assert fresh.fc1.weight is weight
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_load_weights_reads_no_optimizer_file(tmp_path: Path, tiny_state) -> None:
    state, _, _ = tiny_state
    storage = FaultyStorage(tmp_path)
    checkpoint = ckpts.CheckpointManager(storage).save(1, state)
    storage.files_read.clear()
    ckpts.load_weights(checkpoint, TinyNet())
    assert "model.safetensors" in storage.files_read
    assert not any("optimizer" in name or "rng" in name for name in storage.files_read)


def test_load_weights_non_strict_skips_missing_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, ckpts.TrainState(model=model))
    bigger = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    untouched = bigger[1].weight.clone()
    with pytest.raises(ckpts.IncompatibleStateError, match=r"1\.weight"):
        ckpts.load_weights(checkpoint, bigger)
    ckpts.load_weights(checkpoint, bigger, strict=False)
    assert torch.equal(bigger[0].weight, model[0].weight)
    assert torch.equal(bigger[1].weight, untouched)


def test_a_tensor_failing_its_hash_leaves_the_model_untouched(tmp_path: Path,
                                                               tiny_state) -> None:
    state, _, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    path = Path(checkpoint.path) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last tensor's last byte
    path.write_bytes(bytes(data))
    fresh = TinyNet()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"model\.safetensors: tensor"):
        ckpts.load_weights(checkpoint, fresh)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_failed_hash_names_the_tensor_and_copies_none_of_many(tmp_path: Path) -> None:
    # many small tensors: the copies into the model happen only after every hash passed
    torch.manual_seed(0)
    saved = torch.nn.ParameterDict({f"t{i:03d}": torch.nn.Parameter(torch.randn(7))
                                    for i in range(300)})
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, ckpts.TrainState(model=saved))
    index = json.loads((Path(checkpoint.path) / "model.index.json").read_text())
    begin, _ = index["objects"]["model"]["tensors"]["t150"]["offsets"]
    path = Path(checkpoint.path) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[begin] ^= 0x01  # one byte of a tensor in the middle
    path.write_bytes(bytes(data))
    fresh = torch.nn.ParameterDict({f"t{i:03d}": torch.nn.Parameter(torch.zeros(7))
                                    for i in range(300)})
    with pytest.raises(ckpts.CorruptCheckpointError,
                       match=r"model\.safetensors: tensor 't150' of 'model': content hash"):
        ckpts.load_weights(checkpoint, fresh)
    assert all(torch.equal(value, torch.zeros(7)) for value in fresh.values())

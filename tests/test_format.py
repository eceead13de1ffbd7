"""Format v1: standard safetensors files, manifest, sharding, tied tensors, typed JSON."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckpts
from ckpts._format.manifest import FORMAT_VERSION


class Holder:
    """A user's own Stateful class carrying arbitrary values."""

    def __init__(self, value: object) -> None:
        self.value = value

    def state_dict(self) -> dict[str, object]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.value = state["value"]


def test_files_are_plain_safetensors_and_no_pickle(tmp_path: Path, tiny_state) -> None:
    state, model, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(7, state)
    names = sorted(p.name for p in checkpoint.path.iterdir())
    # format v4: each object's tensors in safetensors, its tree and tensor entries in JSON
    assert names == ["manifest.json", "model.index.json", "model.safetensors",
                     "optimizer.index.json", "optimizer.safetensors", "rng.index.json",
                     "rng.safetensors"]
    assert checkpoint.path.name == "step-00000007"
    assert not [p for p in tmp_path.rglob("*") if p.suffix in {".pt", ".pth", ".bin", ".pkl"}]
    for name in names:
        if name.endswith(".json"):  # plain JSON, all of it
            assert isinstance(json.loads((checkpoint.path / name).read_bytes()), dict), name
    with safe_open(str(checkpoint.path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        for key, value in model.state_dict().items():
            assert torch.equal(f.get_tensor(key), value)
    with safe_open(str(checkpoint.path / "optimizer.safetensors"), framework="pt") as f:
        assert "state.0.exp_avg" in f.keys()


def test_manifest_records_every_file_with_size_and_hash(tmp_path: Path, tiny_state) -> None:
    state, _, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state, metrics={"loss": 0.5}, epoch=2)
    manifest = json.loads((checkpoint.path / "manifest.json").read_text())
    assert manifest["format"] == "ckpts"
    assert manifest["format_version"] == FORMAT_VERSION
    assert (manifest["step"], manifest["epoch"], manifest["metrics"]) == (1, 2, {"loss": 0.5})
    assert manifest["versions"]["torch"] == torch.__version__
    on_disk = {p.name: p.stat().st_size for p in checkpoint.path.iterdir()}
    del on_disk["manifest.json"]
    assert {n: r["nbytes"] for n, r in manifest["files"].items()} == on_disk
    assert all(r["hash"].startswith("xxh3_128:") for r in manifest["files"].values())
    assert checkpoint.nbytes == sum(p.stat().st_size for p in checkpoint.path.iterdir())


def test_shard_size_splits_files_with_a_hf_index(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    manager = ckpts.CheckpointManager(tmp_path, max_shard_size=20_000)
    checkpoint = manager.save(1, ckpts.TrainState(model=model))
    shards = sorted(p.name for p in checkpoint.path.glob("model-*.safetensors"))
    assert len(shards) == 4
    assert shards[0] == "model-00001-of-00004.safetensors"
    index = json.loads((checkpoint.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(checkpoint.path / shard))
    assert merged.keys() == model.state_dict().keys()
    fresh = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    ckpts.load_weights(checkpoint, fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_sharded_model_files_load_with_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    checkpoint = ckpts.CheckpointManager(tmp_path / "run", max_shard_size=20_000).save(
        1, ckpts.TrainState(model=model))
    shards = sorted(checkpoint.path.glob("model-*.safetensors"))
    assert len(shards) > 2
    hf_dir = tmp_path / "hf"
    config.save_pretrained(hf_dir)
    for path in [*shards, checkpoint.path / "model.safetensors.index.json"]:
        shutil.copy(path, hf_dir)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, ckpts.TrainState(model=model))
    with safe_open(str(checkpoint.path / "model.safetensors"), framework="pt") as f:
        assert "transformer.wte.weight" in f.keys()
        assert "lm_head.weight" not in f.keys()
    torch.manual_seed(1)
    fresh = transformers.GPT2LMHeadModel(config)
    ckpts.CheckpointManager(tmp_path).restore(ckpts.TrainState(model=fresh))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    # the weights file is what from_pretrained expects, as it is
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)  # config.json and generation_config.json
    (hf_dir / "model.safetensors").unlink()
    shutil.copy(checkpoint.path / "model.safetensors", hf_dir)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize(
    "value",
    [
        None, True, 0, -3, 2**62, 1.5, "text", "__dunder", [], (), {},
        (1, (2, 3), [4]), {1: "a", 2: "b"}, {(1, 2): None, "x": 1}, {"__tuple__": 1},
        [math.inf, -math.inf], {"nested": {"deep": [None, False, 1e-300]}},
    ],
)
def test_json_values_round_trip_exactly(tmp_path: Path, value: object) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(holder=Holder(value)))
    restored = Holder("something else")
    manager.restore(ckpts.TrainState(holder=restored))
    assert restored.value == value
    assert repr(restored.value) == repr(value)  # types too: tuple stays tuple, int keys stay int


def test_nan_round_trips(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(holder=Holder((math.nan, 1.0))))
    restored = Holder(None)
    manager.restore(ckpts.TrainState(holder=restored))
    assert isinstance(restored.value, tuple)
    assert math.isnan(restored.value[0]) and restored.value[1] == 1.0


def test_dtypes_and_shapes_round_trip(tmp_path: Path) -> None:
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64), "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(1, 3).half(), "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4), "u8": torch.arange(7, dtype=torch.uint8),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(holder=Holder(tensors)))
    restored = Holder(None)
    manager.restore(ckpts.TrainState(holder=restored))
    assert isinstance(restored.value, dict)
    for key, tensor in tensors.items():
        got = restored.value[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert torch.equal(got, tensor), key

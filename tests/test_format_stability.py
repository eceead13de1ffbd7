"""Every format version stays readable, and the current one byte-identical: committed
fixtures pin them.

``tests/data/v1-small/`` (format v1) and ``tests/data/v2-small/`` (format v2) were
each written once by ``tests/data/make_small.py`` and are committed; they hold the
same state, and their safetensors files are the same bytes (v2 changed only the
manifest). These tests check that the current code still reads both exactly, that
plain ``safetensors`` reads their files, that their bytes are the pinned ones, and
that saving the same state today writes the v2 bytes (the manifest aside from its
creation time and library versions). A failure here means the on-disk format
changed: that needs a new format version and a new fixture, not a regenerated one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors import safe_open

import ckpts

DATA = Path(__file__).with_name("data")
TENSOR_FILES_SHA256 = {
    "model.safetensors": "e689903c2593f37cd5a35c3163f677009e4ad3caa1612bcb966c5b8b91007dbe",
    "optimizer.safetensors": "dff099461d69262ebf351ed5e79f06308e283efbbab326fba59ed27f022de81d",
    "rng.safetensors": "4e5916d454dcfd7d14f325abf59066175cc4752afbc9caca2ab3d300ea58620e",
}
MANIFEST_SHA256 = {
    1: "0786da642a48031f33ea3f28bff3a14412c2268738690e613b39a4c5e1a6307e",
    2: "88ecb943c7007eeb055858cbce9cca748b4148f89347df09362b257448e4adc1",
}
CURRENT = max(MANIFEST_SHA256)
VERSIONS = pytest.mark.parametrize("version", sorted(MANIFEST_SHA256))


def run_of(version: int) -> Path:
    return DATA / f"v{version}-small"


def checkpoint_of(version: int) -> Path:
    return run_of(version) / "step-00000003"


# What make_small.py's state holds after its one SGD step, written out by hand.
MODEL = {
    "scale": torch.tensor([1.25, -2.125], dtype=torch.bfloat16),
    "counts": torch.tensor([0, 1, -1, 2**40], dtype=torch.int64),
    "linear.weight": torch.tensor([[-0.625, -0.375, -0.125], [0.125, 0.375, 0.625]]),
    "linear.bias": torch.tensor([-0.25, -0.5]),
}
MOMENTUM = {  # optimizer parameter index -> momentum buffer (the first step's gradient)
    0: torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
    1: torch.full((2, 3), 0.25),
    2: torch.tensor([1.0, -0.5]),
}
PARAM_GROUP = {"lr": 0.5, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
               "nesterov": False, "maximize": False, "params": [0, 1, 2]}


def load_maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_small", DATA / "make_small.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_objects() -> tuple[torch.nn.Module, torch.optim.SGD]:
    """Objects of the fixture's classes holding other values (zeros, another lr)."""
    model = load_maker().SmallNet()
    torch.nn.init.zeros_(model.linear.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    return model, optimizer


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
    assert torch.equal(actual, expected), f"{key}: {actual} != {expected}"


@VERSIONS
def test_the_fixture_files_hash_to_the_pinned_values(version: int) -> None:
    assert sorted(p.name for p in run_of(version).iterdir()) == ["step-00000003"]
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in checkpoint_of(version).iterdir()}
    assert found == {**TENSOR_FILES_SHA256, "manifest.json": MANIFEST_SHA256[version]}
    manifest = json.loads((checkpoint_of(version) / "manifest.json").read_bytes())
    assert manifest["format_version"] == version


@VERSIONS
def test_the_fixture_verifies_and_lists(version: int) -> None:
    assert ckpts.verify(run_of(version)) == []
    assert ckpts.verify(checkpoint_of(version)) == []
    (checkpoint,) = ckpts.CheckpointManager(run_of(version)).checkpoints()
    assert (checkpoint.step, checkpoint.epoch, checkpoint.tags) == (3, 1, ())
    assert checkpoint.metrics == {"loss": 0.125, "accuracy": 0.75}
    assert checkpoint.nbytes == sum(p.stat().st_size for p in checkpoint_of(version).iterdir())


@VERSIONS
def test_the_fixture_restores_the_exact_values_into_fresh_objects(version: int,
                                                                  tmp_path: Path) -> None:
    model, optimizer = fresh_objects()
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    random.seed(1)  # every RNG elsewhere than where the fixture left it
    np.random.seed(1)
    torch.manual_seed(1)
    run = shutil.copytree(run_of(version), tmp_path / "run")  # restore() takes the lock
    assert ckpts.CheckpointManager(run).restore(state) == 3
    for key, expected in MODEL.items():
        assert_exact(model.state_dict()[key], expected, key)
    saved = optimizer.state_dict()
    assert sorted(saved["state"]) == sorted(MOMENTUM)
    for index, expected in MOMENTUM.items():
        assert_exact(saved["state"][index]["momentum_buffer"], expected, f"state.{index}")
    (group,) = saved["param_groups"]
    assert {k: group[k] for k in PARAM_GROUP} == PARAM_GROUP
    # the RNGs are back where the fixture's seed 0 left them
    assert random.random() == random.Random(0).random()
    assert np.random.random() == np.random.RandomState(0).random_sample()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(0)))


@VERSIONS
def test_load_weights_and_load_state_read_the_fixture(version: int) -> None:
    model, _ = fresh_objects()
    ckpts.load_weights(checkpoint_of(version), model)
    for key, expected in MODEL.items():
        assert_exact(model.state_dict()[key], expected, key)
    saved = ckpts.load_state(checkpoint_of(version), "optimizer")
    for index, expected in MOMENTUM.items():
        assert_exact(saved["state"][index]["momentum_buffer"], expected, f"state.{index}")


def test_plain_safetensors_reads_the_fixture_files() -> None:
    checkpoint = checkpoint_of(CURRENT)  # the v1 fixture's files are the same bytes
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(MODEL)
        assert f.metadata() == {"format": "pt"}
        for key, expected in MODEL.items():
            assert_exact(f.get_tensor(key), expected, key)
    with safe_open(str(checkpoint / "optimizer.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == [f"state.{i}.momentum_buffer" for i in sorted(MOMENTUM)]
        for index, expected in MOMENTUM.items():
            assert_exact(f.get_tensor(f"state.{index}.momentum_buffer"), expected,
                         f"state.{index}")
    with safe_open(str(checkpoint / "rng.safetensors"), framework="pt") as f:
        assert_exact(f.get_tensor("torch"), torch.Generator().manual_seed(0).get_state(),
                     "torch")


def test_saving_the_same_state_today_writes_the_same_bytes(tmp_path: Path) -> None:
    written = load_maker().write(tmp_path / "run")
    assert sorted(p.name for p in written.iterdir()) == sorted([*TENSOR_FILES_SHA256,
                                                                "manifest.json"])
    for name in TENSOR_FILES_SHA256:
        assert (written / name).read_bytes() == (checkpoint_of(CURRENT) / name).read_bytes()
    today = json.loads((written / "manifest.json").read_bytes())
    pinned = json.loads((checkpoint_of(CURRENT) / "manifest.json").read_bytes())
    for varying in ("created", "versions"):
        assert type(today.pop(varying)) is type(pinned.pop(varying)), varying
    assert today == pinned


def test_a_newer_format_version_is_refused_naming_both_versions(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_of(CURRENT), run)
    manifest_path = run / "step-00000003" / "manifest.json"
    manifest = json.loads(manifest_path.read_bytes())
    manifest["format_version"] = CURRENT + 1
    manifest_path.write_text(json.dumps(manifest, indent=1))
    both = rf"format version {CURRENT + 1}\b.*\bversion {CURRENT}\b"
    model, optimizer = fresh_objects()
    with pytest.raises(ckpts.FormatVersionError, match=both):
        ckpts.load_weights(run / "step-00000003", model)
    with pytest.raises(ckpts.FormatVersionError, match=both):
        ckpts.CheckpointManager(run).restore(ckpts.TrainState(model=model, optimizer=optimizer),
                                             step=3)
    (problem,) = ckpts.verify(run / "step-00000003")
    assert f"version {CURRENT + 1}" in problem and f"version {CURRENT}" in problem

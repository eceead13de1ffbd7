"""load_weights: a module's tensors for inference, and not one byte of optimizer state."""

from __future__ import annotations

import builtins
import mmap
from pathlib import Path

import pytest
import torch

import ckpts
from conftest import TinyNet


def test_load_weights_copies_into_the_live_parameters(tmp_path: Path, tiny_state) -> None:
    state, model, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    fresh = TinyNet()
    weight = fresh.fc1.weight
    ckpts.load_weights(checkpoint, fresh)
    assert fresh.fc1.weight is weight
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_load_weights_reads_no_optimizer_file(tmp_path: Path, tiny_state,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    state, _, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    opened: list[str] = []
    real_open = builtins.open

    def spying_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spying_open)
    ckpts.load_weights(str(checkpoint.path), TinyNet())
    assert any(name.endswith("model.safetensors") for name in opened)
    assert not any("optimizer" in name or "rng" in name for name in opened)


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


def test_load_weights_uses_a_memory_map(tmp_path: Path, tiny_state,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    state, _, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    maps = []
    real_mmap = mmap.mmap

    def counting_mmap(*args, **kwargs):  # type: ignore[no-untyped-def]
        maps.append(args)
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", counting_mmap)
    ckpts.load_weights(checkpoint, TinyNet())
    assert maps

"""Weights-only loads check what they read, and only that.

``load_weights`` checks the manifest's own fields, its file records and the loaded
module's tensor entries (format v4: in the module's index file, ``model.index.json``,
which must match the manifest's record of it); the other objects' tensor entries (an
optimizer's) are left to the readers of those objects (``restore``, ``verify``,
``load_state``). Each header entry of the module's file must say what the index says,
JSON types included, so a file that a safetensors reader would read differently is
refused. The damage below is made consistent (the edited index's size and hash
recorded in the manifest) so that each test reaches the check it is about.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import ckpts
from v4_worker import change_index


class Net(torch.nn.Module):
    """Two same-sized weights (their ranges can be swapped), and a one-element one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(4, 3))
        self.b = torch.nn.Parameter(torch.randn(4, 3))
        self.one = torch.nn.Parameter(torch.randn(1))
        self.state_dict_calls = 0

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.state_dict_calls += 1
        return super().state_dict(*args, **kwargs)


def save(run: Path) -> tuple[Path, Net]:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    manager = ckpts.CheckpointManager(run)
    checkpoint = manager.save(1, ckpts.TrainState(model=model, optimizer=optimizer))
    manager.close()
    assert checkpoint is not None
    return Path(checkpoint.path), model


def change_manifest(checkpoint: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, separators=(",", ":")))


def change_header(checkpoint: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite model.safetensors' JSON header (same length: no metadata, space-padded)
    and record the new header's hash, as a consistent hostile pair would."""
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    del header["__metadata__"]
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    prefix = data[:8] + text + b" " * (length - len(text))
    path.write_bytes(prefix + data[8 + length:])

    def new_hash(manifest: dict[str, Any]) -> None:
        manifest["files"]["model.safetensors"]["hash"] = \
            "xxh3_128:" + xxhash.xxh3_128(prefix).hexdigest()
    change_manifest(checkpoint, new_hash)


def assert_equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


@pytest.mark.parametrize(("field", "value"), [
    ("shape", [4, -3]), ("shape", [4.0, 3]), ("dtype", ["F32"]), ("dtype", "F33"),
    ("offsets", [0, 48]), ("offsets", [True, 1]), ("hash", None), ("file", "../model"),
    ("blocks", [1]),
])
def test_a_malformed_entry_of_the_loaded_module_is_refused_naming_it(
        tmp_path: Path, field: str, value: Any) -> None:
    checkpoint, _ = save(tmp_path)

    def damage(index: dict[str, Any]) -> None:
        index["objects"]["model"]["tensors"]["b"][field] = value
    change_index(checkpoint, "model.index.json", damage)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ckpts.CorruptCheckpointError,
                       match=r"model\.index\.json: tensor 'b' of object 'model' has a malformed"):
        ckpts.load_weights(checkpoint, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"tensor 'b' of object 'model'"):
        ckpts.load_state(checkpoint, "model", tensors=False)


def test_an_index_changed_behind_the_manifests_back_is_refused_as_damaged(
        tmp_path: Path) -> None:
    """The same edit as above, its hash not recorded: the index fails its own check."""
    checkpoint, _ = save(tmp_path)

    def damage(index: dict[str, Any]) -> None:
        index["objects"]["model"]["tensors"]["b"]["shape"] = [3, 4]
    change_index(checkpoint, "model.index.json", damage, rehash=False)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    damaged = r"model\.index\.json differs from the manifest's record of it"
    with pytest.raises(ckpts.CorruptCheckpointError, match=damaged):
        ckpts.load_weights(checkpoint, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ckpts.CorruptCheckpointError, match=damaged):
        ckpts.load_state(checkpoint, "model", tensors=False)
    assert any("model.index.json" in problem for problem in ckpts.verify(checkpoint))


def test_an_optimizer_entry_is_checked_by_its_readers_not_by_a_weights_only_load(
        tmp_path: Path) -> None:
    checkpoint, model = save(tmp_path)

    def damage(index: dict[str, Any]) -> None:
        entries = index["objects"]["optimizer"]["tensors"]
        entries[next(iter(entries))]["offsets"] = [0, 1]
    change_index(checkpoint, "optimizer.index.json", damage)

    fresh = Net()
    ckpts.load_weights(checkpoint, fresh)  # never touches the optimizer's entries
    assert_equal_weights(model, fresh)
    with pytest.raises(ckpts.CorruptCheckpointError, match="of object 'optimizer'"):
        ckpts.load_state(checkpoint, "optimizer")
    assert any("of object 'optimizer'" in problem for problem in ckpts.verify(checkpoint))
    again = Net()
    state = ckpts.TrainState(model=again, optimizer=torch.optim.AdamW(again.parameters()))
    with pytest.raises(ckpts.CorruptCheckpointError, match="of object 'optimizer'"):
        ckpts.CheckpointManager(tmp_path).restore(state, step=1)


def swap_ranges(header: dict[str, Any]) -> None:
    header["a"]["data_offsets"], header["b"]["data_offsets"] = \
        header["b"]["data_offsets"], header["a"]["data_offsets"]


def float_offset(header: dict[str, Any]) -> None:
    begin, end = header["b"]["data_offsets"]
    header["b"]["data_offsets"] = [float(begin), end]


def bool_shape(header: dict[str, Any]) -> None:
    header["one"]["shape"] = [True]


def half_dtype(header: dict[str, Any]) -> None:  # the same bytes, read as 24 halves
    header["b"].update(dtype="F16", shape=[4, 6])


def unhashable_dtype(header: dict[str, Any]) -> None:
    header["b"]["dtype"] = []


@pytest.mark.parametrize("damage", [swap_ranges, float_offset, bool_shape, half_dtype,
                                    unhashable_dtype])
def test_a_header_that_disagrees_with_the_manifest_is_refused_though_its_hash_matches(
        tmp_path: Path, damage: Callable[[dict[str, Any]], None]) -> None:
    checkpoint, _ = save(tmp_path)
    change_header(checkpoint, damage)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"model\.safetensors: (tensor|header)"):
        ckpts.load_weights(checkpoint, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"model\.safetensors"):
        ckpts.load_state(checkpoint, "model")


def test_a_header_laid_out_by_another_writer_loads_when_it_says_the_same(
        tmp_path: Path) -> None:
    checkpoint, model = save(tmp_path)

    def reorder(header: dict[str, Any]) -> None:  # other key order, no metadata
        entries = dict(reversed(list(header.items())))
        header.clear()
        header.update(entries)
    change_header(checkpoint, reorder)
    fresh = Net()
    ckpts.load_weights(checkpoint, fresh)
    assert_equal_weights(model, fresh)


def test_a_weights_only_load_calls_state_dict_once(tmp_path: Path) -> None:
    checkpoint, model = save(tmp_path)
    fresh = Net()
    ckpts.load_weights(checkpoint, fresh)
    assert fresh.state_dict_calls == 1
    assert_equal_weights(model, fresh)


class Mixed(torch.nn.Module):
    """Runs of one dtype end to end in a file, broken by other dtypes, an empty tensor,
    a scalar and 2-D shapes: the load cuts each run with one split."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        for i in range(6):
            self.register_buffer(f"f{i}", torch.randn(5 + i, 3, generator=gen))
        self.register_buffer("brain", torch.randn(7, generator=gen).to(torch.bfloat16))
        self.register_buffer("empty", torch.empty(0, 4))
        self.register_buffer("scalar", torch.tensor(2.5))
        self.register_buffer("ints", torch.arange(9, dtype=torch.int64).reshape(3, 3))
        self.register_buffer("flags", torch.tensor([True, False, True]))


def test_tensors_of_mixed_dtypes_and_shapes_load_exactly_with_their_shapes(
        tmp_path: Path) -> None:
    saved = Mixed()
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, ckpts.TrainState(model=saved))
    live = Mixed()
    for tensor in live.buffers():
        tensor.zero_()
    ckpts.load_weights(tmp_path / "run" / "step-00000001", live)
    for (key, want), got in zip(saved.state_dict().items(), live.state_dict().values(),
                                strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, key
        assert torch.equal(got, want), key
    state = ckpts.load_state(tmp_path / "run" / "step-00000001", "model")
    assert state["f3"].shape == (8, 3) and state["scalar"].shape == ()
    assert torch.equal(state["ints"], saved.ints) and state["empty"].shape == (0, 4)

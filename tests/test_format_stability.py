"""Every format version stays readable, and the current one byte-identical: committed
fixtures pin them.

``tests/data/v1-small/`` (format v1), ``tests/data/v2-small/`` (format v2) and
``tests/data/v4-small/`` (format v4) were each written once by one process running
``tests/data/make_small.py`` and are committed; they hold the same state, and their
safetensors files are the same bytes (v2 changed only the manifest; v4 moved each
object's tree and tensor entries into its index file, ``<object>.index.json``).
These tests check that the current code still reads each exactly, that plain
``safetensors`` reads their files, that their bytes are the pinned ones, and that
saving the same state today writes the v4 bytes (the manifest aside from its creation
time and library versions).

``tests/data/v3-small/`` (format v3) and ``tests/data/v4-ranks-small/`` (format v4:
``layout.json`` and an index per rank) were written by two ranks of a gloo job saving
an FSDP2 model and its AdamW, each rank its own RNGs (``make_small.py v4-ranks`` today).
Their safetensors files are the same bytes. Their tests read each in one process
(``load_weights`` into a plain module, ``load_state``, ``restore``, ``verify``, plain
``safetensors``), pin their bytes, and run one 2-process job that restores both into
FSDP2 objects and saves their state again, to the v4 fixture's bytes.

A failure here means the on-disk format changed: that needs a new format version and
a new fixture, not a regenerated one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

import ckpts
from ckpts._format.manifest import READABLE_VERSION

DATA = Path(__file__).with_name("data")
TENSOR_FILES_SHA256 = {
    "model.safetensors": "e689903c2593f37cd5a35c3163f677009e4ad3caa1612bcb966c5b8b91007dbe",
    "optimizer.safetensors": "dff099461d69262ebf351ed5e79f06308e283efbbab326fba59ed27f022de81d",
    "rng.safetensors": "4e5916d454dcfd7d14f325abf59066175cc4752afbc9caca2ab3d300ea58620e",
}
INDEX_FILES_SHA256 = {  # format v4: each object's tree and tensor entries
    "model.index.json": "146629b8bb9c37dba1a8c68c64ff538bbd1734f55b859785c9948a35e3439c42",
    "optimizer.index.json": "4bb0bd16209ccc2bda84e2e2075d3e53e4e48091e834af51415223ea5b4c0bba",
    "rng.index.json": "a883daf0e9fc90a172cdc2bb192b667d17eba7cf4155aa888c21a495f80c6cc5",
}
MANIFEST_SHA256 = {
    1: "0786da642a48031f33ea3f28bff3a14412c2268738690e613b39a4c5e1a6307e",
    2: "88ecb943c7007eeb055858cbce9cca748b4148f89347df09362b257448e4adc1",
    4: "40f7872c691ee179272d900f433c9d4c7586f98b06efcac882e46e1fcf4855b6",
}
CURRENT = max(MANIFEST_SHA256)
VERSIONS = pytest.mark.parametrize("version", sorted(MANIFEST_SHA256))


def run_of(version: int) -> Path:
    return DATA / f"v{version}-small"


def checkpoint_of(version: int) -> Path:
    return run_of(version) / "step-00000003"


def files_of(version: int) -> dict[str, str]:
    """The pinned sha256 of each file of a one-process fixture."""
    indexes = INDEX_FILES_SHA256 if version >= 4 else {}
    return {**TENSOR_FILES_SHA256, **indexes, "manifest.json": MANIFEST_SHA256[version]}


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
    assert found == files_of(version)
    manifest = json.loads((checkpoint_of(version) / "manifest.json").read_bytes())
    assert manifest["format_version"] == version
    if version >= 4:  # the manifest lists the index files; they hold the tensor entries
        assert {name: obj["index"] for name, obj in manifest["objects"].items()} == {
            "model": "model.index.json", "optimizer": "optimizer.index.json",
            "rng": "rng.index.json"}
        assert sorted(manifest["files"]) == sorted([*TENSOR_FILES_SHA256, *INDEX_FILES_SHA256])


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
    checkpoint = checkpoint_of(CURRENT)  # the v1 and v2 fixtures' files are the same bytes
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
    assert sorted(p.name for p in written.iterdir()) == sorted(files_of(CURRENT))
    for name in files_of(CURRENT):
        if name != "manifest.json":  # tensor files and index files: the very bytes
            assert (written / name).read_bytes() == (checkpoint_of(CURRENT) / name).read_bytes(), \
                name
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
    manifest["format_version"] = READABLE_VERSION + 1
    manifest_path.write_text(json.dumps(manifest, indent=1))
    both = rf"format version {READABLE_VERSION + 1}\b.*\bversion {READABLE_VERSION}\b"
    model, optimizer = fresh_objects()
    with pytest.raises(ckpts.FormatVersionError, match=both):
        ckpts.load_weights(run / "step-00000003", model)
    with pytest.raises(ckpts.FormatVersionError, match=both):
        ckpts.CheckpointManager(run).restore(ckpts.TrainState(model=model, optimizer=optimizer),
                                             step=3)
    (problem,) = ckpts.verify(run / "step-00000003")
    assert f"version {READABLE_VERSION + 1}" in problem and f"version {READABLE_VERSION}" in problem


# Two ranks: tests/data/v3-small/ (format v3) and tests/data/v4-ranks-small/ (format v4,
# make_small.py v4-ranks) hold the same state; their model and RNG files are the same bytes.
RANK_TENSOR_FILES_SHA256 = {
    "model-rank00000.safetensors":
        "a16cb0662bbe2111e71f1d5ea52463a787d02b7eba6c069e8c3bfaa8af5c53d6",
    "model-rank00001.safetensors":
        "d40b62a854cb1ba0b826c678d67039eaea27f844edfa7cd738c13d0871a0e15b",
    "optimizer-rank00000.safetensors":
        "ea3f9abdb4a2e7b8edbcf527ed4b87fc9cb40fd7a496c486c9f0d7e4b7f9dbbc",
    "optimizer-rank00001.safetensors":
        "8d9afb180469f32355154085e119f208470abd3f97938834b89596a695b1dc41",
    "rng.rank0.safetensors": TENSOR_FILES_SHA256["rng.safetensors"],  # seeded 0, as in v2
    "rng.rank1.safetensors": "25ac199f9f84b5ec8f8d2b2415ff89e3f4e8beb127eed1008ef4b71f199d9e9d",
}
V3_FILES_SHA256 = {
    **RANK_TENSOR_FILES_SHA256,
    "manifest.json": "028f0cbcd03c443eaa03dd86a10a2d567306f4c839829ea7c42705eda2d4b8c7",
}
V4_RANKS_FILES_SHA256 = {
    **RANK_TENSOR_FILES_SHA256,
    # v4 saves every small tensor all ranks hold (AdamW's steps) on rank 0, where v3 (DCP's
    # planner) spread them over the ranks: the optimizer files differ, the model's do not
    "optimizer-rank00000.safetensors":
        "10799d331970bf06c35c9773433ce05e23924e7813518b71065da17ec9d69e8f",
    "optimizer-rank00001.safetensors":
        "f0e730a73c85c8c5be5ce7e4fbaa80696cfe41d08ab85c9784ab8509dd74111a",
    "layout.json": "337823f75445b57fd9aaccd64ba04e4681da87449b792a2ea91668377d037316",
    "rank-00000.json": "9150adf80323bf90e111dea0eb3b0ecf5951cd4379f6a48b6c7af04ab08e36d2",
    "rank-00001.json": "912bceb87f52c10c48d303cb7eb2aafe330f60ca65b4327a819603ef48331077",
    "manifest.json": "aa46b4520f146cfe740be2c947ea203b610377dbd9c0037c95bf873ff828656a",
}
V3_RUN = DATA / "v3-small"
V3_CHECKPOINT = V3_RUN / "step-00000003"
V4_RANKS_RUN = DATA / "v4-ranks-small"
V4_RANKS_CHECKPOINT = V4_RANKS_RUN / "step-00000003"
RANK_RUNS = {3: V3_RUN, 4: V4_RANKS_RUN}
RANK_VERSIONS = pytest.mark.parametrize("version", sorted(RANK_RUNS))
V3_PARAMETERS = ["first.weight", "first.bias", "second.weight", "second.bias"]  # optimizer order


def v3_expected() -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """The two-rank fixtures' model and AdamW state, by make_small.py's exact arithmetic
    (its docstring): ``p' = 0.875 p - 0.25 sign(g)``, ``exp_avg = g / 2``,
    ``exp_avg_sq = g² / 4``."""
    maker = load_maker()
    values, gradients = maker.sharded_values(), maker.sharded_gradients()
    model = {key: value * 0.875 - 0.25 * gradients[key].sign() if key in gradients else value
             for key, value in values.items()}
    optimizer = {index: {"step": torch.tensor(1.0), "exp_avg": gradients[key] / 2,
                         "exp_avg_sq": gradients[key] ** 2 / 4}
                 for index, key in enumerate(V3_PARAMETERS)}
    return model, optimizer


def assert_v3_values(model: dict[str, torch.Tensor], optimizer: dict[Any, Any]) -> None:
    """``model`` (a state dict) and ``optimizer`` (its ``state``) hold the two-rank
    fixtures' values."""
    expected_model, expected_optimizer = v3_expected()
    assert sorted(model) == sorted(expected_model)
    for key, expected in expected_model.items():
        assert_exact(model[key], expected, key)
    assert sorted(optimizer) == sorted(expected_optimizer)
    for index, tensors in expected_optimizer.items():
        for name, expected in tensors.items():
            assert_exact(optimizer[index][name], expected, f"state.{index}.{name}")


def test_the_v3_fixture_files_hash_to_the_pinned_values() -> None:
    assert sorted(p.name for p in V3_RUN.iterdir()) == ["step-00000003"]
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in V3_CHECKPOINT.iterdir()}
    assert found == V3_FILES_SHA256
    manifest = json.loads((V3_CHECKPOINT / "manifest.json").read_bytes())
    assert (manifest["format_version"], manifest["world_size"], manifest["per_rank"]) == (3, 2,
                                                                                         ["rng"])
    assert {name: record["rank"] for name, record in manifest["files"].items()} == {
        "model-rank00000.safetensors": 0, "optimizer-rank00000.safetensors": 0,
        "rng.rank0.safetensors": 0, "model-rank00001.safetensors": 1,
        "optimizer-rank00001.safetensors": 1, "rng.rank1.safetensors": 1}


def test_the_v4_ranks_fixture_files_hash_to_the_pinned_values() -> None:
    """The manifest lists the layout and the ranks' indexes, and no tensor; each rank's
    index lists its data files and pieces, and its RNG object whole."""
    assert sorted(p.name for p in V4_RANKS_RUN.iterdir()) == ["step-00000003"]
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in V4_RANKS_CHECKPOINT.iterdir()}
    assert found == V4_RANKS_FILES_SHA256
    manifest = json.loads((V4_RANKS_CHECKPOINT / "manifest.json").read_bytes())
    assert (manifest["format_version"], manifest["world_size"], manifest["per_rank"]) == (4, 2,
                                                                                         ["rng"])
    assert sorted(manifest["files"]) == ["layout.json", "rank-00000.json", "rank-00001.json"]
    assert {name: obj["index"] for name, obj in manifest["objects"].items()} == {
        "model": "layout.json", "optimizer": "layout.json",
        "rng.rank0": "rank-00000.json", "rng.rank1": "rank-00001.json"}
    layout = json.loads((V4_RANKS_CHECKPOINT / "layout.json").read_bytes())
    assert layout["objects"]["model"]["tensors"]["first.weight"] == {
        "dtype": "F32", "shape": [3, 4], "mesh": [2], "placements": ["S0"]}
    for rank in range(2):
        index = json.loads((V4_RANKS_CHECKPOINT / f"rank-{rank:05d}.json").read_bytes())
        assert sorted(index["files"]) == [f"model-rank{rank:05d}.safetensors",
                                          f"optimizer-rank{rank:05d}.safetensors",
                                          f"rng.rank{rank}.safetensors"]
        assert sorted(index["objects"]) == [f"rng.rank{rank}"]
        piece = index["pieces"]["model"]["first.weight"]
        assert piece["file"] == f"model-rank{rank:05d}.safetensors"


@RANK_VERSIONS
def test_plain_safetensors_reads_each_ranks_shards_of_the_two_rank_fixtures(version: int
                                                                           ) -> None:
    """Each rank's file is standard safetensors holding that rank's rows; the rows of
    both ranks, stacked, are the whole tensor."""
    checkpoint = RANK_RUNS[version] / "step-00000003"
    expected_model, expected_optimizer = v3_expected()
    rows: dict[str, list[torch.Tensor]] = {}
    for rank in range(2):
        with safe_open(str(checkpoint / f"model-rank{rank:05d}.safetensors"),
                       framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                rows.setdefault(key, []).append(f.get_tensor(key))
        with safe_open(str(checkpoint / f"rng.rank{rank}.safetensors"), framework="pt") as f:
            assert_exact(f.get_tensor("torch"),
                         torch.Generator().manual_seed(rank).get_state(), f"rng.rank{rank}")
    assert [len(rows[key]) for key in V3_PARAMETERS] == [2, 2, 2, 2]  # one shard per rank
    assert [rows[key][0].shape[0] for key in V3_PARAMETERS] == [2, 2, 1, 1]  # 3 rows: 2 + 1
    for key, expected in expected_model.items():
        assert_exact(torch.cat(rows[key]), expected, key)
    exp_avg: list[torch.Tensor] = []
    for rank in range(2):
        with safe_open(str(checkpoint / f"optimizer-rank{rank:05d}.safetensors"),
                       framework="pt") as f:
            exp_avg.append(f.get_tensor("state.0.exp_avg"))
    assert_exact(torch.cat(exp_avg), expected_optimizer[0]["exp_avg"], "state.0.exp_avg")


@RANK_VERSIONS
def test_one_process_reads_the_two_rank_fixtures_with_load_weights_load_state_and_verify(
        version: int) -> None:
    run = RANK_RUNS[version]
    checkpoint = run / "step-00000003"
    assert ckpts.verify(run) == []
    model = load_maker().ShardedNet()  # a plain module: no FSDP, no process group
    ckpts.load_weights(checkpoint, model)
    optimizer = ckpts.load_state(checkpoint, "optimizer")
    assert_v3_values(model.state_dict(), optimizer["state"])
    assert optimizer["param_groups"][0]["betas"] == (0.5, 0.75)
    (listed,) = ckpts.CheckpointManager(run).checkpoints()
    assert (listed.step, listed.epoch) == (3, 1)
    assert listed.nbytes == sum(p.stat().st_size for p in checkpoint.iterdir())


@RANK_VERSIONS
def test_one_process_restores_the_two_rank_fixtures_and_keeps_its_own_rngs(
        version: int, tmp_path: Path) -> None:
    """At world size 1 the two ranks' RNGs cannot both apply: they keep their state."""
    maker = load_maker()
    model = maker.ShardedNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    run = shutil.copytree(RANK_RUNS[version], tmp_path / "run")
    torch.manual_seed(7)
    assert ckpts.CheckpointManager(run).restore(ckpts.TrainState(model=model,
                                                                 optimizer=optimizer)) == 3
    assert_v3_values(model.state_dict(), optimizer.state_dict()["state"])
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7)))


def _two_rank_fixtures_on_two_ranks(rank: int, world: int, port: int, fixtures: list[str],
                                    today: str) -> None:
    """One rank of the 2-rank check: save the fixtures' state anew into ``today``, then
    restore each of ``fixtures`` into FSDP2 objects holding zeros and compare every value."""
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,  # a lost rank fails fast
                            timeout=datetime.timedelta(seconds=120))
    try:
        maker = load_maker()
        maker.write_sharded(Path(today))
        for fixture in fixtures:
            model, optimizer = maker.sharded_objects(
                {key: torch.zeros_like(value) for key, value in maker.sharded_values().items()})
            random.seed(99)
            np.random.seed(99)
            torch.manual_seed(99)
            manager = ckpts.CheckpointManager(fixture, collective_timeout=120.0)
            assert manager.restore(ckpts.TrainState(model=model, optimizer=optimizer)) == 3
            manager.close()

            def whole(value: Any) -> Any:
                return value.full_tensor() if isinstance(value, DTensor) else value

            state = optimizer.state_dict()["state"]
            assert_v3_values({key: whole(value) for key, value in model.state_dict().items()},
                             {index: {name: whole(value) for name, value in tensors.items()}
                              for index, tensors in state.items()})
            assert random.random() == random.Random(rank).random()  # this rank's own RNGs
            assert np.random.random() == np.random.RandomState(rank).random_sample()
            assert torch.equal(torch.rand(3),
                               torch.rand(3, generator=torch.Generator().manual_seed(rank)))
    finally:
        dist.destroy_process_group()


def test_two_ranks_restore_the_two_rank_fixtures_and_save_the_v4_bytes_again(
        tmp_path: Path) -> None:
    """One 2-process job (gloo, CPU) restores the v3 and v4 fixtures exactly, each rank
    its own RNGs, and saving their state today writes the v4 fixture's files."""
    maker = load_maker()
    fixtures = [str(shutil.copytree(run, tmp_path / f"v{version}"))
                for version, run in sorted(RANK_RUNS.items())]
    torch.multiprocessing.spawn(_two_rank_fixtures_on_two_ranks, nprocs=2, args=(
        2, maker.free_port(), fixtures, str(tmp_path / "today")))
    written = tmp_path / "today" / "step-00000003"
    assert sorted(p.name for p in written.iterdir()) == sorted(V4_RANKS_FILES_SHA256)
    for name in V4_RANKS_FILES_SHA256:
        if name != "manifest.json":
            assert (written / name).read_bytes() == (V4_RANKS_CHECKPOINT / name).read_bytes(), \
                name
    today = json.loads((written / "manifest.json").read_bytes())
    pinned = json.loads((V4_RANKS_CHECKPOINT / "manifest.json").read_bytes())
    for varying in ("created", "versions"):
        assert type(today.pop(varying)) is type(pinned.pop(varying)), varying
    assert today == pinned

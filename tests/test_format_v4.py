"""Format v4 (issue 26): the tensor tables out of the manifest, in index files it covers by hash.

One process: each object with tensors gets ``<name>.index.json`` (its tree, aliases and
tensor entries), listed in the manifest with its size and hash; an object without
tensors stays inline. Many ranks: rank 0 writes ``layout.json`` (the shared objects'
trees and each tensor's dtype, shape and layout) and each rank ``rank-NNNNN.json``
(its files, its pieces, its per-rank objects); the manifest lists only those. So the
manifest stays small whatever the tensors and ranks: at most 64 KB + 512 B per rank.

The tests here: a one-process round trip and the manifest's shape and size (at 40,000
tensors); a damaged index (a flipped byte, a truncation, a manifest whose recorded hash
differs) refused naming the file, with ``restore()`` falling back to the previous
checkpoint and ``ckpts verify`` failing; the commands and readers on v4 (``ckpts
show``, ``ckpts diff``, ``ckpts export --format hf``, ``load_weights``,
``load_state``); and real gloo jobs (tests/v4_worker.py, one process per rank) that
save an FSDP2 model and its AdamW on 2 ranks, restore that on 4 ranks and save again,
and restore the 4-rank checkpoint in one process, bit-exact at each hop, plus a
damaged rank index that every rank and one process fall back past.

The older formats' fixtures (v1, v2, v3) are read by tests/test_format_stability.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckpts
from ckpts._format.catalog import open_checkpoint
from ckpts._format.index import read_manifest
from ckpts._format.manifest import digest
from conftest import TinyNet, assert_state_dicts_equal, train_steps
from v4_worker import Progress, change_index, flip_byte, plain_model, rehash_index

CKPTS = str(Path(sys.executable).parent / "ckpts")
WORKER = Path(__file__).with_name("v4_worker.py")
JOB_TIMEOUT = 180.0  # seconds: a job that runs longer hangs, and the test fails instead


def manifest_bound(ranks: int) -> int:
    """Issue 26's bound on a v4 manifest's size."""
    return 64 * 1024 + 512 * ranks


def manifest_of(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "manifest.json").read_bytes())  # type: ignore[no-any-return]


def expanded(checkpoint: Path) -> dict[str, Any]:
    """The manifest as v3 held it (every index read and checked)."""
    storage, name = open_checkpoint(checkpoint)
    return read_manifest(storage, name)


def assert_no_tensor_rows(manifest: dict[str, Any]) -> None:
    """No object of the manifest holds a tensor entry: each with tensors names a listed
    index instead; every listed file is an index (with its size and hash) or a data file."""
    for name, obj in manifest["objects"].items():
        if "index" in obj:
            assert "tensors" not in obj and "tree" not in obj, name
            assert obj["index"] in manifest["files"], name
        else:  # JSON alone, inline
            assert obj["tensors"] == {}, name


class Holder:
    """A JSON-only object (no tensors): inline in the manifest."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def trained(seed: int = 0, steps: int = 2) -> tuple[TinyNet, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, steps)
    return model, optimizer


def fresh() -> tuple[ckpts.TrainState, TinyNet, torch.optim.AdamW, Holder]:
    torch.manual_seed(123)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    holder = Holder(None)
    return ckpts.TrainState(model=model, optimizer=optimizer, config=holder), model, optimizer, \
        holder


CONFIG = {"lr": 1e-2, "layers": (4, 8, 2), "name": "tiny", "schedule": [0.5, None, True]}


# ---- one process -------------------------------------------------------------------------


def test_one_process_round_trip_is_bit_exact_and_the_manifest_holds_no_tensor_rows(
        tmp_path: Path) -> None:
    model, optimizer = trained()
    state = ckpts.TrainState(model=model, optimizer=optimizer, config=Holder(CONFIG))
    manager = ckpts.CheckpointManager(tmp_path / "run")
    checkpoint = Path(manager.save(5, state, metrics={"loss": 0.25}).path)
    after_save = torch.rand(4)  # the RNGs as saved, then moved on

    manifest = manifest_of(checkpoint)
    assert manifest["format_version"] == 4
    assert_no_tensor_rows(manifest)
    assert {name: obj.get("index") for name, obj in manifest["objects"].items()} == {
        "model": "model.index.json", "optimizer": "optimizer.index.json",
        "rng": "rng.index.json", "config": None}
    for file in ("model.index.json", "optimizer.index.json", "rng.index.json"):
        payload = (checkpoint / file).read_bytes()
        assert manifest["files"][file] == {"nbytes": len(payload), "hash": digest(payload)}
    index = json.loads((checkpoint / "model.index.json").read_bytes())
    assert sorted(index["objects"]) == ["model"]
    entries = index["objects"]["model"]["tensors"]
    assert sorted(entries) == sorted(model.state_dict())
    assert {entry["file"] for entry in entries.values()} == {"model.safetensors"}
    # the readers see every object as v3 held it
    full = expanded(checkpoint)
    assert full["objects"]["model"]["tensors"] == entries
    assert sorted(full["objects"]["optimizer"]["tensors"]) == sorted(
        f"state.{i}.{name}" for i in range(len(list(model.parameters())))
        for name in ("step", "exp_avg", "exp_avg_sq"))

    live, model2, optimizer2, holder = fresh()
    assert manager.restore(live) == 5
    manager.close()
    assert_state_dicts_equal(model2.state_dict(), model.state_dict())
    assert_state_dicts_equal(optimizer2.state_dict(), optimizer.state_dict())
    assert holder.value == CONFIG and repr(holder.value) == repr(CONFIG)  # tuples stay tuples
    assert torch.equal(torch.rand(4), after_save)  # the RNGs are back where they were saved
    assert ckpts.verify(checkpoint) == []


def test_the_manifest_of_40000_tensors_is_within_the_bound(tmp_path: Path) -> None:
    """Issue 26's target: 5,000 x Linear(16, 16) and AdamW after one step (10,000
    parameters, 30,000 optimizer tensors) in a manifest of at most 64 KB + 512 B."""
    began = time.monotonic()
    model = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(5000))
    optimizer = torch.optim.AdamW(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    tensors = len(model.state_dict()) + sum(len(entry) for entry in optimizer.state.values())
    assert tensors == 40_000
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        checkpoint = Path(manager.save(1, ckpts.TrainState(model=model,
                                                           optimizer=optimizer)).path)
    size = (checkpoint / "manifest.json").stat().st_size
    print(f"manifest of {tensors} tensors: {size} bytes "
          f"({time.monotonic() - began:.1f} s to build and save)")
    assert size <= manifest_bound(1)
    manifest = manifest_of(checkpoint)
    assert_no_tensor_rows(manifest)
    assert sorted(manifest["files"]) == sorted([
        "model.index.json", "model.safetensors", "optimizer.index.json",
        "optimizer.safetensors", "rng.index.json", "rng.safetensors"])
    optimizer_index = json.loads((checkpoint / "optimizer.index.json").read_bytes())
    assert len(optimizer_index["objects"]["optimizer"]["tensors"]) == 30_000


def three_saves(run: Path) -> tuple[ckpts.CheckpointManager, list[Path], dict[int, Any]]:
    """Steps 1-3 of a TinyNet and its AdamW; each step's model state_dict, cloned."""
    model, optimizer = trained(steps=1)
    state = ckpts.TrainState(model=model, optimizer=optimizer, config=Holder(CONFIG))
    manager = ckpts.CheckpointManager(run)
    saved, weights = [], {}
    for step in (1, 2, 3):
        train_steps(model, optimizer, 1)
        saved.append(Path(manager.save(step, state).path))
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return manager, saved, weights


# Each damage returns the index it damaged, and how a reader refuses it.
def flip_index(checkpoint: Path) -> tuple[str, str]:
    flip_byte(checkpoint / "model.index.json", 100)
    return "model.index.json", r"model\.index\.json differs from the manifest's record of it"


def truncate_index(checkpoint: Path) -> tuple[str, str]:
    path = checkpoint / "optimizer.index.json"
    os.truncate(path, path.stat().st_size - 7)
    # the size is found wrong from the listing (restore, verify) or when read (load_state)
    return "optimizer.index.json", (r"optimizer\.index\.json( differs from the manifest's "
                                    r"record of it|: \d+ bytes, manifest says \d+)")


def delete_index(checkpoint: Path) -> tuple[str, str]:
    (checkpoint / "rng.index.json").unlink()
    return "rng.index.json", r"rng\.index\.json"


def other_recorded_hash(checkpoint: Path) -> tuple[str, str]:
    """The index is intact; the manifest records another hash for it."""
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["files"]["model.index.json"]["hash"] = digest(b"another index")
    path.write_text(json.dumps(manifest))
    return "model.index.json", r"model\.index\.json differs from the manifest's record of it"


@pytest.mark.parametrize("damage", [flip_index, truncate_index, delete_index,
                                    other_recorded_hash])
def test_a_damaged_index_is_refused_naming_it_and_restore_falls_back(
        tmp_path: Path, damage: Callable[[Path], tuple[str, str]],
        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    manager, saved, weights = three_saves(run)
    newest = saved[-1]
    file, refused = damage(newest)

    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if file == "model.index.json":  # what a weights-only load reads
        with pytest.raises(ckpts.CorruptCheckpointError, match=refused):
            ckpts.load_weights(newest, model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    else:
        with pytest.raises(ckpts.CorruptCheckpointError, match=refused):
            ckpts.load_state(newest, file.split(".")[0])
    (problem, *_) = ckpts.verify(newest)
    assert f"{newest}/{file}" in problem
    assert ckpts.verify(saved[1]) == []

    with pytest.raises(ckpts.CorruptCheckpointError, match=refused):
        manager.restore(fresh()[0], step=3)
    live, model2, _, holder = fresh()
    with caplog.at_level(logging.WARNING, logger="ckpts"):
        assert manager.restore(live) == 2
    manager.close()
    assert f"skipping corrupt checkpoint {newest}" in caplog.text
    assert_state_dicts_equal(model2.state_dict(), weights[2])
    assert holder.value == CONFIG


def test_ckpts_verify_reports_each_damaged_index_and_fails(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """One run, three kinds of damage (one ``ckpts`` process: it imports torch)."""
    run = tmp_path / "run"
    manager, saved, weights = three_saves(run)
    model, optimizer = trained(seed=1)
    saved.append(Path(manager.save(4, ckpts.TrainState(model=model, optimizer=optimizer,
                                                         config=Holder(CONFIG))).path))
    damaged = {checkpoint: damage(checkpoint)[0] for checkpoint, damage in zip(
        saved[1:], [truncate_index, other_recorded_hash, flip_index], strict=True)}
    verified = ckpts_command("verify", run)
    assert verified.returncode == 1, (verified.stdout, verified.stderr)
    lines = verified.stdout.splitlines()
    assert [line for line in lines if line.startswith("step-")] == [
        "step-00000001  OK", "step-00000002  FAILED", "step-00000003  FAILED",
        "step-00000004  FAILED"]
    for checkpoint, file in damaged.items():
        assert f"{checkpoint}/{file}" in verified.stdout
    assert lines[-1] == "4 checkpoint(s) verified, 3 with problems"
    live, model2, _, _ = fresh()
    with caplog.at_level(logging.WARNING, logger="ckpts"):
        assert manager.restore(live) == 1
    manager.close()
    assert all(f"skipping corrupt checkpoint {checkpoint}" in caplog.text for checkpoint in damaged)
    assert_state_dicts_equal(model2.state_dict(), weights[1])


def test_an_index_whose_content_lies_consistently_is_refused_by_its_content_checks(
        tmp_path: Path) -> None:
    """An index rewritten with its new hash recorded (a buggy or hostile writer): the
    checks of its content still refuse what does not fit, naming the index and tensor."""
    _, saved, _ = three_saves(tmp_path / "run")
    newest = saved[-1]

    def damage(index: dict[str, Any]) -> None:
        index["objects"]["model"]["tensors"]["fc1.weight"]["offsets"] = [0, 4]
    change_index(newest, "model.index.json", damage)
    with pytest.raises(ckpts.CorruptCheckpointError,
                       match=r"model\.index\.json: tensor 'fc1\.weight' of object 'model'"):
        ckpts.load_weights(newest, TinyNet())
    assert any("fc1.weight" in problem for problem in ckpts.verify(newest))

    def other_object(index: dict[str, Any]) -> None:  # describes another object than named
        index["objects"] = {"head": index["objects"]["model"]}
    change_index(saved[1], "model.index.json", other_object)
    with pytest.raises(ckpts.CorruptCheckpointError,
                       match=r"model\.index\.json does not describe object 'model'"):
        ckpts.load_state(saved[1], "model")

    (saved[0] / "model.index.json").write_bytes(b"[1, 2]\n")  # JSON, but not an index
    rehash_index(saved[0], "model.index.json")
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"model\.index\.json"):
        ckpts.load_weights(saved[0], TinyNet())


@pytest.mark.parametrize("target", ["no.such.key", ["a", "list"]])
def test_an_index_whose_aliases_name_no_listed_tensor_is_a_corrupt_checkpoint(
        tmp_path: Path, target: Any) -> None:
    model, optimizer = trained()
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    manager = ckpts.CheckpointManager(tmp_path / "run")
    manager.save(1, state)
    checkpoint = Path(manager.save(2, state).path)

    def damage(index: dict[str, Any]) -> None:
        index["objects"]["model"]["aliases"] = {"fc2.bias": target}
    change_index(checkpoint, "model.index.json", damage)
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"model\.index\.json"):
        ckpts.load_weights(checkpoint, TinyNet())
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"model\.index\.json"):
        ckpts.load_state(checkpoint, "model")
    assert any("model.index.json" in problem for problem in ckpts.verify(checkpoint))
    fresh_model = TinyNet()
    live = ckpts.TrainState(model=fresh_model,
                            optimizer=torch.optim.AdamW(fresh_model.parameters()))
    assert manager.restore(live) == 1
    manager.close()


# ---- the commands and readers on v4 ---------------------------------------------------------


def ckpts_command(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTS, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_show_diff_load_weights_and_load_state_read_v4(tmp_path: Path) -> None:
    model, optimizer = trained()
    state = ckpts.TrainState(model=model, optimizer=optimizer, config=Holder(CONFIG))
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        first = Path(manager.save(1, state).path)
        train_steps(model, optimizer, 1)
        second = Path(manager.save(2, state).path)

    shown = ckpts_command("show", second, "--tensors", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    described = info["objects"]["model"]
    assert (described["kind"], described["class"], described["num_tensors"]) == (
        "module", "TinyNet", len(model.state_dict()))
    assert described["tensors"]["fc1.weight"] == {"dtype": "F32", "shape": [8, 4],
                                                  "file": "model.safetensors"}
    assert info["objects"]["optimizer"]["num_tensors"] == 3 * len(list(model.parameters()))
    assert "model.index.json" in info["files"]

    compared = ckpts_command("diff", first, second, "--json")
    assert compared.returncode == 0, compared.stderr
    rows = {row["key"]: row for row in json.loads(compared.stdout)["tensors"]}
    weights_a, weights_b = load_file(first / "model.safetensors"), \
        load_file(second / "model.safetensors")
    assert rows["model/fc1.weight"]["status"] == "changed"
    assert rows["model/fc1.weight"]["max_abs_diff"] == pytest.approx(float(
        (weights_a["fc1.weight"].double() - weights_b["fc1.weight"].double()).abs().max()))
    assert rows["optimizer/state.0.exp_avg"]["status"] == "changed"

    loaded = TinyNet()
    ckpts.load_weights(second, loaded)
    assert_state_dicts_equal(loaded.state_dict(), model.state_dict())
    assert_state_dicts_equal(ckpts.load_state(second, "optimizer"), optimizer.state_dict())
    assert ckpts.load_state(second, "config") == {"value": CONFIG}
    placeholders = ckpts.load_state(second, "model", tensors=False)
    assert placeholders["fc1.weight"].device.type == "meta"


def test_export_hf_reads_v4(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 5, 9]])).logits.square().mean().backward()
    optimizer.step()
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        checkpoint = Path(manager.save(1, ckpts.TrainState(model=model,
                                                           optimizer=optimizer)).path)
    assert "hf_config" in manifest_of(checkpoint)["objects"]["model"]
    exported = ckpts_command("export", checkpoint, tmp_path / "hf", "--format", "hf")
    assert exported.returncode == 0, exported.stderr
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---- many ranks: 2 -> 4 -> 1 ---------------------------------------------------------------


def launch(world: int, scenario: str, config: dict[str, Any], log: Path) -> None:
    """Run a scenario of tests/v4_worker.py on ``world`` ranks (a process each); fail
    with every rank's output unless all of them succeed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, str(WORKER), scenario, json.dumps(config)],
        env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    deadline = time.monotonic() + JOB_TIMEOUT
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(output)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    log.write_text("\n".join(f"--- rank {r}\n{o}" for r, o in enumerate(outputs)))
    failed = [r for r, process in enumerate(processes) if process.returncode != 0]
    assert not failed, f"ranks {failed} failed:\n" + "\n".join(
        f"--- rank {r}\n{outputs[r][-3000:]}" for r in failed)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank job saves steps 1 and 2 of an FSDP2 model, its AdamW and a JSON object
    (``w2``), and restores a copy whose step 2 has a damaged ``rank-00001.json``
    (``w2-damaged``); a 4-rank job restores ``w2`` and saves that state (``w4``)."""
    root = tmp_path_factory.mktemp("v4-ranks")
    out = root / "out"
    out.mkdir()
    began = time.monotonic()
    launch(2, "save_two", {"out": str(out), "run": str(root / "w2"),
                           "damaged": str(root / "w2-damaged")}, root / "save_two.log")
    middle = time.monotonic()
    launch(4, "reshard", {"out": str(out), "from": str(root / "w2"), "run": str(root / "w4")},
           root / "reshard.log")
    print(f"2-rank job {middle - began:.1f} s, 4-rank job {time.monotonic() - middle:.1f} s")
    return root


def report(root: Path, label: str, rank: int = 0) -> dict[str, Any]:
    return json.loads((root / "out" / f"{label}.rank{rank}.json").read_text())  # type: ignore[no-any-return]


def saved_tensors(root: Path, label: str) -> dict[str, torch.Tensor]:
    return load_file(root / "out" / f"{label}.rank0.safetensors")


def assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                        ) -> None:
    assert sorted(found) == sorted(expected)
    for key, value in expected.items():
        assert found[key].dtype == value.dtype and found[key].shape == value.shape, key
        assert torch.equal(found[key], value), key


def test_two_ranks_write_a_manifest_of_the_layout_and_rank_indexes_only(jobs: Path) -> None:
    for step in (1, 2):
        checkpoint = jobs / "w2" / f"step-{step:08d}"
        manifest = manifest_of(checkpoint)
        assert (manifest["format_version"], manifest["world_size"]) == (4, 2)
        assert sorted(manifest["files"]) == ["layout.json", "rank-00000.json",
                                             "rank-00001.json"]
        for file, record in manifest["files"].items():
            payload = (checkpoint / file).read_bytes()
            assert record == {"nbytes": len(payload), "hash": digest(payload)}, file
        assert_no_tensor_rows(manifest)
        assert {name: obj.get("index") for name, obj in manifest["objects"].items()} == {
            "model": "layout.json", "optimizer": "layout.json", "progress": None,
            "rng.rank0": "rank-00000.json", "rng.rank1": "rank-00001.json"}
        assert (checkpoint / "manifest.json").stat().st_size <= manifest_bound(2)
        assert ckpts.verify(checkpoint) == []
    layout = json.loads((jobs / "w2" / "step-00000002" / "layout.json").read_bytes())
    assert layout["objects"]["model"]["tensors"]["0.weight"] == {
        "dtype": "F32", "shape": [6, 8], "mesh": [2], "placements": ["S0"]}
    shown = ckpts_command("show", jobs / "w2" / "step-00000002", "--tensors", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["objects"]["model"]["tensors"]["0.weight"] == {
        "dtype": "F32", "shape": [6, 8], "shards": 2,
        "files": ["model-rank00000.safetensors", "model-rank00001.safetensors"]}
    assert sorted(info["objects"]) == ["model", "optimizer", "progress", "rng.rank0",
                                       "rng.rank1"]
    w4 = manifest_of(jobs / "w4" / "step-00000002")  # the 4-rank save of the same state
    assert sorted(w4["files"]) == ["layout.json", *[f"rank-{r:05d}.json" for r in range(4)]]
    assert (jobs / "w4" / "step-00000002" / "manifest.json").stat().st_size <= manifest_bound(4)
    layout = json.loads((jobs / "w4" / "step-00000002" / "layout.json").read_bytes())
    assert layout["objects"]["model"]["tensors"]["2.weight"] == {
        "dtype": "F32", "shape": [5, 6], "mesh": [4], "placements": ["S0"]}  # rows 2, 2, 1, 0


def test_four_ranks_restore_the_two_rank_checkpoint_bit_exact(jobs: Path) -> None:
    assert_same_tensors(saved_tensors(jobs, "restored"), saved_tensors(jobs, "saved2"))
    expected = report(jobs, "saved2")
    for rank in range(4):
        restored = report(jobs, "restored", rank)
        assert restored["restored"] == 2
        assert restored["progress"] == expected["progress"]
        assert restored["param_groups"] == expected["param_groups"]


def test_one_process_restores_the_four_rank_checkpoint_bit_exact(jobs: Path,
                                                                 tmp_path: Path) -> None:
    run = shutil.copytree(jobs / "w4", tmp_path / "w4")
    torch.manual_seed(5)
    model = plain_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    progress = Progress()
    with ckpts.CheckpointManager(run) as manager:
        assert manager.restore(ckpts.TrainState(model=model, optimizer=optimizer,
                                                progress=progress)) == 2
    found = {f"model/{key}": value for key, value in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        found.update({f"optimizer/{index}/{name}": value for name, value in entry.items()})
    assert_same_tensors(found, saved_tensors(jobs, "saved2"))
    expected = report(jobs, "saved2")
    assert progress.state_dict() == expected["progress"]
    assert optimizer.param_groups[0]["lr"] == expected["param_groups"][0]["lr"]

    weights_only = plain_model()
    ckpts.load_weights(run / "step-00000002", weights_only)
    assert_same_tensors({f"model/{k}": v for k, v in weights_only.state_dict().items()},
                        {k: v for k, v in saved_tensors(jobs, "saved2").items()
                         if k.startswith("model/")})


def test_a_damaged_rank_index_makes_every_rank_fall_back(jobs: Path) -> None:
    damaged = jobs / "w2-damaged" / "step-00000002"
    assert_same_tensors(saved_tensors(jobs, "fallback"), saved_tensors(jobs, "saved1"))
    for rank in range(2):
        fallback = report(jobs, "fallback", rank)
        assert fallback["restored"] == 1, fallback
        assert fallback["progress"] == report(jobs, "saved1")["progress"]
        assert any(f"skipping corrupt checkpoint {damaged}" in warning
                   and "rank-00001.json" in warning for warning in fallback["warnings"]), \
            fallback["warnings"]


def test_one_process_falls_back_past_a_damaged_rank_index(
        jobs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = shutil.copytree(jobs / "w2-damaged", tmp_path / "w2-damaged")
    damaged = run / "step-00000002"
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"rank-00001\.json"):
        ckpts.load_weights(damaged, plain_model())
    model = plain_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    with caplog.at_level(logging.WARNING, logger="ckpts"), \
            ckpts.CheckpointManager(run) as manager:
        assert manager.restore(ckpts.TrainState(model=model, optimizer=optimizer,
                                                progress=Progress())) == 1
    assert f"skipping corrupt checkpoint {damaged}" in caplog.text
    assert_same_tensors({f"model/{k}": v for k, v in model.state_dict().items()},
                        {k: v for k, v in saved_tensors(jobs, "saved1").items()
                         if k.startswith("model/")})
    verified = ckpts_command("verify", run)
    assert verified.returncode != 0
    assert "step-00000002  FAILED" in verified.stdout and "rank-00001.json" in verified.stdout


def test_du_counts_a_many_rank_checkpoints_indexes_as_metadata_not_other() -> None:
    from ckpts.cli.inspection import bytes_by_kind
    from ckpts.storage import open_storage

    storage = open_storage(Path(__file__).parent / "data" / "v4-ranks-small")
    manifest = read_manifest(storage, "step-00000003")
    by_kind = bytes_by_kind(manifest, storage.sizes("step-00000003")["manifest.json"])
    assert "other" not in by_kind, by_kind
    on_disk = sum(storage.sizes("step-00000003").values())
    assert sum(by_kind.values()) == on_disk, (by_kind, on_disk)

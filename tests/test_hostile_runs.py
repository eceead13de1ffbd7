"""Hostile runs that once escaped the readers (issue 24): each is refused, fast, in small memory.

Every case starts from real checkpoints (saved by ``CheckpointManager``, or the
committed v3 and v4 fixtures of two ranks) and damages one thing, keeping every other
record true (file sizes and hashes), so the damage is what the readers meet:

- a 3 GB sparse ``manifest.json``: refused by its size, before it is read;
- a state tree, or a safetensors header, nested 600 deep: refused by depth (and a
  save never writes a tree the readers would refuse);
- a dict key that is a tuple holding a list: refused by every reader that rebuilds
  the state, and no trouble to the others;
- v3 shards that leave a gap in their tensor, overlap, or lie outside it: refused by
  the manifest check, instead of handing out uninitialized memory;
- format v4's index files of many ranks (the committed 2-rank fixture): a layout of
  another mesh, placement or rank, a rank's piece outside its file, an index that is
  not JSON or not an index, a world size of 10**9: each a CorruptCheckpointError naming
  the checkpoint and the file, from every reader (a restoring rank's planner too).

Format v4 keeps each object's tree and tensor rows in an index file the manifest
records by size and hash: a case that damages them damages the index, and records
its new size and hash in the manifest, so the readers meet the damage itself.

The CLI runs in subprocesses (``ckpts_session`` from test_cli, or the installed
script under a parent that reports its peak memory).
"""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import xxhash

import ckpts
from ckpts._checkpoint.sharded import read_on_ranks
from ckpts._format.index import Contents, read_manifest
from ckpts.storage import open_storage
from conftest import TinyNet, train_steps
from test_cli import CKPTS, Result, ckpts_session
from test_format_stability import V3_RUN, V4_RANKS_CHECKPOINT, load_maker
from v4_worker import change_index, rehash_index

MAX_PEAK = 600 * 2**20  # a reader's whole process, torch included; the manifest is 3 GB
HUGE = 3 * 2**30
DEPTH = 600
V3_STEP = "step-00000003"

# Runs a command and reports its exit code, output and peak memory: a fresh parent
# process, so no earlier child of the test process counts in RUSAGE_CHILDREN.
MEASURED = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=120)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
sys.stdout.write(json.dumps([done.returncode, done.stdout, done.stderr, peak]))
"""


def two_checkpoints(run: Path) -> list[Path]:
    """Steps 1 and 2 of a TinyNet trained with AdamW, saved by a real manager."""
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters())
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    saved = []
    with ckpts.CheckpointManager(run) as manager:
        for step in (1, 2):
            train_steps(model, optimizer, 1)
            checkpoint = manager.save(step, state, metrics={"loss": 1.0 / step})
            assert checkpoint is not None
            saved.append(Path(checkpoint.path))
    return saved


def fresh_state() -> ckpts.TrainState:
    model = TinyNet()
    return ckpts.TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()))


def measured(*args: str | Path) -> tuple[Result, int]:
    """Run the installed ``ckpts`` script; its result and its peak RSS in bytes."""
    process = subprocess.run([sys.executable, "-c", MEASURED, CKPTS, *map(str, args)],
                             capture_output=True, text=True, timeout=180)
    assert process.returncode == 0, process.stderr
    code, out, err, peak = json.loads(process.stdout)
    return Result(code, out, err), peak


def own_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dumps(value: Any, depth: int = DEPTH) -> str:
    """JSON text, where the string ``"DEEP"`` becomes lists nested ``depth`` deep."""
    return json.dumps(value).replace('"DEEP"', "[" * depth + "]" * depth)


def edit_manifest(checkpoint: Path, change: Callable[[dict[str, Any]], object]) -> None:
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_bytes())
    change(manifest)
    path.write_text(dumps(manifest))


def index_of(checkpoint: Path, obj: str) -> str:
    """The index file that holds object ``obj``'s tree, aliases and tensor rows (v4)."""
    name: str = json.loads((checkpoint / "manifest.json").read_bytes())["objects"][obj]["index"]
    return name


def edit_index(checkpoint: Path, obj: str, change: Callable[[dict[str, Any]], object]) -> str:
    """Change what object ``obj``'s index file says of it (its tree, aliases, tensor rows:
    format v4 keeps them there) and record the index's new size and hash in the manifest,
    as a consistent (hostile or buggy) writer would, so the readers meet the change
    itself, not a hash mismatch. Returns the index's name."""
    file = index_of(checkpoint, obj)
    index = json.loads((checkpoint / file).read_bytes())
    change(index["objects"][obj])
    (checkpoint / file).write_text(dumps(index))
    rehash_index(checkpoint, file)
    return file


def nested(depth: int) -> Any:
    """``[[[...]]]``, ``depth`` lists deep."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def hash_of(data: bytes) -> str:
    return "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def rewrite_header(checkpoint: Path, file: str, change: Callable[[dict[str, Any]], object],
                   depth: int = DEPTH) -> None:
    """Change a tensor file's safetensors header and make the manifest vouch for the new
    file: its size, its header's length and hash, and (in the objects' index files, each
    then vouched for too) every tensor's byte range (the tensors' bytes, and their
    hashes, stay as they were)."""
    path = checkpoint / file
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + length]), raw[8 + length:]
    change(header)
    encoded = dumps(header, depth).encode()
    encoded += b" " * (-len(encoded) % 8)
    new = struct.pack("<Q", len(encoded)) + encoded + body
    path.write_bytes(new)
    shift = len(encoded) - length

    def vouch(manifest: dict[str, Any]) -> None:
        manifest["files"][file] = {"nbytes": len(new), "header": 8 + len(encoded),
                                   "hash": hash_of(new[:8 + len(encoded)])}

    edit_manifest(checkpoint, vouch)

    def shift_rows(saved: dict[str, Any]) -> None:  # the tensor rows are in the indexes (v4)
        for entry in saved["tensors"].values():
            if entry["file"] == file:
                entry["offsets"] = [offset + shift for offset in entry["offsets"]]

    manifest = json.loads((checkpoint / "manifest.json").read_bytes())
    for name, obj in manifest["objects"].items():
        if "index" in obj:
            edit_index(checkpoint, name, shift_rows)


def assert_refused(result: Result, *fragments: str) -> None:
    """Exit code 2, one ``error:`` line naming each fragment, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ---------------------------------------------------------------- a 3 GB manifest


@pytest.fixture
def huge_manifest(tmp_path: Path) -> tuple[Path, Path]:
    """A run whose step 1 is intact and whose step 2 has a sparse 3 GB manifest."""
    run = tmp_path / "run"
    intact, huge = two_checkpoints(run)
    with open(huge / "manifest.json", "r+b") as manifest:
        manifest.truncate(HUGE)
    return intact, huge


def test_ls_lists_the_intact_checkpoints_and_skips_a_huge_manifest_unread(
        huge_manifest: tuple[Path, Path]) -> None:
    intact, huge = huge_manifest
    outputs = []
    for args in (["--json"], []):
        listed, peak = measured("ls", intact.parent, *args)
        assert listed.returncode == 0, listed.stderr
        assert peak < MAX_PEAK, f"ckpts ls peaked at {peak >> 20} MiB"
        assert f"ignoring {huge}: {huge}/manifest.json has {HUGE} bytes" in listed.stderr
        assert "Traceback" not in listed.stderr
        outputs.append(listed.stdout)
    rows = json.loads(outputs[0])
    assert [(row["step"], row["damaged"]) for row in rows] == [(1, None)]
    assert [line.split()[0] for line in outputs[1].splitlines()] == ["step", "1"]


@pytest.mark.parametrize("command", ["show", "verify"])
def test_show_and_verify_refuse_a_huge_manifest_unread(huge_manifest: tuple[Path, Path],
                                                       command: str) -> None:
    _, huge = huge_manifest
    result, peak = measured(command, huge)
    assert peak < MAX_PEAK, f"ckpts {command} peaked at {peak >> 20} MiB"
    message = f"{huge}/manifest.json has {HUGE} bytes"
    if command == "show":
        assert_refused(result, message)
    else:
        assert result.returncode == 1 and message in result.stdout, result
        assert "step-00000002  FAILED" in result.stdout


def test_the_library_refuses_a_huge_manifest_unread(huge_manifest: tuple[Path, Path]) -> None:
    intact, huge = huge_manifest
    before = own_peak()
    with pytest.raises(ckpts.CorruptCheckpointError, match=f"manifest.json has {HUGE} bytes"):
        ckpts.load_weights(huge, TinyNet())
    with pytest.raises(ckpts.CorruptCheckpointError, match=f"manifest.json has {HUGE} bytes"):
        ckpts.load_state(huge, "model")
    (problem,) = ckpts.verify(huge)
    assert f"manifest.json has {HUGE} bytes" in problem
    assert [c.step for c in ckpts.CheckpointManager(intact.parent).checkpoints()] == [1]
    assert ckpts.CheckpointManager(intact.parent).restore(fresh_state()) == 1
    assert own_peak() - before < MAX_PEAK, "a reader read the huge manifest"


# ---------------------------------------------------------------- nesting 600 deep


@pytest.fixture
def deep_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A run whose step 2 holds, in its optimizer's state, lists nested 600 deep."""
    intact, deep = two_checkpoints(tmp_path / "run")
    edit_index(deep, "optimizer", lambda saved: saved["tree"]["param_groups"][0].update(
        extra="DEEP"))
    return intact, deep


def test_a_state_tree_nested_600_deep_is_a_corrupt_checkpoint(
        deep_tree: tuple[Path, Path]) -> None:
    intact, deep = deep_tree
    manager = ckpts.CheckpointManager(intact.parent)
    refusal = r"object 'optimizer' nests deeper than \d+ levels"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # the refusal is the depth check's, not Python's
    try:
        with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
            ckpts.load_state(deep, "optimizer")
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        ckpts.load_state(deep, "optimizer")
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        manager.restore(fresh_state(), step=2)
    (problem,) = ckpts.verify(deep)
    assert str(deep) in problem and "'optimizer' nests deeper" in problem
    assert problem.startswith(f"{deep}/optimizer.index.json: "), problem
    # the readers of one object check just that object
    ckpts.load_weights(deep, TinyNet())
    assert set(ckpts.load_state(deep, "model")) == set(TinyNet().state_dict())
    assert manager.restore(fresh_state()) == 1
    listed, shown, compared = ckpts_session(["ls", intact.parent, "--json"], ["show", deep],
                                            ["diff", intact, deep])
    # `ls` reads the manifests alone (docs/format.md, "Readers"), and format v4 keeps the
    # trees in the index files: it lists step 2, whose manifest is intact
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert [row["step"] for row in json.loads(listed.stdout)] == [1, 2]
    assert_refused(shown, str(deep), "'optimizer' nests deeper")
    assert_refused(compared, str(deep), "'optimizer' nests deeper")


def test_a_state_tree_nested_too_deep_is_refused_when_saved(tmp_path: Path) -> None:
    """What the readers refuse is never written."""

    class Deep:
        def state_dict(self) -> dict[str, Any]:
            return {"tree": nested(DEPTH)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    with pytest.raises(ckpts.UnserializableStateError, match=r"key 'tree(\.0)+': the state nests"):
        ckpts.CheckpointManager(tmp_path / "run").save(1, ckpts.TrainState(deep=Deep()))
    assert ckpts.CheckpointManager(tmp_path / "run").checkpoints() == []


@pytest.mark.parametrize(("where", "depth"), [("metadata", DEPTH), ("entry", DEPTH),
                                              ("metadata", 100_000)])
def test_a_safetensors_header_nested_deep_is_a_corrupt_checkpoint(
        tmp_path: Path, where: str, depth: int) -> None:
    """600 deep: more than safetensors' own headers ever nest (3); 100,000: more than
    Python's json module parses."""
    intact, deep = two_checkpoints(tmp_path / "run")
    if where == "metadata":
        rewrite_header(deep, "model.safetensors",
                       lambda header: header["__metadata__"].update(deep="DEEP"), depth)
    else:
        rewrite_header(deep, "model.safetensors",
                       lambda header: header["fc1.weight"].update(deep="DEEP"), depth)
    manager = ckpts.CheckpointManager(intact.parent)
    refusal = "model.safetensors: "
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        ckpts.load_weights(deep, TinyNet())
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        ckpts.load_state(deep, "model")
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        manager.restore(fresh_state(), step=2)
    (problem,) = ckpts.verify(deep)
    assert f"{deep}/model.safetensors: " in problem


def test_the_deepest_state_that_saves_reads_back(tmp_path: Path) -> None:
    """The limit on depth the readers apply never refuses what a save wrote: each
    wrapping below adds levels to the typed JSON, until a save refuses."""
    wrappers: list[Callable[[Any], Any]] = [lambda v: {1: v}, lambda v: (v,), lambda v: [v],
                                            lambda v: {"k": v}, lambda v: {(1, (2,)): v}]
    state: Any = {"w": torch.tensor([1 + 2j], dtype=torch.complex128), "x": float("nan")}
    manager = ckpts.CheckpointManager(tmp_path / "run")
    deepest = None
    for step in range(1, 200):
        try:
            checkpoint = manager.save(step, ckpts.TrainState(deep=Holder(state)))
        except ckpts.UnserializableStateError:
            break
        assert checkpoint is not None
        deepest = (Path(checkpoint.path), state)
        state = wrappers[step % len(wrappers)](state)
    assert deepest is not None and 40 < step < 200
    with pytest.raises(ckpts.UnserializableStateError, match="the state nests too deep"):
        manager.save(step, ckpts.TrainState(deep=Holder(state)))
    path, saved = deepest
    assert ckpts.verify(path) == []
    assert same(ckpts.load_state(path, "deep"), saved)
    holder = Holder(None)
    assert manager.restore(ckpts.TrainState(deep=holder)) == step - 1
    assert same(holder.state, saved)


class Holder:
    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, tensors and NaN included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# ---------------------------------------------------------------- unhashable dict keys

UNHASHABLE_KEYS = {  # dict keys that decode to a tuple holding a list or a dict
    "list": {"__tuple__": [[1]]},
    "dict": {"__tuple__": [{"a": 1}]},
    "tagged-dict": {"__tuple__": [1, {"__dict__": [[2, 3]]}]},
}


@pytest.mark.parametrize("where", ["optimizer", "model"])
def test_a_state_tree_with_an_unhashable_dict_key_is_refused_by_every_reader_of_it(
        tmp_path: Path, where: str) -> None:
    """Only the readers that rebuild the object's state meet the key, and refuse it; the
    others (weights, verify, ls, show, diff) have no use for it and work."""
    intact, hostile = two_checkpoints(tmp_path / "run")
    manager = ckpts.CheckpointManager(intact.parent)
    for key in UNHASHABLE_KEYS.values():

        def plant(saved: dict[str, Any], key: Any = key) -> None:
            tree = saved["tree"]
            (tree["param_groups"][0] if where == "optimizer" else tree)["extra"] = {
                "__dict__": [[key, 2]]}

        edit_index(hostile, where, plant)
        with pytest.raises(ckpts.CorruptCheckpointError, match="unusable dict key"):
            ckpts.load_state(hostile, where)
        with pytest.raises(ckpts.CorruptCheckpointError, match="unusable dict key"):
            manager.restore(fresh_state(), step=2)
        assert manager.restore(fresh_state()) == 1
        ckpts.load_weights(hostile, TinyNet())  # reads the tensors only
        assert ckpts.verify(hostile) == []  # the files match the manifest
    listed, shown, compared = ckpts_session(["ls", intact.parent, "--json"], ["show", hostile],
                                            ["diff", intact, hostile, "--json"])
    assert [row["step"] for row in json.loads(listed.stdout)] == [1, 2]
    assert shown.returncode == 0, shown.stderr
    assert compared.returncode == 0, compared.stderr
    assert f"{where}." in json.loads(compared.stdout)["state_differences"][-1]["path"]


def test_metrics_with_an_unhashable_dict_key_are_refused_by_every_reader(
        tmp_path: Path) -> None:
    intact, hostile = two_checkpoints(tmp_path / "run")
    edit_manifest(hostile, lambda manifest: manifest.update(
        metrics={"__dict__": [[UNHASHABLE_KEYS["list"], 2]]}))
    refusal = "metric '__dict__' is not a number"
    for read in (lambda: ckpts.load_state(hostile, "model"),
                 lambda: ckpts.load_weights(hostile, TinyNet()),
                 lambda: ckpts.CheckpointManager(intact.parent).restore(fresh_state(), step=2),
                 lambda: ckpts.Checkpoint.from_directory(hostile)):
        with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
            read()
    (problem,) = ckpts.verify(hostile)
    assert refusal in problem
    listed, shown, compared = ckpts_session(["ls", intact.parent, "--json"], ["show", hostile],
                                            ["diff", intact, hostile])
    assert [row["step"] for row in json.loads(listed.stdout)] == [1]
    assert refusal in listed.stderr
    assert_refused(shown, str(hostile), refusal)
    assert_refused(compared, str(hostile), refusal)


# ---------------------------------------------------------------- v3 shards that do not tile


def first_weight(manifest: dict[str, Any]) -> dict[str, Any]:
    """The entry of the v3 fixture's ``first.weight``: [3, 4], rows 0-1 on rank 0, 2 on 1."""
    entry: dict[str, Any] = manifest["objects"]["model"]["tensors"]["first.weight"]
    return entry


SHARD_DAMAGE: dict[str, Callable[[dict[str, Any]], object]] = {
    # only the manifest changes: every shard still names true bytes under a true hash
    "gap": lambda entry: entry["shards"].pop(),  # row 2 of 3 is nowhere
    "gap-at-the-end": lambda entry: entry.update(shape=[4, 4]),  # row 3 of 4 is nowhere
    "overlap": lambda entry: entry["shards"][1].update(origin=[1, 0]),  # row 1 twice, no row 2
    "twice": lambda entry: entry["shards"].append(entry["shards"][0]),  # rows 0-1 twice
    "outside": lambda entry: entry["shards"][1].update(origin=[3, 0]),  # rows 3..4 of 3
}


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_v3_shards_that_do_not_tile_their_tensor_are_a_corrupt_checkpoint(
        tmp_path: Path, damage: str) -> None:
    run = Path(shutil.copytree(V3_RUN, tmp_path / "run"))
    checkpoint = run / V3_STEP
    edit_manifest(checkpoint, lambda manifest: SHARD_DAMAGE[damage](first_weight(manifest)))
    refusal = f"{checkpoint}/manifest.json: tensor 'first.weight' of object 'model' has"
    (problem,) = ckpts.verify(checkpoint)
    assert problem.startswith(refusal), problem
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        ckpts.load_state(checkpoint, "model")
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        ckpts.load_weights(checkpoint, load_maker().ShardedNet())
    model = load_maker().ShardedNet()
    state = ckpts.TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        ckpts.CheckpointManager(run).restore(state, step=3)
    ckpts.load_state(checkpoint, "optimizer")  # its tensors are whole


def write_sharded(checkpoint: Path, shape: list[int], boxes: list[tuple[list[int], list[int]]]
                  ) -> torch.Tensor:
    """A format v3 checkpoint of one object holding one float32 tensor ``w`` of ``shape``,
    saved in the pieces ``boxes`` (origin, size), each in a rank's file as saved ranks
    write them; returns the tensor."""
    whole = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    files, shards = {}, []
    for rank, (origin, size) in enumerate(boxes):
        piece = whole[tuple(slice(o, o + n) for o, n in zip(origin, size, strict=True))]
        data = piece.contiguous().numpy().tobytes()
        header = json.dumps({"__metadata__": {"format": "pt"}, "w": {
            "dtype": "F32", "shape": size, "data_offsets": [0, len(data)]}}).encode()
        header += b" " * (-len(header) % 8)
        prefix = struct.pack("<Q", len(header)) + header
        name = f"model-rank{rank:05d}.safetensors"
        (checkpoint / name).write_bytes(prefix + data)
        files[name] = {"nbytes": len(prefix) + len(data), "header": len(prefix),
                       "hash": hash_of(prefix), "rank": rank}
        shards.append({"file": name, "offsets": [len(prefix), len(prefix) + len(data)],
                       "hash": hash_of(data), "origin": origin, "size": size})
    manifest = {"format": "ckpts", "format_version": 3, "step": 1, "epoch": None,
                "created": "2026-12-01T00:00:00.000+00:00", "metrics": {}, "tags": [],
                "versions": {}, "world_size": len(boxes), "files": files,
                "objects": {"model": {"kind": "module", "class": "Net",
                                      "tree": {"w": {"__tensor__": "w"}},
                                      "tensors": {"w": {"dtype": "F32", "shape": shape,
                                                        "shards": shards}}}}}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return whole


@pytest.mark.parametrize(("shape", "boxes"), [
    ([4, 6], [([0, 0], [2, 3]), ([0, 3], [2, 3]), ([2, 0], [2, 3]), ([2, 3], [2, 3])]),  # 2-D
    ([3], [([0], [2]), ([2], [1]), ([3], [0])]),  # uneven, and a rank with nothing
    ([2, 0], [([0, 0], [1, 0]), ([1, 0], [1, 0])]),  # no elements
    ([], [([], [])]),  # a scalar, as one piece
])
def test_v3_shards_that_tile_their_tensor_read_back_whole(
        tmp_path: Path, shape: list[int], boxes: list[tuple[list[int], list[int]]]) -> None:
    checkpoint = tmp_path / "run" / "step-00000001"
    checkpoint.mkdir(parents=True)
    whole = write_sharded(checkpoint, shape, boxes)
    assert ckpts.verify(checkpoint) == []
    assert torch.equal(ckpts.load_state(checkpoint, "model")["w"], whole)


@pytest.mark.parametrize("boxes", [
    [([0, 0], [2, 3]), ([0, 3], [2, 3]), ([2, 0], [2, 3])],  # a quarter missing
    [([0, 0], [2, 3]), ([0, 3], [2, 3]), ([2, 0], [2, 3]), ([1, 3], [2, 3])],  # overlap
    [([0, 0], [2, 6]), ([2, 0], [2, 3]), ([2, 3], [2, 3]), ([0, 0], [2, 6])],  # twice
    [([0, 0], [4, 6]), ([0, 0], [4, 6])],  # whole, twice
])
def test_v3_shards_in_two_dimensions_that_do_not_tile_are_refused(
        tmp_path: Path, boxes: list[tuple[list[int], list[int]]]) -> None:
    checkpoint = tmp_path / "run" / "step-00000001"
    checkpoint.mkdir(parents=True)
    write_sharded(checkpoint, [4, 6], boxes)
    refusal = "tensor 'w' of object 'model' has shards that"
    (problem,) = ckpts.verify(checkpoint)
    assert refusal in problem
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        ckpts.load_state(checkpoint, "model")


# ---------------------------------------------------------------- format v4: many ranks' indexes

# tests/data/v4-ranks-small/ (a 2-rank FSDP2 model and its AdamW): manifest.json lists
# layout.json (the shared objects' trees and each tensor's layout) and rank-0000{0,1}.json
# (each rank's files, its pieces of the shared tensors and its RNG object). Each case
# below damages one of them; a damaged index is re-recorded in the manifest (its real size
# and hash, as a consistent writer would), so the readers meet the damage itself.
LAYOUT, RANK1, MANIFEST = "layout.json", "rank-00001.json", "manifest.json"
# a piece that does not fit: one process checks it in the tensor's entry (named after
# layout.json), a rank of a job in its rank's index (ckpts._checkpoint.rank_plan)
PIECE = (r"(layout\.json: |rank-\d{5}\.json: the piece of )tensor 'first\.weight' of "
         r"object 'model'")


def first_layout(index: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = index["objects"]["model"]["tensors"]["first.weight"]
    return entry  # {"dtype": "F32", "shape": [3, 4], "mesh": [2], "placements": ["S0"]}


def counts_layout(index: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = index["objects"]["model"]["tensors"]["counts"]
    return entry  # {"dtype": "I64", "shape": [4], "rank": 0}: saved whole by rank 0


def first_piece(index: dict[str, Any]) -> dict[str, Any]:
    piece: dict[str, Any] = index["pieces"]["model"]["first.weight"]
    return piece  # rank 1's row 2: {"file": "model-rank00001.safetensors", "offsets": [312, 328]}


def layout_says(problem: str, key: str = "first.weight") -> str:
    return re.escape(f"layout.json: tensor '{key}' of object 'model' {problem}")


def lacks(key: str) -> str:
    return re.escape(f"rank-00001.json lacks rank 1's piece of tensor '{key}' of object "
                     "'model', which layout.json says it saved")


V4_DAMAGE: dict[str, tuple[str, Callable[[dict[str, Any]], object] | bytes, str]] = {
    # case -> (file, its change (JSON) or its new bytes, the refusal: a regular expression)
    "mesh-of-three-ranks": (LAYOUT, lambda i: first_layout(i).update(mesh=[3]),
                            layout_says("has a mesh that is not the job's 2 ranks")),
    "mesh-of-no-ranks": (LAYOUT, lambda i: first_layout(i).update(mesh=[0]),
                         layout_says("has a mesh that is not the job's 2 ranks")),
    "mesh-of-a-billion-ranks": (LAYOUT, lambda i: first_layout(i).update(mesh=[10**9]),
                                layout_says("has a mesh that is not the job's 2 ranks")),
    "mesh-not-a-list": (LAYOUT, lambda i: first_layout(i).update(mesh="2"),
                        layout_says("has a mesh that is not the job's 2 ranks")),
    "placements-fewer-than-the-mesh": (
        LAYOUT, lambda i: first_layout(i).update(mesh=[1, 2], placements=["S0"]),
        layout_says("has a mesh that is not the job's 2 ranks")),
    "placements-a-string": (LAYOUT, lambda i: first_layout(i).update(placements="S0"),
                            layout_says("has a mesh that is not the job's 2 ranks")),
    "placement-of-a-missing-dimension": (LAYOUT, lambda i: first_layout(i).update(
        placements=["S5"]), layout_says("has an unknown placement 'S5'")),
    "placement-not-a-string": (LAYOUT, lambda i: first_layout(i).update(placements=[0]),
                               layout_says("has an unknown placement 0")),
    "placement-a-list": (LAYOUT, lambda i: first_layout(i).update(placements=[["S0"]]),
                         layout_says("has an unknown placement")),
    "placement-of-a-negative-dimension": (LAYOUT, lambda i: first_layout(i).update(
        placements=["S-1"]), layout_says("has an unknown placement 'S-1'")),
    "placement-with-a-superscript-digit": (LAYOUT, lambda i: first_layout(i).update(
        placements=["S\u00b2"]), layout_says("has an unknown placement")),
    "placement-with-an-arabic-digit": (LAYOUT, lambda i: first_layout(i).update(
        placements=["S\u0661"]), f"({layout_says('has an unknown placement')}|{PIECE})"),
    "whole-tensor-of-rank-two": (LAYOUT, lambda i: counts_layout(i).update(rank=2),
                                 layout_says("names rank 2, outside the job's 2", "counts")),
    "whole-tensor-of-rank-minus-one": (
        LAYOUT, lambda i: counts_layout(i).update(rank=-1),
        layout_says("names rank -1, outside the job's 2", "counts")),
    "whole-tensor-of-rank-true": (LAYOUT, lambda i: counts_layout(i).update(rank=True),
                                  layout_says("names rank True", "counts")),
    "whole-tensor-of-rank-a-string": (LAYOUT, lambda i: counts_layout(i).update(rank="0"),
                                      layout_says("names rank '0'", "counts")),
    "whole-tensor-of-a-rank-without-it": (LAYOUT, lambda i: counts_layout(i).update(rank=1),
                                          lacks("counts")),
    "no-dtype": (LAYOUT, lambda i: first_layout(i).pop("dtype"), layout_says("has no known dtype")),
    "unknown-dtype": (LAYOUT, lambda i: first_layout(i).update(dtype="F4"),
                      f"({layout_says('has a')}|{PIECE})"),
    "huge-shape": (LAYOUT, lambda i: first_layout(i).update(shape=[10**12, 10**12]), PIECE),
    "shape-a-string": (LAYOUT, lambda i: first_layout(i).update(shape="3x4"),
                       layout_says("has no valid shape")),
    "layout-entry-a-list": (LAYOUT, lambda i: i["objects"]["model"]["tensors"].update(
        {"first.weight": []}), layout_says("has no valid shape")),
    "layout-tensors-a-list": (LAYOUT, lambda i: i["objects"]["model"].update(tensors=[]),
                              re.escape("layout.json does not describe object 'model'")),
    "layout-without-the-model": (LAYOUT, lambda i: i["objects"].pop("model"),
                                 re.escape("layout.json does not describe object 'model'")),
    "layout-objects-a-list": (LAYOUT, lambda i: i.update(objects=[]),
                              re.escape("layout.json is not a ckpts index")),
    "layout-not-utf8": (LAYOUT, b'{"objects": \xff}', re.escape("layout.json is not a valid JSON")),
    "layout-a-json-list": (LAYOUT, b"[1, 2]\n", re.escape("layout.json is not a ckpts index")),
    "layout-nested-100000-deep": (LAYOUT, b"[" * 100_000 + b"]" * 100_000,
                                  re.escape("layout.json is not a valid JSON")),
    # rank-00001.json: rank 1's files and pieces
    "piece-past-the-end-of-its-file": (RANK1, lambda i: first_piece(i).update(
        offsets=[312, 10**6]), PIECE),
    "piece-beyond-its-file": (RANK1, lambda i: first_piece(i).update(
        offsets=[10**6, 10**6 + 16]), PIECE),
    "piece-offsets-reversed": (RANK1, lambda i: first_piece(i).update(offsets=[328, 312]),
                               PIECE),
    "piece-of-another-size": (RANK1, lambda i: first_piece(i).update(offsets=[312, 332]),
                              PIECE),
    "piece-in-the-header": (RANK1, lambda i: first_piece(i).update(offsets=[0, 16]), PIECE),
    "piece-in-an-unlisted-file": (RANK1, lambda i: first_piece(i).update(
        file="nope.safetensors"), PIECE),
    "piece-blocks-not-strings": (RANK1, lambda i: first_piece(i).update(blocks=[1]), PIECE),
    "piece-with-too-many-blocks": (RANK1, lambda i: first_piece(i).update(blocks=["a", "b"]),
                                   PIECE),
    "piece-hash-an-int": (RANK1, lambda i: first_piece(i).update(hash=5),
                          lacks("first.weight")),
    "piece-missing": (RANK1, lambda i: i["pieces"]["model"].pop("first.weight"),
                      lacks("first.weight")),
    "piece-a-list": (RANK1, lambda i: i["pieces"]["model"].update({"first.weight": []}),
                     lacks("first.weight")),
    "pieces-of-the-model-a-list": (RANK1, lambda i: i["pieces"].update(model=[]),
                                   re.escape("rank-00001.json")),
    "pieces-a-list": (RANK1, lambda i: i.update(pieces=[]),
                      re.escape("rank-00001.json is not a ckpts index")),
    "file-record-malformed": (RANK1, lambda i: i["files"]["model-rank00001.safetensors"].update(
        nbytes=-1), re.escape("rank-00001.json: file record for 'model-rank00001.safetensors' "
                              "is malformed")),
    "file-name-leaving-the-checkpoint": (
        RANK1, lambda i: i["files"].update({"../x": {"nbytes": 1, "hash": "xxh3_128:0"}}),
        re.escape("rank-00001.json: file name '../x' is not a plain name")),
    "file-recorded-otherwise-than-its-rank-does": (
        RANK1, lambda i: i["files"].update({"model-rank00000.safetensors": {
            "nbytes": 1, "hash": "xxh3_128:0"}}),
        r"rank-0000[01]\.json records model-rank00000\.safetensors, which another index "
        r"records otherwise"),
    "rank-objects-a-list": (RANK1, lambda i: i.update(objects=[]),
                            re.escape("rank-00001.json is not a ckpts index")),
    "rank-index-emptied": (RANK1, lambda i: i.clear(), lacks("first.weight")),
    "rank-index-not-utf8": (RANK1, b"\xff\xfe", re.escape("rank-00001.json is not a valid JSON")),
    "rank-index-a-json-string": (RANK1, b'"pieces"',
                                 re.escape("rank-00001.json is not a ckpts index")),
    "rank-index-nested-100000-deep": (RANK1, b'{"pieces": ' + b"[" * 100_000 + b"]" * 100_000
                                      + b"}", re.escape("rank-00001.json is not a valid JSON")),
    # manifest.json
    "world-size-of-a-billion": (MANIFEST, lambda m: m.update(
        world_size=10**9), re.escape("manifest.json: world_size 1000000000 does not match "
                                     "the ranks' index files it lists")),
    "world-size-of-three": (MANIFEST, lambda m: m.update(world_size=3),
                            re.escape("manifest.json: world_size 3 does not match")),
    "world-size-zero": (MANIFEST, lambda m: m.update(world_size=0),
                        re.escape("manifest.json: world_size 0 does not match")),
    "world-size-a-string": (MANIFEST, lambda m: m.update(world_size="2"),
                            re.escape("manifest.json: world_size 2 does not match")),
    "world-size-of-one": (MANIFEST, lambda m: m.update(world_size=1),
                          layout_says("has a mesh that is not the job's 1 ranks")),
    "index-not-listed": (MANIFEST, lambda m: m["objects"]["model"].update(index="nope.json"),
                         re.escape("manifest.json: object 'model' names an index 'nope.json' "
                                   "that the manifest does not list")),
    "index-a-data-file": (MANIFEST, lambda m: m["objects"]["model"].update(
        index="model-rank00000.safetensors"), re.escape(
        "manifest.json: object 'model' names an index 'model-rank00000.safetensors'")),
    "index-of-a-rank": (MANIFEST, lambda m: m["objects"]["model"].update(index=RANK1),
                        re.escape("rank-00001.json does not describe object 'model'")),
    "index-a-list": (MANIFEST, lambda m: m["objects"]["model"].update(index=[LAYOUT]),
                     re.escape("manifest.json: object 'model'")),
    "layout-not-listed": (MANIFEST, lambda m: m["files"].pop(LAYOUT), re.escape(
        "manifest.json: object 'model' names an index 'layout.json' that the manifest does "
        "not list")),
    "rank-index-not-listed": (MANIFEST, lambda m: m["files"].pop(RANK1), re.escape(
        "manifest.json: object 'rng.rank1' names an index 'rank-00001.json'")),
    "rank-index-recorded-with-another-hash": (
        MANIFEST, lambda m: m["files"][RANK1].update(hash="xxh3_128:0"),
        re.escape("rank-00001.json differs from the manifest's record of it")),
}
V4_RESTORE_REFUSES: dict[str, tuple[type[ckpts.CheckpointError], str]] = {
    # a world size of 1 makes the per-rank objects rng.rank0 and rng.rank1 foreign ones
    "world-size-of-one": (ckpts.IncompatibleStateError, "rng.rank1"),
}


def damage_v4(checkpoint: Path, case: str) -> None:
    file, change, _ = V4_DAMAGE[case]
    if isinstance(change, bytes):
        (checkpoint / file).write_bytes(change)
        rehash_index(checkpoint, file)
    elif file == MANIFEST:
        edit_manifest(checkpoint, change)
    else:
        change_index(checkpoint, file, change)


def v4_ranks_copy(root: Path) -> Path:
    """A copy of the committed 2-rank v4 checkpoint, in a run of its own."""
    return Path(shutil.copytree(V4_RANKS_CHECKPOINT, root / "run" / V4_RANKS_CHECKPOINT.name))


def read_as_a_rank(checkpoint: Path) -> dict[tuple[str, str], torch.Tensor]:
    """What a rank of a job restoring ``checkpoint`` reads, in this process: the shared
    objects' layouts, unlocated, and the pieces its tensors need (here each tensor whole:
    every piece), planned from the layouts and read from the ranks' indexes
    (ckpts._checkpoint.sharded.read_on_ranks)."""
    storage = open_storage(checkpoint.parent)
    contents = Contents(storage, checkpoint.name,
                        read_manifest(storage, checkpoint.name, tensor_entries=False))
    entries = {(name, key): entry for name in ("model", "optimizer")
               for key, entry in contents.object(name, located=False)["tensors"].items()}
    return read_on_ranks(storage, contents, SimpleNamespace(on_this_host=1), {}, entries)


def v4_state() -> ckpts.TrainState:
    model = load_maker().ShardedNet()
    return ckpts.TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()))


def test_the_readers_of_the_intact_two_rank_v4_checkpoint(tmp_path: Path) -> None:
    """The ground of the cases below: undamaged, the copy reads."""
    checkpoint = v4_ranks_copy(tmp_path)
    assert ckpts.verify(checkpoint) == []
    ckpts.load_weights(checkpoint, load_maker().ShardedNet())
    assert torch.equal(read_as_a_rank(checkpoint)[("model", "first.weight")],
                       ckpts.load_state(checkpoint, "model")["first.weight"])
    assert ckpts.CheckpointManager(checkpoint.parent).restore(v4_state(), step=3) == 3


@pytest.mark.parametrize("case", list(V4_DAMAGE))
def test_a_hostile_index_of_many_ranks_is_a_corrupt_checkpoint_naming_the_file(
        tmp_path: Path, case: str) -> None:
    """Every reader refuses it with a CorruptCheckpointError naming the checkpoint and
    the file, in well under a second (a world size of 10**9 is not looped over)."""
    checkpoint = v4_ranks_copy(tmp_path)
    damage_v4(checkpoint, case)
    refusal = re.escape(f"{checkpoint}/") + V4_DAMAGE[case][2]
    manager = ckpts.CheckpointManager(checkpoint.parent)
    restore_refuses = V4_RESTORE_REFUSES.get(case, (ckpts.CorruptCheckpointError, refusal))
    readers: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: ckpts.load_weights(checkpoint, load_maker().ShardedNet()),
         ckpts.CorruptCheckpointError, refusal),
        (lambda: ckpts.load_state(checkpoint, "model"), ckpts.CorruptCheckpointError, refusal),
        (lambda: manager.restore(v4_state(), step=3), *restore_refuses),
        (lambda: read_as_a_rank(checkpoint), ckpts.CorruptCheckpointError, refusal),
    ]
    started = time.monotonic()
    problems = ckpts.verify(checkpoint)
    assert problems and re.search(refusal, problems[0]), problems
    for read, error, match in readers:
        with pytest.raises(error, match=match):
            read()
    assert time.monotonic() - started < 20, "a reader took seconds over a small checkpoint"


def test_a_piece_outside_its_file_is_blamed_on_its_ranks_index(tmp_path: Path) -> None:
    checkpoint = v4_ranks_copy(tmp_path)
    damage_v4(checkpoint, "piece-past-the-end-of-its-file")
    refusal = re.escape(f"{checkpoint}/rank-00001.json")
    (problem,) = ckpts.verify(checkpoint)
    assert re.match(refusal, problem), problem
    with pytest.raises(ckpts.CorruptCheckpointError, match=refusal):
        ckpts.load_state(checkpoint, "model")


def test_a_layout_over_a_mesh_of_5001_dimensions_is_read_or_refused(tmp_path: Path) -> None:
    """``[1] * 5000 + [2]`` is the job's 2 ranks: a layout ckpts never writes, read right
    (the same values) or refused, never a RecursionError (a restoring rank's planner)."""
    checkpoint = v4_ranks_copy(tmp_path)
    expected = ckpts.load_state(checkpoint, "model")["first.weight"]
    change_index(checkpoint, LAYOUT, lambda i: first_layout(i).update(
        mesh=[1] * 5000 + [2], placements=["R"] * 5000 + ["S0"]))
    for read in (lambda: ckpts.load_state(checkpoint, "model")["first.weight"],
                 lambda: read_as_a_rank(checkpoint)[("model", "first.weight")]):
        try:
            value = read()
        except ckpts.CorruptCheckpointError as e:
            refusal = str(e)
            assert refusal.startswith(f"{checkpoint}/layout.json"), refusal
        else:
            assert torch.equal(value, expected)


def test_the_cli_refuses_each_hostile_index_of_many_ranks(tmp_path: Path) -> None:
    """``show``, ``diff`` and ``verify`` (one process for every case): exit 2 (``verify``:
    1) with the refusal, never a traceback; ``ls`` reads the manifests alone and lists a
    checkpoint or skips it, never crashes."""
    cases = list(V4_DAMAGE)
    checkpoints = {}
    for case in cases:
        checkpoints[case] = v4_ranks_copy(tmp_path / case)
        damage_v4(checkpoints[case], case)
    commands = [[command, *args] for case in cases for command, *args in (
        ["show", checkpoints[case]], ["diff", V4_RANKS_CHECKPOINT, checkpoints[case]],
        ["verify", checkpoints[case]], ["ls", checkpoints[case].parent, "--json"])]
    results = iter(ckpts_session(*commands))
    for case in cases:
        refusal = re.escape(f"{checkpoints[case]}/") + V4_DAMAGE[case][2]
        shown, compared, verified, listed = (next(results) for _ in range(4))
        for result in (shown, compared):
            assert_refused(result)
            assert re.search(refusal, result.stderr), (case, result.stderr)
        assert verified.returncode == 1, (case, verified)
        assert re.search(refusal, verified.stdout), (case, verified.stdout)
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, (case, listed)

"""Hostile runs that once escaped the readers (issue 24): each is refused, fast, in small memory.

Every case starts from real checkpoints (saved by ``CheckpointManager``, or the
committed v3 fixture of two ranks) and damages one thing, keeping every other
record true (file sizes and hashes), so the damage is what the readers meet:

- a 3 GB sparse ``manifest.json``: refused by its size, before it is read;
- a state tree, or a safetensors header, nested 600 deep: refused by depth (and a
  save never writes a tree the readers would refuse);
- a dict key that is a tuple holding a list: refused by every reader that rebuilds
  the state, and no trouble to the others;
- v3 shards that leave a gap in their tensor, overlap, or lie outside it: refused by
  the manifest check, instead of handing out uninitialized memory.

The CLI runs in subprocesses (``ckpts_session`` from test_cli, or the installed
script under a parent that reports its peak memory).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import ckpts
from conftest import TinyNet, train_steps
from test_cli import CKPTS, Result, ckpts_session
from test_format_stability import V3_RUN, load_maker
from v4_worker import rehash_index

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
    file: its size, its header's length and hash, and every tensor's byte range (the
    tensors' bytes, and their hashes, stay as they were)."""
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

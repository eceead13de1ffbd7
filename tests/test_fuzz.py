"""Hostile or damaged checkpoints raise only CheckpointError subclasses, never anything else.

Hypothesis damages a real committed checkpoint, then every reader runs on it:
``verify``, ``CheckpointManager.checkpoints()`` (which must skip a bad checkpoint,
never raise), ``restore(step=...)`` and ``load_weights``. Each must succeed or
raise a :class:`ckpts.CheckpointError`: a KeyError, TypeError, ValueError,
RecursionError, struct or JSON error leaking out is a bug, and so is a hang or a
huge allocation (the peak RSS is checked).

- Manifests: values replaced at random JSON paths (by arbitrary or hostile JSON:
  ``..``, absolute and nested file names, huge or negative sizes and shapes, codec
  tags of the wrong type), keys deleted or renamed, deep nesting, integers of
  thousands of digits, truncation and bytes that are not UTF-8.
- Index files (format v4 keeps each object's tree, aliases and tensor rows in
  ``<object>.index.json``): the same damage, and the manifest records the damaged
  index's real size and hash (mostly), so the index's content checks are reached.
- safetensors headers: any 8-byte length prefix, a header that is not UTF-8 or not
  a JSON object, entries with unknown dtypes, shapes that do not fit their bytes,
  offsets that overlap or fall outside the file, a claim of 100 GB. The manifest
  records the hostile file's real size and hash, so the header parser is reached.

About 100 examples each by default; ``CKPTS_LONG=1`` runs 2,000.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import resource
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import ckpts
from v4_worker import rehash_index

LONG = os.environ.get("CKPTS_LONG") == "1"
FUZZ = settings(
    max_examples=2000 if LONG else 100,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout; failures print a blob
    print_blob=True,
    # Shrinking these inputs can take minutes: CI reports the failing example as found
    # (every draw is printed), the long run shrinks it.
    phases=list(Phase) if LONG else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TIMEOUT = pytest.mark.timeout(3600 if LONG else 300)
STEP = 5
NAME = "step-00000005"
MAX_RSS_GROWTH = 1 << 30  # a reader that allocates what a hostile header claims fails this
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
               "F8_E4M3", "F8_E5M2"]
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64,
          "F64": torch.float64, "F16": torch.float16, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class FuzzNet(torch.nn.Module):
    """Float32 and bfloat16 parameters and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.scale = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
        self.register_buffer("seen", torch.zeros(2, dtype=torch.int64))


class Extra:
    """A Stateful object whose tree uses every codec tag (tuple, int keys, nan, tensor,
    and composite tensors: sparse and complex128)."""

    def __init__(self) -> None:
        self.state: dict[Any, Any] = {"count": 3, "pair": (1, 2.5), "by_id": {1: "a"},
                                      "nan": float("nan"), "table": torch.arange(4),
                                      "sparse": torch.tensor([[0.0, 1.0], [2.0, 0.0]]).to_sparse(),
                                      "phase": torch.tensor([1 + 1j, -2j], dtype=torch.complex128)}

    def state_dict(self) -> dict[Any, Any]:
        return self.state

    def load_state_dict(self, state: dict[Any, Any]) -> None:
        self.state = state


def build() -> tuple[ckpts.TrainState, FuzzNet]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FuzzNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return ckpts.TrainState(model=model, optimizer=optimizer, extra=Extra()), model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("fuzz-base") / "run")


def make_base(run: Path) -> Path:
    """A real committed checkpoint: model, AdamW with state, extra object, RNGs."""
    state, model = build()
    optimizer = state.objects["optimizer"]
    assert isinstance(optimizer, torch.optim.Optimizer)
    model.fc(torch.ones(1, 4)).sum().backward()
    model.scale.grad = torch.ones(3, dtype=torch.bfloat16)
    optimizer.step()
    ckpts.CheckpointManager(run).save(STEP, state, metrics={"loss": 0.5}, epoch=1)
    return run / NAME


@pytest.fixture(scope="module")
def peak_rss() -> Iterator[None]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MAX_RSS_GROWTH, f"peak memory grew by {grown >> 20} MiB while fuzzing"


def hash_of(data: bytes) -> str:
    return "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A minimal safetensors reader (the spec, nothing of ckpts) for the oracle."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = (8 + length + o for o in info["data_offsets"])
        raw = bytearray(data[begin:end])
        tensors[key] = torch.frombuffer(raw, dtype=torch.uint8).view(DTYPES[info["dtype"]]) \
            .reshape(info["shape"]) if raw else torch.empty(info["shape"],
                                                             dtype=DTYPES[info["dtype"]])
    return tensors


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Silence a logger (checkpoints() warns about each skipped checkpoint)."""
    log = logging.getLogger(logger)
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled


def outcome(call: Callable[[], object]) -> str:
    """'ok' or the CheckpointError's class name; anything else propagates (a bug)."""
    try:
        call()
    except ckpts.CheckpointError as e:
        return type(e).__name__
    return "ok"


def check_listing(run: Path) -> None:
    """``checkpoints()`` never raises, and skips a checkpoint it cannot describe truly."""
    for checkpoint in ckpts.CheckpointManager(run).checkpoints():
        assert checkpoint.step == STEP, f"listed as step {checkpoint.step!r} from {NAME}"
        assert isinstance(checkpoint.metrics, dict), checkpoint.metrics
        assert all(type(k) is str and type(v) in (int, float)
                   for k, v in checkpoint.metrics.items()), checkpoint.metrics
        assert checkpoint.epoch is None or type(checkpoint.epoch) is int, checkpoint.epoch
        assert all(type(tag) is str for tag in checkpoint.tags), checkpoint.tags


def exercise(run: Path) -> dict[str, str]:
    """Run every reader on a damaged run; returns each one's outcome."""
    directory = run / NAME
    results = {}
    with warnings.catch_warnings(), quiet("ckpts"):
        warnings.simplefilter("ignore")  # a warning is not the failure looked for here
        problems: list[str] = []
        results["verify"] = outcome(lambda: problems.extend(ckpts.verify(directory)))
        check_listing(run)
        state, _ = build()
        results["restore"] = outcome(
            lambda: ckpts.CheckpointManager(run).restore(state, step=STEP))
        _, model = build()
        results["load_weights"] = outcome(lambda: ckpts.load_weights(directory, model))
    if results["load_weights"] == "ok":
        # success must mean the model now holds exactly the file's tensors
        objects = json.loads((directory / "manifest.json").read_bytes())["objects"]
        name = "model" if "model" in objects else next(
            n for n, o in objects.items() if o.get("kind") == "module")
        saved = expanded(directory, name, objects[name])
        on_disk: dict[str, torch.Tensor] = {}
        for name in {info["file"] for info in saved["tensors"].values()}:
            on_disk |= read_tensors(directory / name)
        aliases = saved.get("aliases", {})
        for key, value in model.state_dict().items():
            stored = on_disk[aliases.get(key, key)]
            assert (stored.dtype, stored.shape) == (value.dtype, value.shape), key
            assert torch.equal(stored, value), f"load_weights succeeded but {key!r} differs"
    return results


def expanded(directory: Path, name: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Object ``name`` of a manifest with its tree, aliases and tensor rows: from its index
    file (format v4, ``"index"``), else the manifest's own (an object kept inline)."""
    if "index" not in obj:
        return obj
    index = json.loads((directory / obj["index"]).read_bytes())
    return {**obj, **index["objects"][name]}


def index_of(manifest: dict[str, Any], name: str) -> str:
    """The index file that holds object ``name``'s tree, aliases and tensor rows."""
    file: str = manifest["objects"][name]["index"]
    return file


def vouch_for(manifest: dict[str, Any], file: str, payload: bytes) -> None:
    """Record a (hostile) file's real size and hash in the manifest, as a consistent writer
    would: the readers then get past the hash check to its content."""
    manifest["files"][file] = {"nbytes": len(payload), "hash": hash_of(payload)}


def damaged_copy(base: Path, root: Path) -> Path:
    run = root / "run"
    shutil.copytree(base, run / NAME)
    return run


# ---------------------------------------------------------------- manifests

DEEP = "\0deep\0"
HUGE_INT = "\0huge-int\0"
FILE_NAMES = ["", ".", "..", "../model.safetensors", "/etc/passwd", "a/b", "a\\b", "x\0y",
              "manifest.json", "model.safetensors", "optimizer.safetensors", "x" * 300,
              "\udcff", "step-00000005"]
HOSTILE_VALUES = [
    -1, 0, 2**31, 2**63, 2**64 + 1, 10**30, -(10**30), 1e308, -0.0, True, None, *FILE_NAMES,
    "F32", "BF16", "I64", "F4", [10**12, 10**12], [-1], [2, 3], [2, 3.0], [[2]], [], {},
    [0, 10**15],
    {"__tensor__": "fc.weight"}, {"__tensor__": "nope"}, {"__tensor__": 5},
    {"__float__": "nan"}, {"__float__": "bad"}, {"__float__": [1]}, {"__tuple__": 3},
    {"__tuple__": [1, 2]}, {"__dict__": [[1]]}, {"__dict__": 5}, {"__dict__": [[[1], 2]]},
    {"__dict__": [[{"__tuple__": [1]}, 2]]}, {"nbytes": 1, "hash": "xxh3_128:0"},
    {"file": "model.safetensors", "dtype": "F32", "shape": [3]}, DEEP, HUGE_INT,
]
KEYS = ["__tensor__", "__float__", "__tuple__", "__dict__", "file", "dtype", "shape", "tensors",
        "tree", "aliases", "kind", "files", "nbytes", "hash", "step", "param_groups", "state",
        "params", "..", "/abs", "a/b", ""]
json_leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
               | st.text(max_size=12) | st.sampled_from(HOSTILE_VALUES).map(copy.deepcopy))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=10,
)
START_PATHS = [(), ("files",), ("objects",), ("objects", "model", "tensors"),
               ("objects", "model"), ("objects", "model", "index"),
               ("objects", "optimizer", "tree"), ("objects", "extra", "tree"),
               ("objects", "rng", "tree"), ("metrics",), ("tags",)]
INDEXES = {"model.index.json": "model", "optimizer.index.json": "optimizer",
           "extra.index.json": "extra", "rng.index.json": "rng"}


def index_starts(name: str) -> list[tuple[str, ...]]:
    """Where to start damaging the index of object ``name`` (format v4)."""
    return [(), ("objects",), ("objects", name), ("objects", name, "tree"),
            ("objects", name, "tensors"), ("objects", name, "aliases"), ("files",)]


def walk(data: st.DataObject, doc: Any,
         starts: list[tuple[str, ...]] | None = None) -> list[Any]:
    """A random path into ``doc``: a start among the interesting places, then random steps."""
    path: list[Any] = []
    node = doc
    for key in data.draw(st.sampled_from(starts or START_PATHS), label="start"):
        if not isinstance(node, dict) or key not in node:
            break
        path.append(key)
        node = node[key]
    while isinstance(node, (dict, list)) and node and data.draw(st.integers(0, 4)) != 0:
        key = data.draw(st.sampled_from(sorted(node)) if isinstance(node, dict)
                        else st.integers(0, len(node) - 1))
        path.append(key)
        node = node[key]
    return path


def parent_of(doc: Any, path: list[Any]) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


def mutate(data: st.DataObject, doc: dict[str, Any],
           starts: list[tuple[str, ...]] | None = None) -> None:
    """One damage at a random place: replace, delete, rename a key, or add a hostile file
    (an index may list files too: a rank's index lists its data files)."""
    path = walk(data, doc, starts)
    how = data.draw(st.sampled_from(["replace", "delete", "rename", "add-file"]), label="how")
    if how == "add-file":
        name = data.draw(st.sampled_from(FILE_NAMES) | st.text(max_size=300))
        doc.setdefault("files", {})
        if isinstance(doc["files"], dict) and isinstance(name, str):
            doc["files"][name] = data.draw(json_values | st.just({"nbytes": 0, "hash": "x"}))
        return
    if not path:
        if how == "replace":
            doc.clear()
            doc["format"] = data.draw(json_values)
        return
    parent, key = parent_of(doc, path), path[-1]
    if how == "replace":
        parent[key] = data.draw(json_values, label="value")
    elif how == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        new_key = data.draw(st.sampled_from(KEYS) | st.text(max_size=300), label="new key")
        parent[new_key] = parent.pop(key)


def manifest_bytes(data: st.DataObject, doc: dict[str, Any]) -> bytes:
    """Serialize, expanding the placeholders no json.dumps can write, then damage the text."""
    text = json.dumps(doc, indent=1)
    depth = data.draw(st.sampled_from([2, 100, 5_000, 200_000]), label="depth")
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    text = text.replace(json.dumps(HUGE_INT), "9" * data.draw(st.sampled_from([20, 5_000])))
    raw = text.encode()
    damage = data.draw(st.sampled_from(["none"] * 20 + ["truncate", "not-utf8", "bom", "nan",
                                                       "empty", "garbage"]), label="damage")
    if damage == "truncate":
        raw = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
    elif damage == "not-utf8":
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + b"\xff\xfe\xc3" + raw[at:]
    elif damage == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif damage == "nan":
        raw = raw.replace(b'"step": 5', b'"step": NaN').replace(b'"epoch": 1', b'"epoch": Infinity')
    elif damage == "empty":
        raw = b""
    elif damage == "garbage":
        raw = data.draw(st.binary(max_size=200))
    return raw


@TIMEOUT
@FUZZ
@given(data=st.data())
def test_a_damaged_manifest_raises_only_checkpoint_errors(base: Path, peak_rss: None,
                                                          data: st.DataObject) -> None:
    doc = json.loads((base / "manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        mutate(data, doc)
    with tempfile.TemporaryDirectory() as root:
        run = damaged_copy(base, Path(root))
        (run / NAME / "manifest.json").write_bytes(manifest_bytes(data, doc))
        exercise(run)


@TIMEOUT
@FUZZ
@given(data=st.data())
def test_a_damaged_index_raises_only_checkpoint_errors(base: Path, peak_rss: None,
                                                       data: st.DataObject) -> None:
    """What format v4 moved out of the manifest (trees, aliases, tensor rows), damaged
    where it now is: in an object's index file, which the manifest (mostly) vouches for."""
    file = data.draw(st.sampled_from(sorted(INDEXES)), label="index")
    doc = json.loads((base / file).read_bytes())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        mutate(data, doc, index_starts(INDEXES[file]))
    with tempfile.TemporaryDirectory() as root:
        run = damaged_copy(base, Path(root))
        (run / NAME / file).write_bytes(manifest_bytes(data, doc))
        if data.draw(st.integers(0, 9), label="manifest vouches for the index"):
            rehash_index(run / NAME, file)
        exercise(run)


# ---------------------------------------------------------------- safetensors headers

HOSTILE_NUMBERS = [0, 1, -1, 7, 8, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**11, -(2**63),
                   1.5, True, None, "8", [8]]
numbers = st.integers(-(2**64), 2**65) | st.sampled_from(HOSTILE_NUMBERS)


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


SAME_SIZE = {"F32": "I32", "I32": "F32", "BF16": "F16", "F16": "I16", "I16": "BF16",
             "I64": "F64", "F64": "I64", "U8": "I8", "I8": "BOOL", "BOOL": "U8"}


def same_numel_shapes(shape: Any) -> list[Any]:
    """Other shapes with as many elements (the byte count still fits the offsets)."""
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        return [[1]]
    numel = 1
    for dim in shape:
        numel *= dim
    return [[numel], [1, numel], [numel, 1], shape[::-1], [*shape, 1]]


@st.composite
def hostile_header(draw: st.DrawFn, header: dict[str, Any]) -> bytes:
    """A header: the real one with entries damaged, another JSON value, or random bytes."""
    kind = draw(st.sampled_from(["entries"] * 6 + ["not-object", "not-utf8", "100GB"]))
    if kind == "not-object":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "not-utf8":
        return draw(st.binary(min_size=1, max_size=64)) + b"\xff"
    header = copy.deepcopy(header)
    keys = sorted(k for k in header if k != "__metadata__")
    if kind == "100GB":
        header[draw(st.sampled_from(keys))] = {"dtype": "F32", "shape": [25_000, 1_000_000],
                                               "data_offsets": [0, 100_000_000_000]}
        return json.dumps(header).encode()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*keys, "__metadata__", "new"]))
        other = header.get(draw(st.sampled_from(keys)), {})
        entry = header.setdefault(key, {})
        if not isinstance(entry, dict):
            entry = header[key] = {}
        change = draw(st.sampled_from([
            "dtype", "same-size-dtype", "shape", "same-numel-shape", "offsets", "shift",
            "copy-other", "swap-offsets", "whole", "delete"]))
        if change == "dtype":
            entry["dtype"] = draw(st.sampled_from([*DTYPE_NAMES, "F4", "f32", "", 5, None]))
        elif change == "same-size-dtype":
            entry["dtype"] = SAME_SIZE.get(entry.get("dtype"), "F32")
        elif change == "shape":
            entry["shape"] = draw(st.lists(numbers, max_size=4) | st.sampled_from(
                [[10**12, 10**12], [0], [-6, -1], "6", [2**64]]))
        elif change == "same-numel-shape":
            entry["shape"] = draw(st.sampled_from(same_numel_shapes(entry.get("shape"))))
        elif change == "offsets":
            entry["data_offsets"] = draw(st.lists(numbers, max_size=3) | st.tuples(
                st.integers(0, 200), st.integers(0, 200)).map(list))
        elif change == "shift":
            offsets = entry.get("data_offsets")
            if isinstance(offsets, list) and all(type(o) is int for o in offsets):
                delta = draw(st.integers(-16, 16))
                entry["data_offsets"] = [o + delta for o in offsets]
        elif change == "copy-other" and isinstance(other, dict):
            entry.update(copy.deepcopy(other))  # two tensors over the same bytes
        elif change == "swap-offsets" and isinstance(other, dict):
            entry["data_offsets"], other["data_offsets"] = (other.get("data_offsets"),
                                                            entry.get("data_offsets"))
        elif change == "whole":
            header[key] = draw(json_values)
        elif change == "delete":
            header.pop(key, None)
    return json.dumps(header).encode()


@st.composite
def hostile_file(draw: st.DrawFn, original: bytes) -> bytes:
    header, body = split(original)
    raw_header = draw(hostile_header(header))
    pad = draw(st.sampled_from([0, -len(raw_header) % 8]))
    raw_header += b" " * pad
    length = draw(st.sampled_from(["exact"] * 10 + ["any", "huge", "past-end", "short", "zero"]))
    prefix = {
        "exact": len(raw_header),
        "any": draw(st.integers(0, 2**64 - 1)),
        "huge": 2**64 - 1,
        "past-end": len(raw_header) + len(body) + draw(st.integers(1, 10**9)),
        "short": max(0, len(raw_header) - draw(st.integers(1, 16))),
        "zero": 0,
    }[length]
    tail = draw(st.sampled_from(["same"] * 5 + ["truncated", "extended", "random"]))
    if tail == "truncated":
        body = body[: draw(st.integers(0, len(body)))]
    elif tail == "extended":
        body += draw(st.binary(min_size=1, max_size=64))
    elif tail == "random":
        body = draw(st.binary(max_size=len(body) + 16))
    prefix_bytes = struct.pack("<Q", prefix) if draw(st.integers(0, 9)) else \
        draw(st.binary(max_size=7))  # sometimes not even 8 bytes
    return prefix_bytes + raw_header + body


@TIMEOUT
@FUZZ
@given(data=st.data())
def test_a_hostile_safetensors_header_raises_only_checkpoint_errors(
    base: Path, peak_rss: None, data: st.DataObject
) -> None:
    target = data.draw(st.sampled_from(["model.safetensors", "optimizer.safetensors",
                                        "extra.safetensors"]), label="file")
    hostile = data.draw(hostile_file((base / target).read_bytes()), label="hostile file")
    manifest = json.loads((base / "manifest.json").read_bytes())
    # the manifest vouches for the hostile file, so every reader gets to its header
    manifest["files"][target] = {"nbytes": len(hostile), "hash": hash_of(hostile)}
    # the index of the object stored in the file (format v4 keeps its tensor rows there)
    index_file = next(f for f, name in INDEXES.items() if target == f"{name}.safetensors")
    index = json.loads((base / index_file).read_bytes())
    if data.draw(st.booleans(), label="index follows the header"):
        try:
            header, _ = split(hostile)
        except (struct.error, ValueError):
            header = {}
        rows = index["objects"][INDEXES[index_file]]["tensors"]
        assert all(row["file"] == target for row in rows.values())
        for key, info in header.items() if isinstance(header, dict) else ():
            if key in rows and isinstance(info, dict):
                rows[key].update({k: v for k, v in info.items() if k in ("dtype", "shape")})
    index_bytes = json.dumps(index, indent=1).encode()
    vouch_for(manifest, index_file, index_bytes)
    with tempfile.TemporaryDirectory() as root:
        run = damaged_copy(base, Path(root))
        (run / NAME / target).write_bytes(hostile)
        (run / NAME / index_file).write_bytes(index_bytes)
        (run / NAME / "manifest.json").write_text(json.dumps(manifest, indent=1))
        exercise(run)


# ---------------------------------------------------------------- known cases

DELETE = object()
KNOWN_DAMAGE: dict[str, tuple[tuple[Any, ...], Any]] = {
    # manifest path -> the value put there (DELETE removes the key); an object's tree,
    # aliases and tensors are in its index file (format v4): the path is the same there
    "tensor-file-is-a-list": (("objects", "model", "tensors", "fc.weight", "file"),
                              ["model.safetensors"]),
    "tensor-dtype-is-a-dict": (("objects", "model", "tensors", "fc.weight", "dtype"), {}),
    "alias-target-is-a-list": (("objects", "model", "aliases"), {"x": ["fc.weight"]}),
    "optimizer-tree-without-param-groups": (("objects", "optimizer", "tree", "param_groups"),
                                            DELETE),
    "optimizer-tree-is-a-list": (("objects", "optimizer", "tree"), []),
    "param-group-is-a-list": (("objects", "optimizer", "tree", "param_groups"), [[]]),
    "optimizer-state-is-a-list": (("objects", "optimizer", "tree", "state"), []),
    "object-without-tree": (("objects", "extra", "tree"), DELETE),
    "unknown-tensor-reference": (("objects", "extra", "tree", "count"), {"__tensor__": "nope"}),
    "tensor-reference-is-a-list": (("objects", "extra", "tree", "count"), {"__tensor__": [1]}),
    "float-tag-holds-a-list": (("objects", "extra", "tree", "count"), {"__float__": [1]}),
    "tuple-tag-holds-an-int": (("objects", "extra", "tree", "count"), {"__tuple__": 3}),
    "dict-tag-holds-an-int": (("objects", "extra", "tree", "count"), {"__dict__": 3}),
    "dict-tag-pair-of-one": (("objects", "extra", "tree", "count"), {"__dict__": [[1]]}),
    "dict-tag-unhashable-key": (("objects", "extra", "tree", "count"), {"__dict__": [[[1], 2]]}),
    "numpy-rng-pos-too-big": (("objects", "rng", "tree", "numpy", "pos"), 2**70),
    "file-name-too-long": (("files", "x" * 300), {"nbytes": 1, "hash": "xxh3_128:0"}),
    "metric-is-a-string": (("metrics",), {"loss": "abc"}),
    "step-differs-from-directory": (("step",), 10**30),
    "epoch-is-a-string": (("epoch",), "x"),
    "tag-is-an-int": (("tags",), [1]),
    "format-version-is-newer": (("format_version",), 2),
    "huge-shape": (("objects", "model", "tensors", "fc.weight", "shape"), [10**12, 10**12]),
    "negative-size": (("files", "model.safetensors", "nbytes"), -1),
    "parent-directory-file-name": (("files", ".."), {"nbytes": 1, "hash": "xxh3_128:0"}),
}
KNOWN_TEXT: dict[str, Callable[[str], str]] = {
    # manifest text -> damaged text
    "nesting-100000-deep": lambda text: text.replace(
        '"metrics": {', '"metrics": {"deep": ' + "[" * 100_000 + "]" * 100_000 + ", ", 1),
    "integer-of-5000-digits": lambda text: text.replace('"step": 5', '"step": ' + "9" * 5000),
    "nan-step": lambda text: text.replace('"step": 5', '"step": NaN'),
    "truncated": lambda text: text[: len(text) // 2],
}


OBJECT_FIELDS = ("tree", "tensors", "aliases")  # what format v4 keeps in an object's index
def in_index(path: tuple[Any, ...]) -> bool:
    """Whether format v4 keeps what ``path`` (of a v3 manifest) names in an index file."""
    return len(path) > 2 and path[0] == "objects" and path[2] in OBJECT_FIELDS


def put(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    parent = parent_of(doc, list(path))
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@pytest.mark.parametrize("case", [*KNOWN_DAMAGE, *KNOWN_TEXT])
def test_a_known_hostile_manifest_raises_only_checkpoint_errors(base: Path, tmp_path: Path,
                                                                case: str) -> None:
    """Each damage where format v4 keeps what it damages: the manifest, or the object's
    index file, which the manifest then vouches for (its real size and hash)."""
    doc = json.loads((base / "manifest.json").read_bytes())
    run = damaged_copy(base, tmp_path)
    if case in KNOWN_DAMAGE:
        path, value = KNOWN_DAMAGE[case]
        if in_index(path):
            file = index_of(doc, path[1])
            index = json.loads((base / file).read_bytes())
            put(index, path, value)
            payload = json.dumps(index, indent=1).encode()
            (run / NAME / file).write_bytes(payload)
            vouch_for(doc, file, payload)
        else:
            put(doc, path, value)
    text = json.dumps(doc, indent=1)
    (run / NAME / "manifest.json").write_text(KNOWN_TEXT.get(case, str)(text))
    exercise(run)


def kept_inline(directory: Path) -> dict[str, Any]:
    """The manifest with every object's tree, aliases and tensor rows moved in from its
    index (as v1-v3 kept them, and v4 keeps an object without tensors): v4 readers read
    such an object from the manifest."""
    manifest = json.loads((directory / "manifest.json").read_bytes())
    manifest["objects"] = {name: {k: v for k, v in expanded(directory, name, obj).items()
                                  if k != "index"}
                           for name, obj in manifest["objects"].items()}
    return manifest


def test_objects_kept_inline_in_a_v4_manifest_are_read(base: Path, tmp_path: Path) -> None:
    """The ground of the next test: undamaged, such a manifest reads as the original."""
    run = damaged_copy(base, tmp_path)
    (run / NAME / "manifest.json").write_text(json.dumps(kept_inline(base), indent=1))
    assert exercise(run) == {"verify": "ok", "restore": "ok", "load_weights": "ok"}


@pytest.mark.parametrize("case", [case for case, (path, _) in KNOWN_DAMAGE.items()
                                  if in_index(path)])
def test_a_known_hostile_object_kept_in_the_manifest_raises_only_checkpoint_errors(
        base: Path, tmp_path: Path, case: str) -> None:
    """The same damage to an object whose tree and tensor rows the manifest holds itself."""
    doc = kept_inline(base)
    path, value = KNOWN_DAMAGE[case]
    put(doc, path, value)
    run = damaged_copy(base, tmp_path)
    (run / NAME / "manifest.json").write_text(json.dumps(doc, indent=1))
    exercise(run)


# ---------------------------------------------------------------- format v4: index files


def write_index(directory: Path, file: str, payload: bytes) -> None:
    """Write index ``file`` and record its size and hash in the manifest."""
    (directory / file).write_bytes(payload)
    rehash_index(directory, file)


def edit_json(directory: Path, file: str, change: Callable[[Any], object]) -> None:
    """Change a JSON file of the checkpoint; an index is then vouched for by the manifest."""
    doc = json.loads((directory / file).read_bytes())
    change(doc)
    (directory / file).write_text(json.dumps(doc, indent=1))
    if file != "manifest.json":
        rehash_index(directory, file)


def model_index(change: Callable[[Any], object]) -> Callable[[Path], None]:
    return lambda directory: edit_json(directory, "model.index.json", change)


def manifest_of(change: Callable[[Any], object]) -> Callable[[Path], None]:
    return lambda directory: edit_json(directory, "manifest.json", change)


def model_entry(change: Callable[[Any], object]) -> Callable[[Path], None]:
    return manifest_of(lambda manifest: change(manifest["objects"]["model"]))


KNOWN_V4: dict[str, Callable[[Path], None]] = {
    # the index's bytes, vouched for by the manifest
    "index-not-utf8": lambda d: write_index(d, "model.index.json", b'{"objects": \xff\xfe}'),
    "index-a-json-list": lambda d: write_index(d, "model.index.json", b"[1, 2]\n"),
    "index-a-json-string": lambda d: write_index(d, "model.index.json", b'"objects"'),
    "index-null": lambda d: write_index(d, "model.index.json", b"null"),
    "index-nested-100000-deep": lambda d: write_index(
        d, "model.index.json", b'{"objects": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "index-empty": lambda d: write_index(d, "model.index.json", b""),
    # the index's content, vouched for by the manifest
    "index-objects-a-list": model_index(lambda index: index.update(objects=[])),
    "index-without-objects": model_index(lambda index: index.pop("objects")),
    "index-describes-another-object": model_index(lambda index: index.update(
        objects={"head": index["objects"]["model"]})),
    "index-object-a-list": model_index(lambda index: index["objects"].update(model=[])),
    "index-tensors-a-list": model_index(lambda index: index["objects"]["model"].update(
        tensors=[])),
    "index-tree-nested-deep": model_index(lambda index: index["objects"]["model"].update(
        tree={"deep": json.loads("[" * 900 + "]" * 900)})),
    "index-records-a-data-file-otherwise": model_index(lambda index: index.update(
        files={"model.safetensors": {"nbytes": 1, "hash": "xxh3_128:0"}})),
    "index-lists-a-file-outside": model_index(lambda index: index.update(
        files={"../model.safetensors": {"nbytes": 1, "hash": "xxh3_128:0"}})),
    "index-files-a-list": model_index(lambda index: index.update(files=[])),
    "index-pieces-a-list": model_index(lambda index: index.update(pieces=[])),
    # the manifest's record of the index
    "index-recorded-huge": manifest_of(lambda manifest: manifest["files"][
        "model.index.json"].update(nbytes=2**40)),
    "index-recorded-with-another-hash": manifest_of(lambda manifest: manifest["files"][
        "model.index.json"].update(hash="xxh3_128:0")),
    "index-missing": lambda d: (d / "model.index.json").unlink(),
    "index-not-listed": manifest_of(lambda manifest: manifest["files"].pop(
        "model.index.json")),
    # the manifest's "index" of an object
    "index-names-an-unlisted-file": model_entry(lambda obj: obj.update(
        index="nope.index.json")),
    "index-names-a-data-file": model_entry(lambda obj: obj.update(index="model.safetensors")),
    "index-names-another-objects-index": model_entry(lambda obj: obj.update(
        index="optimizer.index.json")),
    "index-names-the-parent-folder": model_entry(lambda obj: obj.update(index="..")),
    "index-an-int": model_entry(lambda obj: obj.update(index=5)),
    "index-null-name": model_entry(lambda obj: obj.update(index=None)),
    "index-a-list": model_entry(lambda obj: obj.update(index=["model.index.json"])),
    "index-a-dict": model_entry(lambda obj: obj.update(index={})),
    # the index is what v4 readers read: a tree beside it in the manifest is not used
    "inline-tree-beside-an-index": model_entry(lambda obj: obj.update(
        tree={"fc.weight": {"__tensor__": "nope"}}, tensors={})),
    # a world size no file backs (one process saved it: there is no layout.json)
    "world-size-of-a-billion": manifest_of(lambda manifest: manifest.update(
        world_size=10**9)),
    "world-size-zero": manifest_of(lambda manifest: manifest.update(world_size=0)),
    "world-size-a-string": manifest_of(lambda manifest: manifest.update(world_size="1")),
}


@pytest.mark.parametrize("case", list(KNOWN_V4))
def test_a_known_hostile_index_raises_only_checkpoint_errors(base: Path, tmp_path: Path,
                                                             case: str) -> None:
    run = damaged_copy(base, tmp_path)
    KNOWN_V4[case](run / NAME)
    results = exercise(run)
    if case.startswith("index"):  # each damages what load_weights reads: refused
        assert results["load_weights"] != "ok", results


def test_load_weights_refuses_a_file_whose_header_disagrees_with_the_manifest(
    base: Path, tmp_path: Path
) -> None:
    """The file says fc.weight is [4, 3], the manifest [3, 4]: same bytes, other tensor.

    The manifest records the file's real size and the hash of its header, and the
    model's index (format v4) its tensors' byte ranges and hashes (as a writer with
    another idea of the layout would), so only the header comparison can catch it.
    """
    run = damaged_copy(base, tmp_path)
    path = run / NAME / "model.safetensors"
    header, body = split(path.read_bytes())
    header["fc.weight"]["shape"] = [4, 3]
    raw_header = json.dumps(header).encode()
    hostile = struct.pack("<Q", len(raw_header)) + raw_header + body
    path.write_bytes(hostile)
    manifest = json.loads((run / NAME / "manifest.json").read_bytes())
    data_start = 8 + len(raw_header)
    shift = data_start - manifest["files"]["model.safetensors"]["header"]
    manifest["files"]["model.safetensors"] = {
        "nbytes": len(hostile), "header": data_start, "hash": hash_of(hostile[:data_start])}
    file = index_of(manifest, "model")
    index = json.loads((run / NAME / file).read_bytes())
    for entry in index["objects"]["model"]["tensors"].values():
        entry["offsets"] = [offset + shift for offset in entry["offsets"]]
    payload = json.dumps(index).encode()
    (run / NAME / file).write_bytes(payload)
    vouch_for(manifest, file, payload)
    (run / NAME / "manifest.json").write_text(json.dumps(manifest))
    assert any("fc.weight" in problem for problem in ckpts.verify(run / NAME))
    _, model = build()
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"fc\.weight"):
        ckpts.load_weights(run / NAME, model)

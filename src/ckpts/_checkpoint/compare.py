"""Comparing two checkpoints: every tensor, and every key of the non-tensor state.

``ckpts diff`` prints what :func:`compare_checkpoints` finds and ``ckpts
check-resume`` judges a resume by it. Each tensor key of each object is one of:
equal (the same bytes), changed (with the largest absolute difference, computed
in float64), dtype or shape changed, only in A, only in B. Two format-v2 tensors
whose recorded hashes match are equal without reading their data; the others are
read (and checked) to measure the difference. The non-tensor state
(the manifest's JSON tree of each object) is walked key by key, and each
differing leaf is named by its dotted path, object first (``run.config.out_dir``,
``optimizer.param_groups.0.lr``). Tensors are loaded one object at a time, so
memory peaks at the largest object of the two checkpoints; torch is imported only
when some tensors have to be read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckpts._format.catalog import Checkpoint, open_checkpoint
from ckpts._format.index import read_manifest
from ckpts._format.manifest import TensorEntry, manifest_tensor_entries
from ckpts.storage._port import Storage

if TYPE_CHECKING:
    import torch

TENSOR_STATUSES = ("equal", "changed", "dtype_changed", "shape_changed", "only_in_a", "only_in_b")
MAX_STATE_DIFFERENCES = 1000  # per object: enough to act on, bounded for huge trees
_SCALAR_RUN = 4  # a list of scalars with more differing items than this is one difference
_ABSENT = object()


@dataclass(frozen=True)
class TensorComparison:
    """How one tensor key compares between checkpoints A and B.

    Attributes:
        key: ``object/key``, e.g. ``model/fc.weight``.
        status: one of :data:`TENSOR_STATUSES`.
        a: dtype name and shape in A (None when absent).
        b: dtype name and shape in B (None when absent).
        max_abs_diff: for ``changed``, the largest absolute difference (None when
            a NaN faces a number).
    """

    key: str
    status: str
    a: tuple[str, tuple[int, ...]] | None
    b: tuple[str, tuple[int, ...]] | None
    max_abs_diff: float | None = None

    @property
    def object(self) -> str:
        """The object the tensor belongs to."""
        return self.key.split("/", 1)[0]


@dataclass(frozen=True)
class StateDifference:
    """One differing key of the non-tensor state, with both values shortened for reading.

    Attributes:
        path: dotted path, object first (``run.config.out_dir``).
        a: A's value as text (``-`` when absent).
        b: B's value as text (``-`` when absent).
    """

    path: str
    a: str
    b: str

    @property
    def object(self) -> str:
        """The object the key belongs to."""
        return self.path.split(".", 1)[0]


@dataclass
class CheckpointComparison:
    """Everything that differs between two checkpoints (and the equal tensors' count)."""

    tensors: list[TensorComparison] = field(default_factory=list)
    state: list[StateDifference] = field(default_factory=list)

    @property
    def differing_tensors(self) -> list[TensorComparison]:
        """The tensor rows whose status is not ``equal``."""
        return [row for row in self.tensors if row.status != "equal"]

    @property
    def differing_objects(self) -> list[str]:
        """Names of the objects with any difference, sorted."""
        return sorted({row.object for row in self.differing_tensors}
                      | {d.object for d in self.state})

    @property
    def equal(self) -> bool:
        """True when every tensor and every state key is equal."""
        return not self.state and not self.differing_tensors


def compare_checkpoints(
    a: Checkpoint | str | os.PathLike[str], b: Checkpoint | str | os.PathLike[str], *,
    objects: Collection[str] | None = None
) -> CheckpointComparison:
    """Compare two committed checkpoints (records, paths or URLs) object by object (or
    only ``objects``).

    Raises:
        NotACheckpointError: one is not a committed checkpoint.
        CorruptCheckpointError: a manifest or tensor is unreadable or fails its hash.
    """
    side_a, side_b = _Side.of(a), _Side.of(b)
    objects_a = side_a.manifest["objects"]
    objects_b = side_b.manifest["objects"]
    comparison = CheckpointComparison()
    for name in sorted(objects_a.keys() | objects_b.keys()):
        if objects is not None and name not in objects:
            continue
        obj_a, obj_b = objects_a.get(name), objects_b.get(name)
        comparison.tensors += compare_object_tensors(name, side_a, obj_a, side_b, obj_b)
        if obj_a is None or obj_b is None:
            comparison.state.append(StateDifference(
                name, "-" if obj_a is None else str(obj_a.get("class", "object")),
                "-" if obj_b is None else str(obj_b.get("class", "object"))))
        else:
            found: list[StateDifference] = []
            _tree_differences(obj_a.get("tree"), obj_b.get("tree"), name, found)
            comparison.state += found
    return comparison


@dataclass(frozen=True)
class _Side:
    """One checkpoint being compared: its storage, name and manifest."""

    storage: Storage
    name: str
    manifest: dict[str, Any]

    @classmethod
    def of(cls, checkpoint: Checkpoint | str | os.PathLike[str]) -> _Side:
        storage, name = open_checkpoint(checkpoint)
        return cls(storage, name, read_manifest(storage, name))

    def load(self, obj: str, entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
        if not entries:
            return {}
        from ckpts._tensors.reading import read_tensors  # imports torch: only when there is work

        read = read_tensors(self.storage, self.name, self.manifest["files"],
                            {(obj, key): entry for key, entry in entries.items()}, {},
                            fill_targets=False)
        return {key: tensor for (_, key), tensor in read.items()}


def compare_object_tensors(
    name: str, side_a: _Side, obj_a: dict[str, Any] | None, side_b: _Side,
    obj_b: dict[str, Any] | None
) -> list[TensorComparison]:
    """One row per tensor key of object ``name`` in either checkpoint, sorted by key."""
    entries_a = manifest_tensor_entries(obj_a) if obj_a is not None else {}
    entries_b = manifest_tensor_entries(obj_b) if obj_b is not None else {}
    comparable = [k for k in entries_a if k in entries_b
                  and _layout(entries_a[k]) == _layout(entries_b[k])]
    same_hash = {k for k in comparable
                 if entries_a[k].hash is not None and entries_a[k].hash == entries_b[k].hash}
    to_read = [k for k in comparable if k not in same_hash]
    tensors_a = side_a.load(name, {k: entries_a[k] for k in to_read})
    tensors_b = side_b.load(name, {k: entries_b[k] for k in to_read})
    rows = []
    for key in sorted(entries_a.keys() | entries_b.keys()):
        entry_a, entry_b = entries_a.get(key), entries_b.get(key)
        max_abs_diff = None
        if entry_a is None:
            status = "only_in_b"
        elif entry_b is None:
            status = "only_in_a"
        elif entry_a.dtype != entry_b.dtype:
            status = "dtype_changed"
        elif entry_a.shape != entry_b.shape:
            status = "shape_changed"
        elif key in same_hash:
            status = "equal"
        else:
            found = tensor_difference(tensors_a[key], tensors_b[key])
            status = "equal" if found is None else "changed"
            max_abs_diff = None if found is None or math.isnan(found) else found
        rows.append(TensorComparison(
            f"{name}/{key}", status, None if entry_a is None else _layout(entry_a),
            None if entry_b is None else _layout(entry_b), max_abs_diff))
    return rows


def tensor_difference(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """None when ``x`` and ``y`` hold the same bytes; else their largest absolute difference.

    Computed in float64; positions equal in value (same infinities, NaN on both
    sides) count as 0, so bit-only changes such as -0.0 vs 0.0 report 0.0. A NaN
    on one side only gives NaN.
    """
    import torch

    if torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
        return None
    x64, y64 = x.double(), y.double()
    same = (x64 == y64) | (x64.isnan() & y64.isnan())
    return float(torch.where(same, 0.0, (x64 - y64).abs()).max())


def _tree_differences(a: Any, b: Any, path: str, found: list[StateDifference]) -> None:
    """Append the differing leaves of two encoded JSON trees (see ``ckpts._format.codec``) to
    ``found``."""
    if len(found) >= MAX_STATE_DIFFERENCES or a == b:
        return
    children_a, children_b = _children(a), _children(b)
    if children_a is None or children_b is None:
        found.append(StateDifference(path, _show(a), _show(b)))
        return
    if _is_sequence(a) and _is_sequence(b) and len(children_a) == len(children_b) \
            and all(_children(v) is None for v in [*children_a.values(), *children_b.values()]):
        differing = sum(children_a[k] != children_b[k] for k in children_a)
        if differing > _SCALAR_RUN:  # e.g. python's RNG state: one line, not 624
            found.append(StateDifference(
                path, f"[{len(children_a)} items]",
                f"[{len(children_b)} items, {differing} differ]"))
            return
    for key in [*children_a, *(k for k in children_b if k not in children_a)]:
        _tree_differences(children_a.get(key, _ABSENT), children_b.get(key, _ABSENT),
                          f"{path}.{key}", found)


def _children(value: Any) -> dict[str, Any] | None:
    """The named children of a container in the encoded tree; None for a leaf."""
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if not isinstance(value, dict):
        return None
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tuple__" and isinstance(inner, list):
            return {str(i): v for i, v in enumerate(inner)}
        if tag == "__dict__" and isinstance(inner, list):
            pairs = [pair for pair in inner if isinstance(pair, list) and len(pair) == 2]
            return {k if isinstance(k, str) else json.dumps(k): v for k, v in pairs}
        if tag in ("__tensor__", "__float__"):
            return None
    return dict(value)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, list) or (isinstance(value, dict) and len(value) == 1
                                       and isinstance(value.get("__tuple__"), list))


def _show(value: Any, width: int = 60) -> str:
    """A leaf (or a container facing a leaf) as short text."""
    if value is _ABSENT:
        return "-"
    if isinstance(value, dict) and len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__float__":
            return str(inner)
        if tag == "__tensor__":
            return f"<tensor {inner}>"
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _layout(entry: TensorEntry) -> tuple[str, tuple[int, ...]]:
    return entry.dtype, entry.shape

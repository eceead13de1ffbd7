"""``ckpts diff``: compare two checkpoints tensor by tensor.

Every tensor key of every object (shown as ``object/key``) is one of: equal (the
same bytes), changed (with the largest absolute difference, computed in float64),
dtype or shape changed, only in A, only in B. Objects whose non-tensor state (the
manifest's JSON tree: hyperparameters, counters) differs are named too. Tensors
are loaded one object at a time, so memory peaks at the largest object of the two
checkpoints.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ckpts._manifest import TensorEntry, manifest_tensor_entries, read_manifest
from ckpts.cli._common import (
    JsonOption,
    checkpoint_dir,
    print_json,
    print_table,
    reports_errors,
    stdout,
)

if TYPE_CHECKING:
    import torch

LABELS = {  # status in JSON -> how the table says it
    "equal": "equal",
    "changed": "changed",
    "dtype_changed": "dtype changed",
    "shape_changed": "shape changed",
    "only_in_a": "only in A",
    "only_in_b": "only in B",
}


@reports_errors
def diff(
    a: Annotated[Path, typer.Argument(help="The first checkpoint directory.")],
    b: Annotated[Path, typer.Argument(help="The second checkpoint directory.")],
    as_json: JsonOption = False,
) -> None:
    """Compare two checkpoints' tensors key by key; list what differs, then a summary."""
    dir_a, dir_b = checkpoint_dir(a), checkpoint_dir(b)
    objects_a = read_manifest(dir_a)["objects"]
    objects_b = read_manifest(dir_b)["objects"]
    rows: list[dict[str, Any]] = []
    state_changed = []
    for name in sorted(objects_a.keys() | objects_b.keys()):
        obj_a, obj_b = objects_a.get(name), objects_b.get(name)
        rows += compare_object(name, dir_a, obj_a, dir_b, obj_b)
        if obj_a is not None and obj_b is not None and obj_a.get("tree") != obj_b.get("tree"):
            state_changed.append(name)
    counts = Counter(row["status"] for row in rows)
    if as_json:
        print_json({"a": str(dir_a), "b": str(dir_b), "tensors": rows,
                    "summary": {s: counts[s] for s in LABELS},
                    "state_changed": state_changed})
        return
    print_table(
        ([row["key"], LABELS[row["status"]], _describe(row["a"]), _describe(row["b"]),
          _describe_difference(row)] for row in rows if row["status"] != "equal"),
        header=["tensor", "status", "A", "B", "max abs diff"], right={4},
    )
    if state_changed:
        stdout.print(f"non-tensor state differs in: {', '.join(state_changed)}")
    parts = [f"{counts[s]} {label}" for s, label in LABELS.items() if counts[s] or s == "equal"]
    stdout.print(f"{len(rows)} tensors: {', '.join(parts)}")


def compare_object(
    name: str, dir_a: Path, obj_a: dict[str, Any] | None, dir_b: Path, obj_b: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per tensor key of object ``name`` in either checkpoint, sorted by key."""
    entries_a = manifest_tensor_entries(obj_a) if obj_a is not None else {}
    entries_b = manifest_tensor_entries(obj_b) if obj_b is not None else {}
    comparable = [k for k in entries_a if k in entries_b and _layout(entries_a[k])
                  == _layout(entries_b[k])]
    tensors_a = _load(dir_a, {k: entries_a[k] for k in comparable})
    tensors_b = _load(dir_b, {k: entries_b[k] for k in comparable})
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
        else:
            found = difference(tensors_a[key], tensors_b[key])
            status = "equal" if found is None else "changed"
            max_abs_diff = None if found is None or math.isnan(found) else found
        rows.append({"key": f"{name}/{key}", "status": status, "a": _layout_json(entry_a),
                     "b": _layout_json(entry_b), "max_abs_diff": max_abs_diff})
    return rows


def difference(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """None when ``x`` and ``y`` hold the same bytes; else their largest absolute difference.

    Computed in float64; positions equal in value (same infinities, NaN on both
    sides) count as 0, so bit-only changes such as -0.0 vs 0.0 report 0.0. A NaN
    on one side only gives NaN (null in JSON, "nan" in the table).
    """
    import torch

    if torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
        return None
    x64, y64 = x.double(), y.double()
    same = (x64 == y64) | (x64.isnan() & y64.isnan())
    return float(torch.where(same, 0.0, (x64 - y64).abs()).max())


def _load(directory: Path, entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    if not entries:
        return {}
    from ckpts._format import copy_tensors  # imports torch: only when there is work

    return copy_tensors(directory, entries, {})


def _layout(entry: TensorEntry) -> tuple[str, tuple[int, ...]]:
    return entry.dtype, entry.shape


def _layout_json(entry: TensorEntry | None) -> dict[str, Any] | None:
    return None if entry is None else {"dtype": entry.dtype, "shape": list(entry.shape)}


def _describe(layout: dict[str, Any] | None) -> str:
    return "-" if layout is None else f"{layout['dtype']}{layout['shape']}"


def _describe_difference(row: dict[str, Any]) -> str:
    if row["status"] != "changed":
        return ""
    return "nan" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.6g}"

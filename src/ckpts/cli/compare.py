"""``ckpts diff``: compare two checkpoints tensor by tensor and key by key.

Every tensor key of every object (shown as ``object/key``) is one of: equal (the
same bytes), changed (with the largest absolute difference, computed in float64),
dtype or shape changed, only in A, only in B. Each differing key of the
non-tensor state (the manifest's JSON tree: hyperparameters, counters) is named
by its dotted path, e.g. ``run.config.out_dir``. The comparison itself lives in
:mod:`ckpts._checkpoint.compare`, shared with ``ckpts check-resume``.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

import typer

from ckpts._checkpoint.compare import (
    TENSOR_STATUSES,
    StateDifference,
    TensorComparison,
    compare_checkpoints,
)
from ckpts.cli._common import (
    JsonOption,
    open_checkpoint_arg,
    print_json,
    print_table,
    printable,
    reports_errors,
    stdout,
)

LABELS = dict(zip(TENSOR_STATUSES, (  # status in JSON -> how the table says it
    "equal", "changed", "dtype changed", "shape changed", "only in A", "only in B"), strict=True))


@reports_errors
def diff(
    a: Annotated[str, typer.Argument(help="The first checkpoint: a directory or a URL.")],
    b: Annotated[str, typer.Argument(help="The second checkpoint: a directory or a URL.")],
    as_json: JsonOption = False,
) -> None:
    """Compare two checkpoints' tensors and non-tensor state key by key; list what differs."""
    storage_a, name_a = open_checkpoint_arg(a)
    storage_b, name_b = open_checkpoint_arg(b)
    where_a, where_b = storage_a.where(name_a), storage_b.where(name_b)
    comparison = compare_checkpoints(where_a, where_b)
    counts = Counter(row.status for row in comparison.tensors)
    state_changed = sorted({d.object for d in comparison.state})
    if as_json:
        print_json({"a": where_a, "b": where_b,
                    "tensors": [tensor_json(row) for row in comparison.tensors],
                    "summary": {s: counts[s] for s in LABELS},
                    "state_changed": state_changed,
                    "state_differences": [state_json(d) for d in comparison.state]})
        return
    print_tensor_differences(comparison.tensors)
    print_state_differences(comparison.state)
    parts = [f"{counts[s]} {label}" for s, label in LABELS.items() if counts[s] or s == "equal"]
    stdout.print(f"{len(comparison.tensors)} tensors: {', '.join(parts)}")


def print_tensor_differences(rows: list[TensorComparison], *, limit: int | None = None) -> None:
    """The table of differing tensors (at most ``limit`` rows, then how many more)."""
    differing = [row for row in rows if row.status != "equal"]
    shown = differing if limit is None else differing[:limit]
    print_table(
        ([row.key, LABELS[row.status], _describe(row.a), _describe(row.b),
          _describe_difference(row)] for row in shown),
        header=["tensor", "status", "A", "B", "max abs diff"], right={4},
    )
    if len(shown) < len(differing):
        stdout.print(f"... and {len(differing) - len(shown)} more differing tensors")


def print_state_differences(differences: list[StateDifference], *, limit: int = 20) -> None:
    """The differing non-tensor keys, one line each: ``path: A -> B``."""
    if not differences:
        return
    objects = sorted({d.object for d in differences})
    stdout.print(printable(f"non-tensor state differs in: {', '.join(objects)}"))
    for difference in differences[:limit]:
        stdout.print(printable(f"  {difference.path}: {difference.a} -> {difference.b}"))
    if len(differences) > limit:
        stdout.print(f"  ... and {len(differences) - limit} more keys")


def tensor_json(row: TensorComparison) -> dict[str, Any]:
    """A tensor row for ``--json`` output."""
    return {"key": row.key, "status": row.status, "a": _layout_json(row.a),
            "b": _layout_json(row.b), "max_abs_diff": row.max_abs_diff}


def state_json(difference: StateDifference) -> dict[str, str]:
    """A non-tensor difference for ``--json`` output."""
    return {"path": difference.path, "a": difference.a, "b": difference.b}


def _layout_json(layout: tuple[str, tuple[int, ...]] | None) -> dict[str, Any] | None:
    return None if layout is None else {"dtype": layout[0], "shape": list(layout[1])}


def _describe(layout: tuple[str, tuple[int, ...]] | None) -> str:
    return "-" if layout is None else f"{layout[0]}{list(layout[1])}"


def _describe_difference(row: TensorComparison) -> str:
    if row.status != "changed":
        return ""
    return "nan" if row.max_abs_diff is None else f"{row.max_abs_diff:.6g}"

"""A run's metrics history: one append-only JSON-lines file that outlives deleted checkpoints.

Retention deletes checkpoints, and with them their manifests and metrics. Plots and
reports still want to show those steps (faintly), so every commit and every
``add_metrics`` also appends one line to ``RUN/.ckpts-history.jsonl``::

    {"step": 500, "metrics": {"val_loss": 2.31, "acc": null}, "time": "2026-11-30T16:40:00+00:00"}

NaN is written as ``null`` (strict JSON). The storage appends each line whole (see
``append_history`` of ckpts.storage._local and ckpts.storage._fsspec); a line torn by a crash is
skipped on read like any other unreadable line. The history is a convenience: a
run without it (older runs, read-only copies) simply has no deleted steps to show.
No torch here.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from collections.abc import Mapping

from ckpts._format.catalog import metric_value
from ckpts.storage import open_storage
from ckpts.storage._port import HISTORY, Storage

log = logging.getLogger("ckpts")

def append(storage: Storage, step: int, metrics: Mapping[str, float]) -> None:
    """Record ``metrics`` for ``step`` in the run's history (nothing when ``metrics`` is empty).

    A failure to write is logged, never raised: the history must not break a save.
    """
    if not metrics:
        return
    record = {
        "step": step,
        "metrics": {name: float(v) if math.isfinite(v) else None for name, v in metrics.items()},
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    line = (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode()
    try:
        storage.append_history(line)
    except (OSError, ValueError) as e:
        log.warning("could not append to the metrics history of %s: %s", storage.location, e)


def read(run: Storage | str | os.PathLike[str]) -> dict[int, dict[str, float]]:
    """Every step's metrics as recorded, later records overriding earlier ones by name.

    Returns ``{}`` when the run has no history. Unreadable lines are skipped.
    """
    storage = open_storage(run)
    path = f"{storage.location}/{HISTORY}"
    try:
        text = storage.read_history().decode("utf-8", errors="replace")
    except OSError as e:
        log.warning("could not read the metrics history %s: %s", path, e)
        return {}
    steps: dict[int, dict[str, float]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parsed = _parse(line)
        if parsed is None:
            if line.strip():
                log.debug("%s:%d: skipping an unreadable line", path, number)
            continue
        step, metrics = parsed
        steps.setdefault(step, {}).update(metrics)
    return dict(sorted(steps.items()))


def _parse(line: str) -> tuple[int, dict[str, float]] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step, metrics = record.get("step"), record.get("metrics")
    if type(step) is not int or step < 0 or not isinstance(metrics, dict):
        return None
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        if value is None:
            clean[name] = math.nan
        elif type(value) in (int, float):
            clean[name] = metric_value(value)
    return step, clean

"""A run's metric curves and the checkpoint to ship: what ``plot`` and ``report`` draw (no torch).

A curve has one point per step that has the metric: committed checkpoints (from
their manifests) and steps retention has deleted (from the run's metrics history,
see :mod:`ckpts._run.history`), each marked ``best``, ``latest`` or ``pinned``. The
recommendation is the best *kept* checkpoint, with the reason in words, for
example ``step 1500: lowest val_loss (2.31) of 4 kept checkpoints; later steps
overfit by +8% (step 3000: 2.49)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ckpts._format.catalog import Checkpoint
from ckpts._run import history as _history
from ckpts._run.policy import Mode, rank_by
from ckpts.storage import open_storage
from ckpts.storage._port import Storage

# a later value this much worse (relative) than the best counts as overfitting, not noise
OVERFIT_THRESHOLD = 0.005


@dataclass(frozen=True)
class Point:
    """One step's value of a metric.

    Attributes:
        step: the training step.
        value: the metric (may be NaN).
        kept: a committed checkpoint exists for the step (False: deleted by
            retention, known from the history).
        markers: any of ``best``, ``latest``, ``pinned``.
    """

    step: int
    value: float
    kept: bool
    markers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Curve:
    """One metric of one run, ascending by step."""

    label: str
    metric: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Recommendation:
    """The kept checkpoint to ship, and why, in one sentence."""

    checkpoint: Checkpoint
    metric: str
    reason: str


def metric_curve(run: Storage | str | os.PathLike[str], metric: str, mode: Mode | None, *,
                 checkpoints: Sequence[Checkpoint], label: str | None = None) -> Curve:
    """The curve of ``metric`` in ``run``: its checkpoints' values, then deleted steps' values.

    Args:
        run: the run: a directory, a URL or a storage (its history is read, if any).
        metric: the metric name.
        mode: ``min`` or ``max``: which end is best; None: unknown, no point is
            marked ``best``.
        checkpoints: the run's committed checkpoints (``list_checkpoints(run)``).
        label: the curve's name in legends (default: the run directory's name).
    """
    ranked = rank_by(checkpoints, metric, mode) if mode is not None else []
    best_step = ranked[0].step if ranked and not math.isnan(ranked[0].metrics[metric]) else None
    latest_step = checkpoints[-1].step if checkpoints else None
    points: dict[int, Point] = {}
    for c in checkpoints:
        if metric not in c.metrics:
            continue
        markers = [name for name, on in (("best", c.step == best_step),
                                         ("latest", c.step == latest_step),
                                         ("pinned", bool(c.tags))) if on]
        points[c.step] = Point(c.step, c.metrics[metric], True, tuple(markers))
    committed = {c.step for c in checkpoints}
    storage = open_storage(run)
    for step, metrics in _history.read(storage).items():
        if step not in committed and metric in metrics:
            points[step] = Point(step, metrics[metric], False)
    default_label = run_name(storage)
    return Curve(label if label is not None else default_label, metric,
                 tuple(points[s] for s in sorted(points)))


def recommend(run: Storage | str | os.PathLike[str], metric: str, mode: Mode, *,
              checkpoints: Sequence[Checkpoint]) -> Recommendation | None:
    """The best intact kept checkpoint by ``metric`` and the reason; None if none has a
    value. A damaged checkpoint (as ``ckpts ls`` marks it) is never recommended."""
    valued = [c for c in rank_by(checkpoints, metric, mode) if not math.isnan(c.metrics[metric])]
    ranked = [c for c in valued if c.damaged is None]
    if not ranked:
        return None
    best = ranked[0]
    value = best.metrics[metric]
    extreme = "lowest" if mode == "min" else "highest"
    kept = sum(1 for c in checkpoints if metric in c.metrics)
    parts = [f"step {best.step}: {extreme} {metric} ({value:.4g}) of {kept} kept "
             f"checkpoint{'s' if kept != 1 else ''}"]
    curve = metric_curve(run, metric, mode, checkpoints=checkpoints)
    later = [p for p in curve.points if p.step > best.step and not math.isnan(p.value)]
    if not later:
        parts.append("it is the latest step, so the metric may still be improving")
    else:
        last = later[-1]
        worse = _relative_worsening(value, last.value, mode)
        if worse > OVERFIT_THRESHOLD:
            parts.append(f"later steps overfit by {_percent(worse)} "
                         f"(step {last.step}: {last.value:.4g})")
        else:
            parts.append(f"later steps are no better (step {last.step}: {last.value:.4g})")
    sign = 1.0 if mode == "min" else -1.0
    better_gone = [p for p in curve.points if not p.kept and not math.isnan(p.value)
                   and sign * p.value < sign * value]
    if better_gone:
        gone = min(better_gone, key=lambda p: sign * p.value)
        parts.append(f"deleted step {gone.step} scored better ({gone.value:.4g}) but its "
                     "weights are gone")
    damaged = valued[:valued.index(best)]  # ranked above it, all damaged
    if damaged:
        parts.append(f"damaged step {damaged[0].step} scored better "
                     f"({damaged[0].metrics[metric]:.4g}); `ckpts verify` says what is wrong")
    return Recommendation(best, metric, "; ".join(parts))


def _relative_worsening(best: float, later: float, mode: Mode) -> float:
    """How much worse ``later`` is than ``best``, relative to ``best`` (0 if not worse)."""
    delta = later - best if mode == "min" else best - later
    scale = abs(best) if best != 0 else 1.0
    return max(0.0, delta / scale)


def _percent(fraction: float) -> str:
    return f"+{fraction * 100:.0f}%" if fraction >= 0.01 else f"+{fraction * 100:.1f}%"


def run_name(storage: Storage) -> str:
    """The last part of a run's path or URL (``exp1`` for ``s3://bucket/runs/exp1``)."""
    return storage.location.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]

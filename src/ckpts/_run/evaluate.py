"""Post-hoc evaluation: run a function over a run's checkpoints and record what it returns.

``CheckpointManager.evaluate(fn, metrics=[...])``, the one entry point, visits the
chosen checkpoints in step order. For each, with ``model=`` given, it loads the
checkpoint's weights into that model (weights only, hash-checked, no optimizer bytes)
and calls ``fn(model)``; without ``model`` it calls ``fn(checkpoint)`` and ``fn``
loads what it needs. The
returned metrics are attached with ``manager.add_metrics``, one checkpoint at a
time, so an interrupted evaluation keeps what it finished.

Resuming: ``metrics`` names what ``fn`` returns. A checkpoint whose manifest already
has every one of those names is skipped, so running the same evaluation again
only visits the checkpoints it has not done (or that retention has not removed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ckpts._checkpoint.weights import load_weights
from ckpts._format.catalog import Checkpoint
from ckpts.errors import InvalidArgumentError, NotACheckpointError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ckpts")

# called after each checkpoint: (checkpoint, its new metrics or None when skipped, done, total)
EvaluationProgress = Callable[[Checkpoint, "Mapping[str, float] | None", int, int], None]


class Evaluated(Protocol):
    """The run being evaluated (a CheckpointManager): its checkpoints, and where the
    metrics go (its ``add_metrics`` re-applies retention too)."""

    directory: Path | str

    def checkpoints(self) -> list[Checkpoint]: ...

    def add_metrics(self, step: int, metrics: Mapping[str, float]) -> Checkpoint: ...


def evaluate(
    manager: Evaluated,
    fn: Callable[[Any], Mapping[str, float]],
    *,
    metrics: Sequence[str],
    steps: Iterable[int] | None = None,
    model: torch.nn.Module | None = None,
    progress: EvaluationProgress | None = None,
) -> dict[int, dict[str, float]]:
    """Evaluate checkpoints after the fact and attach the results as metrics.

    Args:
        manager: the run's manager.
        fn: ``fn(model)`` when ``model`` is given (its weights are the checkpoint's
            when called), else ``fn(checkpoint)``; returns ``{metric: number}``
            with at least the names in ``metrics``.
        metrics: the metric names ``fn`` returns. Checkpoints that already have all
            of them are skipped, which makes a rerun resume where it stopped.
        steps: which checkpoints (default: every committed one).
        model: a module of the saved architecture to load each checkpoint's
            weights into (see :func:`ckpts.load_weights`).
        progress: called after each checkpoint with (checkpoint, the metrics
            recorded or None when skipped, checkpoints done, in all).

    Returns:
        ``{step: metrics}`` for the checkpoints evaluated in this call.

    Raises:
        InvalidArgumentError: ``metrics`` is empty, or ``fn`` did not return them all.
        NotACheckpointError: a step in ``steps`` has no committed checkpoint.

    Example:
        >>> def accuracy(model):                                        # doctest: +SKIP
        ...     return {"val_acc": run_validation(model)}
        >>> manager.evaluate(accuracy, metrics=["val_acc"], model=build_model())  # doctest: +SKIP
    """
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidArgumentError(
            f"metrics must name what fn returns, e.g. metrics=['val_acc'], got {metrics!r}")
    chosen = _choose(manager, steps)
    results: dict[int, dict[str, float]] = {}
    for done, checkpoint in enumerate(chosen, start=1):
        if all(name in checkpoint.metrics for name in names):
            log.info("step %d already has %s; skipped", checkpoint.step, ", ".join(names))
            if progress is not None:
                progress(checkpoint, None, done, len(chosen))
            continue
        if model is not None:
            load_weights(checkpoint, model)
            returned = fn(model)
        else:
            returned = fn(checkpoint)
        if not isinstance(returned, Mapping) or any(name not in returned for name in names):
            raise InvalidArgumentError(
                f"evaluating step {checkpoint.step}: fn returned {returned!r}, which lacks "
                f"{[n for n in names if not isinstance(returned, Mapping) or n not in returned]}"
                "; return a dict with every name in metrics=")
        updated = manager.add_metrics(checkpoint.step, returned)
        results[checkpoint.step] = {k: updated.metrics[k] for k in returned}
        log.info("evaluated step %d: %s", checkpoint.step, results[checkpoint.step])
        if progress is not None:
            progress(checkpoint, results[checkpoint.step], done, len(chosen))
    return results


def _choose(manager: Evaluated, steps: Iterable[int] | None) -> list[Checkpoint]:
    available = manager.checkpoints()
    if steps is None:
        return available
    by_step = {c.step: c for c in available}
    wanted = sorted(set(steps))
    missing = [s for s in wanted if s not in by_step]
    if missing:
        raise NotACheckpointError(
            f"{manager.directory} has no committed checkpoint for steps {missing}; available "
            f"steps: {sorted(by_step) or 'none'}")
    return [by_step[s] for s in wanted]

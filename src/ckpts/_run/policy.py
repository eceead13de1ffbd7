"""When to save (save triggers) and what to keep (retention policies).

Save triggers answer "save now?" each time ``CheckpointManager.save`` is called:
:class:`Every` (steps, epochs, seconds) and :class:`OnImprovement` (a metric got
better). A list of triggers saves when any of them says so.

Retention policies look at the committed checkpoints (ascending by step) and
return the steps they keep: :class:`KeepLast`, :class:`KeepBest`,
:class:`KeepEvery`, :class:`KeepSince`. Policies combine by union: a checkpoint
survives if any policy keeps it. The manager always protects the newest
checkpoint, the one it restored from, and pinned ones, whatever the policies say.

:class:`KeepWithinBytes` is a cap, not a pick: of what the other policies keep
(everything, when it is alone) it removes the oldest checkpoints until the run's
physical size fits the budget, never a protected one nor a :class:`KeepBest` pick
(see :func:`plan_retention`).

Ranking by a metric: a checkpoint without the metric is never a candidate; NaN
ranks last; among equal values the earlier step ranks first.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from ckpts._run.space import parse_size
from ckpts._run.usage import physical_bytes
from ckpts.errors import InvalidArgumentError

if TYPE_CHECKING:
    from ckpts._format.catalog import Checkpoint
    from ckpts.storage._port import Listed

Mode = Literal["min", "max"]


class RetentionPolicy(Protocol):
    """Anything that picks the steps to keep among committed checkpoints.

    Implement ``keeps`` to write your own policy; a checkpoint survives if any
    policy of ``CheckpointManager(keep=[...])`` keeps it.

    Example:
        >>> class KeepOdd:
        ...     def keeps(self, checkpoints):
        ...         return {c.step for c in checkpoints if c.step % 2}
    """

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]: ...


class SaveTrigger(Protocol):
    """Anything that decides whether a ``save()`` call should write a checkpoint."""

    def should_save(
        self, step: int, epoch: int | None, metrics: dict[str, float],
        history: Callable[[], Sequence[Checkpoint]],
    ) -> bool:
        """Whether this call should save; ``history()`` lists the run's checkpoints
        (it reads every manifest: call it only when needed)."""

    def saved(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None: ...


def rank_by(checkpoints: Sequence[Checkpoint], metric: str, mode: Mode) -> list[Checkpoint]:
    """Checkpoints that have ``metric``, best first (NaN last, ties: earlier step first)."""
    sign = 1.0 if mode == "min" else -1.0

    def key(c: Checkpoint) -> tuple[bool, float, int]:
        value = c.metrics[metric]
        return (math.isnan(value), sign * value if not math.isnan(value) else 0.0, c.step)

    return sorted((c for c in checkpoints if metric in c.metrics), key=key)


def check_mode(mode: str) -> None:
    """Refuse anything but 'min' or 'max'."""
    if mode not in ("min", "max"):
        raise InvalidArgumentError(f"mode must be 'min' or 'max', got {mode!r}")


def _check_count(owner: str, name: str, value: object, *, minimum: int = 1) -> None:
    if type(value) is not int or value < minimum:
        raise InvalidArgumentError(f"{owner}({name}={value!r}): {name} must be an int >= {minimum}")


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` most recent checkpoints (by step).

    Example:
        >>> keep = [ckpts.KeepLast(3)]  # the newest three survive
    """

    n: int

    def __post_init__(self) -> None:
        _check_count("KeepLast", "n", self.n)

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps of the last ``n`` checkpoints."""
        return {c.step for c in checkpoints[-self.n :]}


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``n`` best checkpoints by a metric.

    Example:
        >>> keep = [ckpts.KeepBest(3, "val_loss"), ckpts.KeepLast(1)]
    """

    n: int
    metric: str
    mode: Mode = "min"

    def __post_init__(self) -> None:
        _check_count("KeepBest", "n", self.n)
        check_mode(self.mode)
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidArgumentError(f"KeepBest(metric={self.metric!r}): give a metric name")

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps of the ``n`` best checkpoints that have the metric."""
        return {c.step for c in rank_by(checkpoints, self.metric, self.mode)[: self.n]}


@dataclass(frozen=True)
class KeepEvery:
    """Keep every checkpoint whose step is a multiple of ``steps`` (milestones).

    Example:
        >>> keep = [ckpts.KeepEvery(10_000), ckpts.KeepLast(2)]
    """

    steps: int

    def __post_init__(self) -> None:
        _check_count("KeepEvery", "steps", self.steps)

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps that are multiples of ``steps``."""
        return {c.step for c in checkpoints if c.step % self.steps == 0}


@dataclass(frozen=True)
class KeepSince:
    """Keep every checkpoint created in the last ``seconds``.

    Example:
        >>> keep = [ckpts.KeepSince(3600)]  # everything from the last hour
    """

    seconds: float
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) \
                or not self.seconds > 0:
            raise InvalidArgumentError(f"KeepSince(seconds={self.seconds!r}) must be > 0")

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps of checkpoints created within the window."""
        now = datetime.datetime.fromtimestamp(self.clock(), tz=datetime.timezone.utc)
        horizon = now - datetime.timedelta(seconds=self.seconds)
        return {c.step for c in checkpoints if c.created >= horizon}


@dataclass(frozen=True)
class KeepWithinBytes:
    """Keep the run's physical size (shared files counted once) within ``budget``,
    removing the oldest checkpoints first.

    It caps what the other policies keep (everything, when it is alone); the
    newest checkpoint, the one restored from, the one saved last, pinned ones and
    :class:`KeepBest` picks are never removed for it. A save that could not fit
    even after that is refused before it writes a byte (InsufficientSpaceError).
    The budget holds between saves: nothing is deleted before a new checkpoint is
    committed, so during a save the run may exceed it by that save's new bytes.

    Example:
        >>> keep = [ckpts.KeepBest(1, "val_loss"), ckpts.KeepWithinBytes("200GB")]
    """

    budget: int | str
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", parse_size(self.budget))

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """Every step: the budget removes checkpoints in :func:`plan_retention`, after the
        other policies have picked."""
        return {c.step for c in checkpoints}

    def fit(self, kept: set[int], protected: set[int], listing: Mapping[int, Listed]
            ) -> set[int]:
        """``kept`` without its oldest unprotected steps, as many as the budget needs."""
        kept = set(kept)
        for step in sorted(kept - protected):
            if physical_bytes(listing[s] for s in kept if s in listing) <= self.nbytes:
                break
            kept.discard(step)
        return kept


def plan_retention(checkpoints: Sequence[Checkpoint], policies: Sequence[RetentionPolicy],
                   protected: set[int], listing: Callable[[], Mapping[int, Listed]]
                   ) -> list[Checkpoint]:
    """The checkpoints to delete: those no policy keeps (union), then, with budgets,
    the oldest ones each budget removes. ``protected`` steps are kept whatever the
    policies say; ``listing`` (the run's files by step) is asked for only with a budget."""
    budgets = [p for p in policies if isinstance(p, KeepWithinBytes)]
    picks = [p for p in policies if not isinstance(p, KeepWithinBytes)]
    kept = set(protected)
    for policy in picks or budgets:
        kept |= policy.keeps(checkpoints)
    if budgets:
        files = listing()
        best = {step for p in picks if isinstance(p, KeepBest) for step in p.keeps(checkpoints)}
        for budget in budgets:
            kept = budget.fit(kept, protected | best, files)
    return [c for c in checkpoints if c.step not in kept]


@dataclass
class Every:
    """Save every ``steps`` steps, every ``epochs`` epochs and/or every ``seconds``.

    With several given, a save happens when any of them is due. ``epochs`` fires
    on the first ``save()`` call whose ``epoch`` differs from the previous call's
    and is a multiple of ``epochs``. ``seconds`` counts from the manager's creation
    or the last save.

    Example:
        >>> trigger = ckpts.Every(steps=500, seconds=1800)  # whichever comes first
    """

    steps: int | None = None
    epochs: int | None = None
    seconds: float | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _last_epoch: int | None = field(default=None, init=False, repr=False)
    _last_save: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None and self.seconds is None:
            raise InvalidArgumentError("Every() needs steps=, epochs= or seconds=")
        if self.steps is not None:
            _check_count("Every", "steps", self.steps)
        if self.epochs is not None:
            _check_count("Every", "epochs", self.epochs)
        if self.seconds is not None and (isinstance(self.seconds, bool)
                                         or not isinstance(self.seconds, (int, float))
                                         or not self.seconds > 0):
            raise InvalidArgumentError(f"Every(seconds={self.seconds!r}): must be > 0")
        self._last_save = self.clock()

    def should_save(self, step: int, epoch: int | None, metrics: dict[str, float],
                    history: Callable[[], Sequence[Checkpoint]]) -> bool:
        """Whether any of the intervals is due at this call."""
        due = self.steps is not None and step % self.steps == 0
        if self.epochs is not None and epoch is not None:
            changed = self._last_epoch is not None and epoch != self._last_epoch
            due = due or (changed and epoch % self.epochs == 0)
            self._last_epoch = epoch
        if self.seconds is not None and self._last_save is not None:
            due = due or self.clock() - self._last_save >= self.seconds
        return due

    def saved(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        """Restart the seconds interval."""
        self._last_save = self.clock()


@dataclass
class OnImprovement:
    """Save when ``metric`` improves on the best value seen so far by more than ``min_delta``.

    The best so far includes the checkpoints already on disk (read once, the
    first time the metric is seen), so a resumed run does not save a worse model
    just because its process is new.

    Example:
        >>> trigger = ckpts.OnImprovement("val_loss", mode="min", min_delta=1e-3)
    """

    metric: str
    mode: Mode = "min"
    min_delta: float = 0.0
    _best: float | None = field(default=None, init=False, repr=False)
    _seeded: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) \
                or not self.min_delta >= 0:
            raise InvalidArgumentError(f"OnImprovement(min_delta={self.min_delta!r}) must be >= 0")

    def should_save(self, step: int, epoch: int | None, metrics: dict[str, float],
                    history: Callable[[], Sequence[Checkpoint]]) -> bool:
        """Whether this call's metric beats the best so far by more than min_delta."""
        value = metrics.get(self.metric)
        if value is None or math.isnan(value):
            return False
        if not self._seeded:
            self._seeded = True
            for checkpoint in history():
                self.saved(checkpoint.step, checkpoint.epoch, checkpoint.metrics)
        best = self._best
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def saved(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        """Remember the value just saved as the best when it is."""
        value = metrics.get(self.metric)
        if value is not None and not math.isnan(value):
            self._best = value if self._best is None else (
                min(self._best, value) if self.mode == "min" else max(self._best, value))


def check_policies(keep: Sequence[RetentionPolicy] | None) -> list[RetentionPolicy] | None:
    """``keep=`` as CheckpointManager takes it: None (keep everything) or policies."""
    if keep is None:
        return None
    for policy in keep:
        if not callable(getattr(policy, "keeps", None)):
            raise InvalidArgumentError(
                f"keep=[...] holds {policy!r}, which is not a retention policy; "
                "use e.g. ckpts.KeepLast(3)"
            )
    return list(keep)


def check_triggers(save: SaveTrigger | Sequence[SaveTrigger] | None) -> list[SaveTrigger]:
    """``save=`` as CheckpointManager takes it: one trigger, several, or None."""
    triggers = [] if save is None else [save] if not isinstance(save, Sequence) else save
    for trigger in triggers:
        if not callable(getattr(trigger, "should_save", None)):
            raise InvalidArgumentError(
                f"save={trigger!r} is not a save trigger; use e.g. ckpts.Every(steps=500) "
                "or ckpts.OnImprovement('val_loss')"
            )
    return list(triggers)


def fires(triggers: Sequence[SaveTrigger], step: int, epoch: int | None,
          metrics: dict[str, float], checkpoints: Callable[[], list[Checkpoint]]) -> bool:
    """Whether a save is due: no triggers means every call; else any that says so (every
    trigger sees the call, so its interval bookkeeping stays right)."""
    votes = [t.should_save(step, epoch, metrics, checkpoints) for t in triggers]
    return any(votes) or not triggers

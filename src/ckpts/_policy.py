"""Retention policies: which committed checkpoints to keep.

A policy looks at the committed checkpoints (ascending by step) and returns the
steps it keeps. Policies combine by union: a checkpoint survives if any policy in
``CheckpointManager(keep=[...])`` keeps it. The manager always protects the newest
checkpoint and the one it restored from, whatever the policies say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ckpts.errors import InvalidArgumentError

if TYPE_CHECKING:
    from ckpts._catalog import Checkpoint


class RetentionPolicy(Protocol):
    """Anything that picks the steps to keep among committed checkpoints."""

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]: ...


@dataclass(frozen=True, kw_only=False)
class KeepLast:
    """Keep the ``n`` most recent checkpoints (by step).

    Example:
        >>> keep = [ckpts.KeepLast(3)]  # the newest three survive
    """

    n: int

    def __post_init__(self) -> None:
        if type(self.n) is not int or self.n < 1:
            raise InvalidArgumentError(f"KeepLast(n={self.n!r}): n must be an int >= 1")

    def keeps(self, checkpoints: Sequence[Checkpoint]) -> set[int]:
        """The steps of the last ``n`` checkpoints."""
        return {c.step for c in checkpoints[-self.n :]}

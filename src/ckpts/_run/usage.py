"""Disk usage of a run whose checkpoints share files.

A save reuses the previous checkpoint's unchanged tensor files (a hard link on a
local disk), so two checkpoints may hold the same bytes at rest. Each checkpoint
still holds every file it needs: copying its folder copies them all, and deleting
any other checkpoint leaves it whole. Sizes here are file sizes:

- *logical*: what a checkpoint's files add up to (what a copy of it takes);
- *physical*: what the run holds on disk, each shared file counted once. Per
  checkpoint, a shared file counts at the oldest checkpoint holding it (as ``du``
  does), so the checkpoints' physical sizes add up to the run's;
- *shared*: a checkpoint's bytes that another checkpoint of the run holds too
  (deleting it frees ``logical - shared``).

On an object store a server-side copy is a full object: nothing is shared there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ckpts.storage._port import Listed


@dataclass(frozen=True)
class Usage:
    """One checkpoint's sizes (see the module docstring)."""

    step: int
    logical: int
    physical: int
    shared: int

    @property
    def savings(self) -> int:
        """Bytes not on disk thanks to sharing: ``logical - physical``."""
        return self.logical - self.physical


def identity(entry: Listed, file: str) -> str:
    """What names ``file``'s bytes at rest: equal for two files exactly when they share
    them (a file no other shares is its own)."""
    return entry.shared.get(file) or f"{entry.name}/{file}"


def physical_bytes(entries: Iterable[Listed]) -> int:
    """The bytes these checkpoints hold on disk together, each shared file once."""
    held = {identity(entry, file): size for entry in entries for file, size in entry.sizes.items()}
    return sum(held.values())


def shared_bytes(entries: Iterable[Listed]) -> int:
    """The bytes that two or more of these checkpoints hold, each shared file once."""
    holders: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    for entry in entries:
        for file, size in entry.sizes.items():
            holders[identity(entry, file)] += 1
            sizes[identity(entry, file)] = size
    return sum(size for held, size in sizes.items() if holders[held] > 1)


def usage(entries: Sequence[Listed]) -> list[Usage]:
    """Each checkpoint's sizes, ascending by step."""
    ordered = sorted(entries, key=lambda entry: entry.step)
    holders = Counter(identity(entry, file) for entry in ordered for file in entry.sizes)
    seen: set[str] = set()
    rows = []
    for entry in ordered:
        ids = {file: identity(entry, file) for file in entry.sizes}
        rows.append(Usage(
            step=entry.step,
            logical=sum(entry.sizes.values()),
            physical=sum(size for file, size in entry.sizes.items() if ids[file] not in seen),
            shared=sum(size for file, size in entry.sizes.items() if holders[ids[file]] > 1),
        ))
        seen.update(ids.values())
    return rows

"""A LocalStorage with faults injected at the storage port, for tests.

Each operation of the port first runs the hook registered under its name, if any:
a hook may raise (a full disk, an I/O error), block (a slow commit) or record.
Nothing private of ckpts is patched: the manager sees a Storage like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ckpts.storage import LocalStorage, Range, Staged


class FaultyStorage(LocalStorage):
    """LocalStorage whose operations run ``hooks[name]()`` first (see the module)."""

    def __init__(self, run: Path) -> None:
        super().__init__(run)
        self.hooks: dict[str, Callable[[], None]] = {}
        self.calls: list[str] = []
        self.files_read: list[str] = []

    def _before(self, operation: str) -> None:
        self.calls.append(operation)
        hook = self.hooks.get(operation)
        if hook is not None:
            hook()

    def read(self, name: str, file: str) -> bytes:
        self._before("read")
        self.files_read.append(file)
        return super().read(name, file)

    def read_ranges(self, name: str, ranges: Sequence[Range]) -> None:
        self._before("read_ranges")
        self.files_read += sorted({piece.file for piece in ranges})
        super().read_ranges(name, ranges)

    def map_file(self, name: str, file: str) -> memoryview:
        self._before("map_file")
        self.files_read.append(file)
        return super().map_file(name, file)

    def stage(self, name: str) -> Staged:
        self._before("stage")
        return super().stage(name)

    def write(self, staged: Staged, files: Sequence[tuple[str, Sequence[memoryview]]]) -> None:
        self._before("write")
        super().write(staged, files)

    def commit(self, staged: Staged, manifest: bytes) -> None:
        self._before("commit")
        super().commit(staged, manifest)

    def delete(self, name: str) -> None:
        self._before("delete")
        super().delete(name)

    def update(self, name: str, edit: Callable[[bytes], bytes]) -> bytes:
        self._before("update")
        return super().update(name, edit)


def raising(error: BaseException, *, times: int | None = None) -> Callable[[], None]:
    """A hook that raises ``error`` (the first ``times`` calls only, if given)."""
    calls = [0]

    def hook() -> None:
        calls[0] += 1
        if times is None or calls[0] <= times:
            raise error

    return hook

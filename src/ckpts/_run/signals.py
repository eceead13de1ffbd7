"""Saving on a signal (preemption): the signals that make the next ``save()`` write, and
ending the process the conventional way once that checkpoint is committed."""

from __future__ import annotations

import logging
import os
import signal
import types
from collections.abc import Sequence

log = logging.getLogger("ckpts")


class SaveOnSignal:
    """Handlers for ``signals`` that note the signal (``pending``) for the next save."""

    def __init__(self, signals: Sequence[signal.Signals | int]) -> None:
        self.pending: int | None = None
        self._previous = {s: signal.signal(s, self._received) for s in signals}

    @property
    def watching(self) -> bool:
        """Whether any signal is handled (until :meth:`stop`)."""
        return bool(self._previous)

    def exit(self) -> None:
        """End the process as the pending signal would have: the default handler is put
        back and the signal raised again, so a scheduler sees the status it expects (143
        for SIGTERM)."""
        if self.pending is not None:
            signal.signal(self.pending, signal.SIG_DFL)
            os.kill(os.getpid(), self.pending)

    def stop(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _received(self, signum: int, frame: types.FrameType | None) -> None:
        log.warning("received signal %d: the next save() call will save and exit", signum)
        self.pending = signum

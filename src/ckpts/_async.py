"""Async saves: stage the state into reused host buffers, then write in the background.

The training thread blocks only while tensors are copied into staging buffers
(pinned memory and a side stream for CUDA tensors, plain memory for CPU ones).
The buffers are kept and reused by the next save, so after the first save no
memory is allocated or page-faulted on the training thread. A single background
thread then serializes, hashes, commits and applies retention; one save is in
flight at a time. A failure is kept and raised on the next call into the writer
(``submit``, ``wait``); at interpreter exit a save in flight is waited for, and a
failure nobody collected is logged as an error.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import replace

import torch

from ckpts._codec import is_dtensor
from ckpts._state import ObjectSnapshot
from ckpts.errors import CheckpointError

log = logging.getLogger("ckpts")


class Stager:
    """Copies snapshot tensors into host buffers that are reused from save to save."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._stream: torch.cuda.Stream | None = None

    def stage(self, snapshots: Mapping[str, ObjectSnapshot]) -> dict[str, ObjectSnapshot]:
        """Snapshots whose tensors are private host copies, safe to write later."""
        staged: dict[str, ObjectSnapshot] = {}
        on_cuda = any(t.is_cuda for s in snapshots.values() for t in s.tensors.values())
        stream = self._copy_stream() if on_cuda else None
        buffers: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for name, snap in snapshots.items():
            tensors = {}
            for key, tensor in snap.tensors.items():
                sharded = is_dtensor(tensor)
                source = tensor.to_local() if sharded else tensor  # type: ignore[attr-defined]
                buffers.append(self._buffer((name, key), source))
                sources.append(source)  # copied under no_grad: no detach() needed
                tensors[key] = _rewrapped(tensor, buffers[-1]) if sharded else buffers[-1]
            staged[name] = replace(snap, tensors=tensors)
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            if stream is None:
                # one call for every tensor: with 40,000 small ones, a Python loop of copy_
                # costs more than the copying itself
                torch._foreach_copy_(buffers, sources)
            else:
                for buffer, source in zip(buffers, sources, strict=True):
                    buffer.copy_(source, non_blocking=True)
        if stream is not None:
            stream.synchronize()  # the pinned copies are complete before save() returns
        return staged

    def _copy_stream(self) -> torch.cuda.Stream:
        """A side stream for device-to-host copies, ordered after the work queued so far."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        self._stream.wait_stream(torch.cuda.current_stream())
        return self._stream

    def _buffer(self, slot: tuple[str, str], tensor: torch.Tensor) -> torch.Tensor:
        """The host buffer of a slot, allocated again only when its shape or dtype changed."""
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=tensor.is_cuda)
            self._buffers[slot] = buffer
        return buffer


def _rewrapped(tensor: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """A DTensor's staged shard wrapped again with the DTensor's mesh, placements and
    global shape, so a save still knows its place."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(buffer, tensor.device_mesh, tensor.placements,  # type: ignore[attr-defined]
                              run_check=False, shape=tensor.shape, stride=tensor.stride())


class BackgroundWriter:
    """Runs one job at a time on a background thread; its error surfaces on the next call."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        _LIVE_WRITERS.add(self)

    @property
    def busy(self) -> bool:
        """Whether a job is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], object], *, name: str) -> None:
        """Wait for (and re-raise the failure of) the previous job, then start ``job``."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name=name)
        self._thread.start()

    def join(self) -> None:
        """Block until the job in flight is done; a failure stays for :meth:`wait`."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Block until the job in flight is done; raise its failure, if any, once."""
        self.join()
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"the background save failed: {error!r}") from error

    def _run(self, job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as e:  # kept and re-raised on the training thread
            self._error = e

    def _at_exit(self) -> None:
        try:
            self.wait()
        except CheckpointError as e:
            log.error("a background checkpoint save failed and was never collected: %s", e)


_LIVE_WRITERS: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


@atexit.register
def _wait_for_saves_in_flight() -> None:
    for writer in list(_LIVE_WRITERS):
        if writer.busy:
            log.warning("waiting for a checkpoint save in flight before exiting")
        writer._at_exit()


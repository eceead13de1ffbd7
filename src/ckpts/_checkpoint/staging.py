"""Async saves: stage the state into reused host buffers, then write in the background.

The training thread blocks only while tensors are copied into staging buffers
(pinned memory and a side stream for CUDA tensors, plain memory for CPU ones),
views carved out of a few large chunks. The buffers are kept and reused by the
next save, so after the first save (or ``CheckpointManager.prepare``) no memory
is allocated or page-faulted on the training thread. A single background
thread then serializes, hashes, commits and applies retention; one save is in
flight at a time. A failure is kept and raised on the next call into the writer
(``submit``, ``wait``); at interpreter exit a save in flight is waited for, and a
failure nobody collected is logged as an error.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import weakref
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import replace
from typing import NamedTuple

import torch

from ckpts._format.codec import TensorNotes, is_dtensor
from ckpts._state.train_state import ObjectSnapshot
from ckpts.errors import CheckpointError

log = logging.getLogger("ckpts")


class Layout(NamedTuple):
    """What the staging buffers must be: each one's shape and dtype, and whether they
    are pinned (when any source is on CUDA)."""

    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    pinned: bool


CHUNK_BYTES = 256 * 2**20
"""The most bytes one staging chunk holds (a bigger tensor gets a chunk of its own size)."""
ALIGNMENT = 64
"""Staging buffers start at multiples of this many bytes (or of their element size, if
larger) within their chunk."""


class Stager:
    """Copies snapshot tensors into host buffers that are reused from save to save.

    The buffers are views carved out of a few large chunks (at most ``chunk_bytes`` each;
    pinned when any staged tensor is on CUDA), so 40,000 small tensors cost a few
    allocations, not 40,000. They are kept for the state's *layout*: the sequence of
    shapes and dtypes of its tensors (and whether any is on CUDA). A save with the same
    layout as the one before reuses every buffer after a single comparison. A save whose
    layout differs carves its buffers again, in order, into the chunks it already has,
    allocating chunks only for the bytes that do not fit and freeing chunks it no longer
    needs: a layout change costs at most what the growth needs.
    """

    def __init__(self, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._chunk_bytes = chunk_bytes
        self._chunks: list[torch.Tensor] = []  # flat uint8
        self._chunks_pinned = False
        self._layout: Layout | None = None  # of the buffers, None before the first carving
        self._buffers: list[torch.Tensor] = []
        self._layout_bytes = 0  # the bytes of the buffers' tensors
        self._staged_bytes = 0
        self._chunks_allocated = 0
        self._stream: torch.cuda.Stream | None = None

    @property
    def staged_bytes(self) -> int:
        """The tensor bytes of the last :meth:`stage` (a DTensor counts whole)."""
        return self._staged_bytes

    @property
    def chunk_count(self) -> int:
        """How many chunks of staging memory are held."""
        return len(self._chunks)

    @property
    def allocated_bytes(self) -> int:
        """The bytes of staging memory held (the chunks' total size)."""
        return sum(chunk.numel() for chunk in self._chunks)

    @property
    def chunks_allocated(self) -> int:
        """How many chunks were allocated so far, freed ones included."""
        return self._chunks_allocated

    def prepare(self, snapshots: Mapping[str, ObjectSnapshot]) -> None:
        """Allocate (and fault in) the buffers that staging these snapshots needs, copying
        nothing, so that the next :meth:`stage` of the same layout allocates nothing."""
        self._buffers_for(_sources(snapshots)[1], touch=True)

    def stage(self, snapshots: Mapping[str, ObjectSnapshot]) -> dict[str, ObjectSnapshot]:
        """Snapshots whose tensors are private host copies, safe to write later."""
        sources, layout = _sources(snapshots)
        buffers = self._buffers_for(layout, touch=False)
        staged: dict[str, ObjectSnapshot] = {}
        self._staged_bytes = self._layout_bytes
        start = 0
        for name, snap in snapshots.items():
            end = start + len(snap.tensors)
            tensors = dict(zip(snap.tensors, buffers[start:end], strict=True))
            if not set(map(type, snap.tensors.values())) <= _PLAIN_TYPES:
                for key, tensor, buffer in zip(snap.tensors, snap.tensors.values(),
                                               buffers[start:end], strict=True):
                    if is_dtensor(tensor):
                        tensors[key] = _rewrapped(tensor, buffer)
                        # counted as the whole tensor, as every rank's record says
                        self._staged_bytes += (tensor.numel() - buffer.numel()) \
                            * tensor.element_size()
            staged[name] = replace(snap, tensors=tensors, notes=None)
            start = end
        stream = self._copy_stream() if layout.pinned else None
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

    def _buffers_for(self, layout: Layout, *, touch: bool) -> list[torch.Tensor]:
        """One host buffer per tensor of ``layout``, in order: the last ones if the layout
        is unchanged, else carved again. ``touch``: write new chunks once, so that the
        first copy into them does not pay for page faults (pinned memory is resident)."""
        if layout == self._layout:  # lists of torch.Size and dtypes: compared in C
            return self._buffers
        if layout.pinned != self._chunks_pinned:
            self._chunks = []  # pinned and plain memory are not interchangeable
            self._chunks_pinned = layout.pinned
        self._buffers, self._layout = [], None  # the old views go before more memory comes
        itemsizes = [dtype.itemsize for dtype in layout.dtypes]
        sizes = [math.prod(shape) * n for shape, n in zip(layout.shapes, itemsizes, strict=True)]
        # CUDA's caching host allocator rounds a pinned block up to a power of two: the
        # chunks are asked for at that size, so the rounding holds buffers, not nothing
        places, capacities = _carve(sizes, itemsizes, [c.numel() for c in self._chunks],
                                    self._chunk_bytes, powers_of_two=layout.pinned)
        # chunks that hold no buffer are let go; new ones come after the kept ones
        used = sorted({index for index, _ in places})
        held = len(self._chunks)
        added = [torch.empty(capacities[i], dtype=torch.uint8, pin_memory=layout.pinned)
                 for i in used if i >= held]
        if touch and not layout.pinned:
            for chunk in added:
                chunk.zero_()
        self._chunks = [self._chunks[i] for i in used if i < held] + added
        self._chunks_allocated += len(added)
        position = {index: n for n, index in enumerate(used)}
        typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # a chunk seen as a dtype
        strides: dict[torch.Size, tuple[int, ...]] = {}  # few distinct shapes, many tensors
        buffers = []
        for shape, dtype, (index, offset) in zip(layout.shapes, layout.dtypes, places,
                                                 strict=True):
            view = typed.get((index, dtype))
            if view is None:
                view = typed[index, dtype] = self._chunks[position[index]].view(dtype)
            stride = strides.get(shape)
            if stride is None:
                stride = strides[shape] = _contiguous_strides(shape)
            buffers.append(view.as_strided(shape, stride, offset // dtype.itemsize))
        log.debug("staging: %d buffers carved from %d chunk(s), %d bytes (%d chunk(s) new)",
                  len(buffers), len(self._chunks), self.allocated_bytes, len(added))
        self._buffers, self._layout, self._layout_bytes = buffers, layout, sum(sizes)
        return buffers


_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def _sources(snapshots: Mapping[str, ObjectSnapshot]) -> tuple[list[torch.Tensor], Layout]:
    """Every tensor to stage, in order (a DTensor stands for its local shard), and their
    layout: as the snapshots noted them while walking the state, or looked up now."""
    sources: list[torch.Tensor] = []
    shapes: list[torch.Size] = []
    dtypes: list[torch.dtype] = []
    on_cuda = False
    for snap in snapshots.values():
        notes = snap.notes
        if notes is None or len(notes.local) != len(snap.tensors):  # not noted, or stale
            notes = TensorNotes()
            for tensor in snap.tensors.values():
                notes.note(tensor.to_local() if is_dtensor(tensor)  # type: ignore[attr-defined]
                           else tensor)
        sources += notes.local
        shapes += notes.shapes
        dtypes += notes.dtypes
        on_cuda = on_cuda or notes.on_cuda
    return sources, Layout(shapes, dtypes, on_cuda)


def _carve(sizes: list[int], alignments: list[int], capacities: list[int], chunk_bytes: int,
           *, powers_of_two: bool) -> tuple[list[tuple[int, int]], list[int]]:
    """Where each buffer goes: ``(chunk index, byte offset)`` per size, filling the chunks
    of ``capacities`` in order, and the capacities of the chunks: the existing ones, then
    any new ones (of at most ``chunk_bytes``, or one buffer's size if larger; rounded up
    to a power of two with ``powers_of_two``). A chunk may end up holding no buffer (one
    too small for the next buffer is skipped)."""
    capacities = list(capacities)
    padded = [-(-n // max(ALIGNMENT, a)) * max(ALIGNMENT, a) for n, a in zip(sizes, alignments,
                                                                          strict=True)]
    remaining = sum(padded)
    places: list[tuple[int, int]] = []
    index, offset = 0, 0
    for nbytes, alignment, footprint in zip(sizes, alignments, padded, strict=True):
        step = max(ALIGNMENT, alignment)
        offset = -(-offset // step) * step
        while index < len(capacities) and offset + nbytes > capacities[index]:
            index, offset = index + 1, 0
        if index == len(capacities):
            # a whole number of ALIGNMENT-byte blocks: the chunk is viewed as any dtype
            capacity = -(-max(footprint, min(chunk_bytes, remaining), 1) // ALIGNMENT) \
                * ALIGNMENT
            capacities.append(1 << (capacity - 1).bit_length() if powers_of_two else capacity)
        places.append((index, offset))
        offset += nbytes
        remaining -= footprint
    return places, capacities


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


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
        go = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(job, go), name=name)
        self._thread.start()
        # start() hands the GIL to the new thread; had it gone straight to work, the
        # training thread would get the GIL back only once the writer's first long C call
        # (a JSON encode of tens of ms) ended. Parked on `go`, it gives the GIL straight
        # back, and once woken it waits a switch interval (5 ms) for it: time enough for
        # save() to return
        go.set()

    def poll(self) -> None:
        """Raise the failure of a job that is done, if any, without waiting for one in
        flight."""
        if not self.busy:
            self.wait()

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

    def _run(self, job: Callable[[], object], go: threading.Event) -> None:
        go.wait()
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


"""Tensors outside host memory (CUDA) to and from files, through a few reused host chunks.

A save of device tensors never holds a host copy of the whole state: a file's bytes
pass through :class:`ChunkPool` buffers (pinned for CUDA, so each copy is
asynchronous), and the copy of the next chunk runs while the current one is hashed
and written (:func:`file_pieces`). A restore mirrors it (:func:`read_into`): each
chunk is read from the file and hashed, then copied into the live tensors while the
next chunk is read. Extra host memory stays a few chunks, whatever the state's size.

The copying itself goes through :class:`Transfers` (plain, synchronous ``copy_``) or
:class:`CudaTransfers` (a side stream per device, and an event per chunk), so the
pipeline's logic runs, and is tested, on a machine without a GPU.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
import xxhash

from ckpts._format.manifest import BLOCK, HASH_PREFIX, TensorEntry
from ckpts._format.safetensors import byte_view, flat_bytes
from ckpts.storage._parallel import run_parallel
from ckpts.storage._port import Range, Storage

# Bytes per chunk: a multiple of BLOCK. On an H200 a pinned copy of 8 MiB takes about
# 0.15 ms, a write of it several: the copies stay well ahead of the disk.
CHUNK = 8 * BLOCK
# Buffers a pool holds at most (allocated on first need): two per stream in flight.
POOL_BUFFERS = 16

# waits until the copies issued before it was made are complete
Fence = Callable[[], None]


class ChunkPool:
    """Host buffers of ``chunk`` bytes, allocated on first need (at most ``count``),
    handed out and given back. A buffer given back with a fence (a copy still reading
    or writing it) is handed out again only once that fence is passed.

    A stream may wait for a buffer only while it holds none (:meth:`take`); a buffer
    for work ahead is taken only if one is free (``wait=False``). So streams sharing
    a pool never wait on each other in a circle.
    """

    def __init__(self, *, pinned: bool, chunk: int = CHUNK, count: int = POOL_BUFFERS) -> None:
        self.pinned, self.chunk, self.count = pinned, chunk, count
        self.allocated = 0
        self._free: list[tuple[torch.Tensor, Fence | None]] = []
        self._changed = threading.Condition()

    @property
    def idle(self) -> int:
        """Buffers allocated and given back (all of them, when no stream is running)."""
        with self._changed:
            return len(self._free)

    def take(self, *, wait: bool = True) -> torch.Tensor | None:
        """A free buffer (one more allocated if the pool is not full); else, with
        ``wait``, the first one given back, or None without."""
        with self._changed:
            while not self._free and self.allocated >= self.count:
                if not wait:
                    return None
                self._changed.wait()
            if self._free:
                buffer, fence = self._free.pop()
            else:
                self.allocated += 1
                buffer, fence = None, None
        if buffer is None:
            buffer = self._new_buffer()
        if fence is not None:
            fence()
        return buffer

    def reserve(self) -> None:
        """Allocate every buffer now, so that no later save or restore allocates one
        (``CheckpointManager.prepare``: pinned memory is slow to allocate)."""
        with self._changed:
            missing, self.allocated = self.count - self.allocated, self.count
        for _ in range(missing):
            self.give(self._new_buffer())

    def _new_buffer(self) -> torch.Tensor:
        return torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, buffer: torch.Tensor, fence: Fence | None = None) -> None:
        """Give a buffer back; ``fence``: copies still using it."""
        with self._changed:
            self._free.append((buffer, fence))
            self._changed.notify()


_POOLS: dict[bool, ChunkPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(*, pinned: bool) -> ChunkPool:
    """The process's pool (pinned or not), kept for the next save or restore: pinned
    memory is slow to allocate, so it is allocated once."""
    with _POOLS_LOCK:
        if pinned not in _POOLS:
            _POOLS[pinned] = ChunkPool(pinned=pinned)
        return _POOLS[pinned]


class Transfers:
    """Copies between host chunks and tensors: here plain and synchronous (the host, or a
    device without asynchronous copies). See :class:`CudaTransfers`."""

    def begin(self) -> None:
        """Called on the caller's thread before any copy: order the copies after the
        work it has queued (the kernels that computed a save's tensors)."""

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        """Copy ``source`` into ``destination`` (same number of bytes, both uint8)."""
        destination.copy_(source)

    def fence(self) -> Fence | None:
        """A wait for the copies issued so far; None when they are complete already."""
        return None

    def end(self) -> None:
        """Called on the caller's thread after the last copy: order the work it queues
        from now on after the copies (a restore's kernels read the bytes)."""


class CudaTransfers(Transfers):
    """Asynchronous copies on a side stream of each device, fenced by events; the host
    side must be pinned memory for the copies to overlap with the host's work."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self._streams = {device: torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                         for device in dict.fromkeys(devices)}
        self._callers: dict[torch.device, torch.cuda.Stream] = {}

    def begin(self) -> None:
        for device, stream in self._streams.items():
            self._callers[device] = torch.cuda.current_stream(device)
            stream.wait_stream(self._callers[device])

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        on_device = source if source.is_cuda else destination
        if not on_device.is_cuda:  # a host tensor in a file with device ones
            destination.copy_(source)
            return
        with torch.cuda.stream(self._streams[on_device.device]):
            destination.copy_(source, non_blocking=True)

    def fence(self) -> Fence:
        events = []
        for stream in self._streams.values():
            events.append(torch.cuda.Event())  # type: ignore[no-untyped-call]
            events[-1].record(stream)

        def wait() -> None:
            for event in events:
                event.synchronize()
        return wait

    def end(self) -> None:
        for device, stream in self._streams.items():
            self._callers[device].wait_stream(stream)


def transfers_for(tensors: Sequence[torch.Tensor]) -> Transfers:
    """CUDA copies when any tensor is on a CUDA device, else plain ones."""
    devices = [t.device for t in tensors if t.is_cuda]
    return CudaTransfers(devices) if devices else Transfers()


class RunningHash:
    """The xxh3-128 hash of bytes fed in order, and with ``block`` that of every
    ``block`` bytes of them (format v3's block hashes), pieces of any size."""

    def __init__(self, block: int = 0) -> None:
        self.whole = xxhash.xxh3_128()
        self.block = block
        self.blocks: list[str] = []
        self._current: xxhash.xxh3_128 | None = None
        self._filled = 0

    def update(self, data: memoryview) -> None:
        self.whole.update(data)
        while self.block and len(data):
            if self._current is None:
                self._current, self._filled = xxhash.xxh3_128(), 0
            take = min(len(data), self.block - self._filled)
            self._current.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == self.block:
                self._close_block()

    def _close_block(self) -> None:
        if self._current is not None:
            self.blocks.append(HASH_PREFIX + self._current.hexdigest())
            self._current = None

    def result(self) -> tuple[str, list[str]]:
        """The whole hash, and the block hashes (none unless more than one block)."""
        self._close_block()
        return HASH_PREFIX + self.whole.hexdigest(), self.blocks if len(self.blocks) > 1 else []


@dataclass(frozen=True)
class _Piece:
    """Bytes ``start``..``stop`` of item ``item`` (a tensor), at ``at`` in its chunk."""

    item: int
    start: int
    stop: int
    at: int


def chunk_plan(sizes: Sequence[int], chunk: int) -> list[list[_Piece]]:
    """Items of ``sizes`` bytes, one after the other, cut into chunks of at most
    ``chunk`` bytes: a large item spans chunks, small ones share one."""
    plan: list[list[_Piece]] = [[]]
    filled = 0
    for item, size in enumerate(sizes):
        start = 0
        while start < size:
            if filled == chunk:
                plan.append([])
                filled = 0
            take = min(size - start, chunk - filled)
            plan[-1].append(_Piece(item, start, start + take, filled))
            start, filled = start + take, filled + take
    return plan if plan[0] else []


def file_pieces(header: memoryview, tensors: Sequence[torch.Tensor],
                hashes: Sequence[RunningHash], pool: ChunkPool, transfers: Transfers,
                ) -> Generator[memoryview, None, None]:
    """A safetensors file's bytes in order: ``header``, then each (contiguous) tensor's
    bytes through ``pool``'s chunks, each fed to its hash on the way. A piece is valid
    until the next one is asked for; the copy into the next chunk runs meanwhile.
    Close the iterator if it is left before its end: that gives its buffers back."""
    yield header
    sources = [flat_bytes(tensor) for tensor in tensors]
    upcoming = deque(chunk_plan([len(source) for source in sources], pool.chunk))
    in_flight: deque[tuple[torch.Tensor, list[_Piece], Fence | None]] = deque()

    def start_copies(buffer: torch.Tensor) -> None:
        pieces = upcoming.popleft()
        try:
            for piece in pieces:
                transfers.copy(buffer[piece.at:piece.at + piece.stop - piece.start],
                               sources[piece.item][piece.start:piece.stop])
        except BaseException:
            pool.give(buffer, transfers.fence())
            raise
        in_flight.append((buffer, pieces, transfers.fence()))

    try:
        while upcoming or in_flight:
            if not in_flight:
                start_copies(_taken(pool.take()))
            if upcoming and (spare := pool.take(wait=False)) is not None:
                start_copies(spare)  # the next chunk's copy runs while this one is written
            buffer, pieces, fence = in_flight[0]
            if fence is not None:
                fence()
            view = byte_view(buffer)
            for piece in pieces:
                hashes[piece.item].update(view[piece.at:piece.at + piece.stop - piece.start])
            yield view[:pieces[-1].at + pieces[-1].stop - pieces[-1].start]
            in_flight.popleft()
            pool.give(buffer)
    finally:  # stopped early (a failed write): copies still running finish before reuse
        for buffer, _, fence in in_flight:
            pool.give(buffer, fence)


def _taken(buffer: torch.Tensor | None) -> torch.Tensor:
    if buffer is None:  # take() waits, so never: for the type checker
        raise RuntimeError("a chunk pool handed out no buffer")
    return buffer


def _nbytes(entry: TensorEntry) -> int:
    return entry.end - entry.begin


@dataclass(frozen=True)
class Destination:
    """A tensor to read, as the manifest records it, and the live tensor it lands in."""

    entry: TensorEntry
    target: torch.Tensor


def read_into(storage: Storage, name: str, destinations: Sequence[Destination],
              pool: ChunkPool, transfers: Transfers, *, threads: int) -> list[str]:
    """Read each destination's bytes from checkpoint ``name`` through ``pool``'s chunks
    into its (contiguous) target; return the hash of each one's bytes as read.

    The tensors are split between ``threads`` streams; in each, a chunk is read and
    hashed, then copied into the targets while the next chunk is read. The targets
    hold the bytes when this returns, hashes not yet compared: the caller does that.
    """
    hashes = [RunningHash() for _ in destinations]
    streams: list[list[int]] = [[] for _ in range(max(1, min(threads, len(destinations))))]
    loads = [0] * len(streams)
    order = sorted(range(len(destinations)), key=lambda i: -_nbytes(destinations[i].entry))
    for i in order:  # largest first, each to the least loaded stream
        least = loads.index(min(loads))
        streams[least].append(i)
        loads[least] += _nbytes(destinations[i].entry)

    def read_stream(items: list[int]) -> None:
        chosen = [destinations[i] for i in items]
        targets = [flat_bytes(d.target) for d in chosen]
        for pieces in chunk_plan([_nbytes(d.entry) for d in chosen], pool.chunk):
            buffer = _taken(pool.take())
            view = byte_view(buffer)
            try:
                storage.read_ranges(name, [
                    Range(chosen[p.item].entry.file, chosen[p.item].entry.begin + p.start,
                          view[p.at:p.at + p.stop - p.start]) for p in pieces])
                for p in pieces:
                    hashes[items[p.item]].update(view[p.at:p.at + p.stop - p.start])
                    transfers.copy(targets[p.item][p.start:p.stop],
                                   buffer[p.at:p.at + p.stop - p.start])
            finally:
                pool.give(buffer, transfers.fence())

    transfers.begin()
    try:
        run_parallel(read_stream, [items for items in streams if items], threads=len(streams))
    finally:
        transfers.end()
    return [running.result()[0] for running in hashes]

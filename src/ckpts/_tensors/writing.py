"""Tensors into a Storage: safetensors files written with their hashes taken on the way.

A save lays each file out in memory (the header, then each tensor's own bytes),
hands the parts to the storage to write in parallel, and hashes them meanwhile:
the header and every tensor get their own xxh3-128 hash (format v2). A file
holding a tensor outside host memory (CUDA) is streamed instead, through a few
reused host chunks (ckpts._tensors.streaming). A file equal to the previous checkpoint's
is reused, not written (:class:`Reusable`), once that checkpoint's file has been read
back and found intact at rest: a reused file is never one that fails verification.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Any

import torch

from ckpts._format.index import Contents
from ckpts._format.manifest import digest
from ckpts._format.safetensors import dense, encode_header, tensor_bytes
from ckpts._tensors.gc import paused_gc
from ckpts._tensors.streaming import (
    RunningHash,
    chunk_plan,
    file_pieces,
    shared_pool,
    transfers_for,
)
from ckpts.errors import CorruptCheckpointError
from ckpts.storage._parallel import run_parallel
from ckpts.storage._port import Range, Staged, Storage

log = logging.getLogger("ckpts")

# called with the bytes a save is about to write and the files it is about to reuse
BeforeWriting = Callable[[int, Mapping[str, int]], None]

_INLINE = 32 * 1024 * 1024  # bytes below which a save hashes on the calling thread
# bytes a check of a reuse source reads at a time where the backend cannot map files
_CHECK_CHUNK = 32 * 1024 * 1024


@dataclass(frozen=True)
class WrittenFile:
    """What the manifest records of a written tensor file: its size, its header's size
    and hash, and each tensor's byte range and hash. ``reused``: the file was taken
    from the previous checkpoint (see :class:`Reusable`), not written."""

    nbytes: int
    header: int
    header_hash: str
    tensors: dict[str, tuple[int, int, str]]  # key -> (begin, end, hash)
    reused: bool = False
    blocks: dict[str, list[str]] = field(default_factory=dict)  # key -> hash of each block


@dataclass(frozen=True)
class Reusable:
    """A committed checkpoint whose tensor files a save may reuse instead of writing:
    per file, its header's hash and each tensor's hash, as its manifest records them.

    A new file is reused when it has the same name, the same header (so the same
    keys, dtypes, shapes and byte ranges) and the same hash for every tensor, each
    hash computed from the bytes being saved: never from a flag. And only while this
    checkpoint's file, read back, still has those hashes: a link or a server-side copy
    takes the bytes at rest, damage and all (see :func:`_intact_at_rest`).
    """

    name: str
    files: Mapping[str, tuple[str, Mapping[str, str]]]  # file -> (header hash, key -> hash)

    @classmethod
    def of(cls, contents: Contents, rank: int = 0) -> Reusable:
        """The files of a committed checkpoint that ``rank`` wrote and may reuse (format
        v2 and later tensor files; none in v1)."""
        manifest = contents.manifest
        if contents.indexed and manifest.get("world_size", 1) > 1:  # v4: the rank's index
            if rank >= manifest["world_size"]:
                return cls(contents.name, {})
            index = contents.rank_index(rank)
            pieces = [piece for tensors in index["pieces"].values()
                      for piece in tensors.items()]
            pieces += [(key, info) for obj in index["objects"].values()
                       for key, info in obj["tensors"].items()]
            records = index["files"]
        else:
            manifest = contents.expanded()
            pieces = [(key, piece) for obj in manifest["objects"].values()
                      for key, info in obj["tensors"].items()
                      for piece in info.get("shards", [info])]  # format v3: each rank's piece
            records = manifest["files"]
        hashes: dict[str, dict[str, str]] = defaultdict(dict)
        for key, piece in pieces:
            if "hash" in piece:
                hashes[piece["file"]][key] = piece["hash"]
        return cls(contents.name, {file: (record["hash"], hashes[file])
                                   for file, record in records.items() if "header" in record})


@paused_gc()
def write_tensor_files(
    storage: Storage,
    staged: Staged,
    files: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]],
    small_files: Sequence[tuple[str, bytes]] = (),
    *,
    reusable: Reusable | None = None,
    before_writing: BeforeWriting = lambda nbytes, reused: None,
    block: int = 0,
    through_chunks: bool = False,
) -> list[WrittenFile]:
    """Write safetensors files (and small others, such as an index) into ``staged``;
    return each tensor file's record. Tensors must stay unchanged until this returns.

    A file holding a tensor outside host memory (CUDA) is streamed through a few
    reused host chunks (ckpts._tensors.streaming), never copied to the host whole; with
    ``through_chunks``, every file is (so the device path runs on any machine).

    With ``reusable``, a file equal to that checkpoint's file of the same name is
    reused (:meth:`Storage.reuse`) instead of written. Deciding hashes the file's
    tensors first, smallest first, and stops at the first that differs: a file that
    changed costs about one small tensor's hash, and those hashes are not taken again.
    A file found equal is then read back from that checkpoint and hashed (from the page
    cache where the storage maps files): one damaged since its commit is written
    instead, with a warning. ``before_writing`` gets the bytes about to be written and
    the files (with their sizes) about to be reused, once that is decided; it may raise
    to stop the save before anything is written. With ``block``, a tensor of more than
    ``block`` bytes also gets the hash of each ``block`` bytes (for readers of part of it).
    """
    outs = [_OutFile(name, items, block, streamed=through_chunks
                     or any(tensor.device.type != "cpu" for _, tensor in items))
            for name, items in files]
    streamed = [out for out in outs if out.streamed]
    chunks = _Chunks([tensor for out in streamed for tensor in out.tensors])
    same = [reusable is not None and _unchanged(reusable.files.get(out.name), out, chunks)
            for out in outs]
    if reusable is not None:  # equal hashes say nothing of the source's bytes at rest
        same = _intact_sources(storage, reusable, outs, same)
    before_writing(sum(out.nbytes for out, reused in zip(outs, same, strict=True) if not reused)
                   + sum(len(data) for _, data in small_files),
                   {out.name: out.nbytes for out, reused in zip(outs, same, strict=True)
                    if reused})
    for i, out in enumerate(outs):
        if same[i] and reusable is not None:  # else: could not; written below
            same[i] = storage.reuse(staged, reusable.name, out.name, out.nbytes)
    in_memory = [out for out, reused in zip(outs, same, strict=True)
                 if not reused and not out.streamed]
    writes = [(out.name, out.parts) for out in in_memory]
    writes += [(name, [memoryview(data)]) for name, data in small_files]

    def hash_the_rest() -> None:
        for out in outs:
            for i, part in enumerate(out.parts):
                if block and i and len(part) > block:  # both hashes in one pass over memory
                    running = RunningHash(block)
                    running.update(part)
                    out.found[i], out.blocks[out.items[i - 1][0]] = running.result()
                elif out.found[i] is None:
                    out.found[i] = digest(part)

    jobs: list[Callable[[], Any]] = [lambda: storage.write(staged, writes), hash_the_rest]
    # hashing runs beside the writes; a small save is done before a thread would start
    total = sum(len(part) for _, parts in writes for part in parts)
    run_parallel(lambda job: job(), jobs, threads=1 if total <= _INLINE else 2)
    to_stream = [out for out, reused in zip(outs, same, strict=True) if out.streamed and not reused]
    run_parallel(lambda out: out.stream_to(storage, staged, chunks), to_stream,
                 threads=storage.io_threads())
    return [out.record(reused) for out, reused in zip(outs, same, strict=True)]


class _Chunks:
    """The host chunks and the copies a save of device tensors goes through."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.transfers = transfers_for(tensors)
        self.pool = shared_pool(pinned=any(tensor.is_cuda for tensor in tensors))
        self.transfers.begin()  # on the caller's thread: after the kernels it queued


class _OutFile:
    """One tensor file of a save: its header, its tensors' bytes (in host memory, or
    streamed from where they live), and the hashes taken so far (``found``, the
    header's first)."""

    def __init__(self, name: str, items: Sequence[tuple[str, torch.Tensor]], block: int, *,
                 streamed: bool) -> None:
        self.name, self.items, self.block, self.streamed = name, items, block, streamed
        self.header = memoryview(encode_header(items))
        self.tensors = [dense(tensor, key=key) for key, tensor in items] if streamed else []
        self.parts = [self.header] if streamed else \
            [self.header, *(tensor_bytes(tensor, key=key) for key, tensor in items)]
        self.sizes = [len(self.header), *(t.numel() * t.element_size() for t in self.tensors)] \
            if streamed else [len(part) for part in self.parts]
        self.found: list[str | None] = [None] * len(self.sizes)
        self.blocks: dict[str, list[str]] = {}  # key -> hash of each block

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def hash_of(self, i: int, chunks: _Chunks) -> str:
        """Part ``i``'s hash (0: the header; else a tensor), kept in ``found``."""
        if self.found[i] is None:
            if i < len(self.parts):
                self.found[i] = digest(self.parts[i])
            else:
                running = self._hash(i)
                with closing(file_pieces(memoryview(b""), [self.tensors[i - 1]], [running],
                                         chunks.pool, chunks.transfers)) as pieces:
                    for _ in pieces:
                        pass
                self._keep(i, running)
        return str(self.found[i])

    def _hash(self, i: int) -> RunningHash:
        return RunningHash(self.block if self.block and self.sizes[i] > self.block else 0)

    def _keep(self, i: int, running: RunningHash) -> None:
        self.found[i], blocks = running.result()
        if blocks:
            self.blocks[self.items[i - 1][0]] = blocks

    def stream_to(self, storage: Storage, staged: Staged, chunks: _Chunks) -> None:
        """Write the file through the chunks, hashing every tensor on the way."""
        hashes = [self._hash(i) for i in range(1, len(self.sizes))]
        with closing(file_pieces(self.header, self.tensors, hashes, chunks.pool,
                                 chunks.transfers)) as pieces:
            storage.write_stream(staged, self.name, pieces)
        for i, running in enumerate(hashes, 1):
            self._keep(i, running)

    def record(self, reused: bool) -> WrittenFile:
        position, tensors = self.sizes[0], {}
        for (key, _), size, tensor_hash in zip(self.items, self.sizes[1:], self.found[1:],
                                               strict=True):
            tensors[key] = (position, position + size, str(tensor_hash))
            position += size
        return WrittenFile(nbytes=position, header=self.sizes[0],
                           header_hash=str(self.found[0]), tensors=tensors, reused=reused,
                           blocks=self.blocks)


def _unchanged(previous: tuple[str, Mapping[str, str]] | None, out: _OutFile,
               chunks: _Chunks) -> bool:
    """Whether a file's header and every tensor hash as in ``previous``; each hash taken
    is kept. Smallest tensors first: a changed file is seen early."""
    if previous is None:
        return False
    header_hash, tensor_hashes = previous
    if out.hash_of(0, chunks) != header_hash:
        return False
    for i in sorted(range(1, len(out.sizes)), key=lambda i: out.sizes[i]):
        if out.hash_of(i, chunks) != tensor_hashes.get(out.items[i - 1][0]):
            return False
    return True


def _intact_sources(storage: Storage, reusable: Reusable, outs: Sequence[_OutFile],
                    same: Sequence[bool]) -> list[bool]:
    """``same``, less the files whose source in ``reusable`` is no longer, at rest, the
    bytes its manifest's hashes describe (see :func:`_intact_at_rest`): those are written."""
    chosen = [i for i, reused in enumerate(same) if reused]
    intact = run_parallel(lambda i: _intact_at_rest(storage, reusable, outs[i]), chosen,
                          threads=storage.io_threads())
    checked = list(same)
    for i, ok in zip(chosen, intact, strict=True):
        checked[i] = ok
    return checked


def _intact_at_rest(storage: Storage, reusable: Reusable, out: _OutFile) -> bool:
    """Whether ``reusable``'s file ``out.name`` still hashes, header and every tensor, as
    its manifest says. A hard link or a server-side copy takes the bytes at rest, not the
    bytes being saved, so a file damaged since its commit (a flipped bit, a bad write)
    would pass its damage on to every later checkpoint: it is written anew instead, and
    a warning names it. Only a file already shown equal by its hashes is checked, so its
    layout is ``out``'s: the header, then each tensor, ``out.sizes`` bytes each."""
    header_hash, tensor_hashes = reusable.files[out.name]
    expected = [header_hash, *(tensor_hashes.get(key) for key, _ in out.items)]
    try:
        found = _hashes_at_rest(storage, reusable.name, out.name, out.sizes)
    except FileNotFoundError:
        return False  # gone: Storage.reuse would refuse too, and the file is written
    except CorruptCheckpointError as e:  # truncated, or grown
        problem = f"is damaged: {e}"
    except OSError as e:  # EIO from a bad sector; a store that does not answer
        problem = f"could not be read back to check it ({e})"
    else:
        differing = [what for what, got, want in zip(
            ["its header", *(f"tensor {key!r}" for key, _ in out.items)], found, expected,
            strict=True) if got != want]
        if not differing:
            return True
        problem = f"is damaged: the hash of {', '.join(differing)} differs from its manifest's"
    log.warning("%s/%s %s. It is not reused: this save writes the file from the bytes "
                "being saved. Run `ckpts verify %s` to list the checkpoints that fail "
                "verification (on a local disk, every one sharing this file by a hard link)",
                storage.where(reusable.name), out.name, problem, storage.location)
    return False


def _hashes_at_rest(storage: Storage, name: str, file: str, sizes: Sequence[int]) -> list[str]:
    """The hash of each of a committed file's consecutive parts of ``sizes`` bytes, taken
    from the file at rest: where the backend maps files, in the page cache without a
    copy, the parts on several threads; else read :data:`_CHECK_CHUNK` bytes at a time
    into one buffer.

    Raises:
        FileNotFoundError: the file is gone.
        CorruptCheckpointError: the file is shorter, or (mapped) longer, than ``sizes``.
        OSError: it cannot be read.
    """
    total = sum(sizes)
    mapped = storage.map_file(name, file)
    if mapped is not None:
        with mapped:
            if len(mapped) != total:
                raise CorruptCheckpointError(f"{len(mapped)} bytes where the manifest says "
                                             f"{total}")
            spans = list(pairwise(accumulate(sizes, initial=0)))  # xxhash frees the GIL
            return run_parallel(lambda span: digest(mapped[span[0]:span[1]]), spans,
                                threads=storage.io_threads())
    hashes = [RunningHash() for _ in sizes]
    buffer = memoryview(bytearray(min(total, _CHECK_CHUNK)))
    for offset, pieces in zip(range(0, total, _CHECK_CHUNK), chunk_plan(sizes, _CHECK_CHUNK),
                              strict=True):
        view = buffer[:min(_CHECK_CHUNK, total - offset)]
        storage.read_ranges(name, [Range(file, offset, view)])
        for piece in pieces:
            hashes[piece.item].update(view[piece.at:piece.at + piece.stop - piece.start])
    return [running.result()[0] for running in hashes]

"""Tensors to and from a Storage: safetensors files written with their hashes computed
from memory, and one read path that checks every byte it hands back.

Saving lays each file out in memory (the header, then each tensor's own bytes),
hands the parts to the storage to write in parallel, and hashes them meanwhile:
the header and every tensor get their own xxh3-128 hash (format v2).

Reading (:func:`read_tensors`) asks the storage for byte ranges, in parallel, and
checks hashes before anything is handed back: per tensor for format v2 (only the
tensors asked for are read), per whole file for format v1 (whose files are read
whole, gaps and headers included, since one hash covers them all). The same
reader serves restore (bytes land straight in the live tensors), ``load_weights``,
``load_state`` and ``diff`` (every tensor checked before any is copied out: in the
page cache through a memory map where the backend can map files, else read into
new memory).
:func:`check_files` streams whole files through the hashes for ``verify``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from ckpts import _io
from ckpts._format import (
    DTYPE_NAMES,
    byte_view,
    dense,
    encode_header,
    header_length,
    parse_header,
    stored_entry,
    tensor_bytes,
)
from ckpts._gc import paused_gc
from ckpts._manifest import HASH_PREFIX, TensorEntry, digest
from ckpts._parallel import run_parallel
from ckpts._storage import Range, Staged, Storage
from ckpts._streaming import (
    Destination,
    RunningHash,
    file_pieces,
    read_into,
    shared_pool,
    transfers_for,
)
from ckpts.errors import CorruptCheckpointError

# a tensor, as the readers name it: (saved object name, tensor key)
Key = tuple[str, str]

# what a checked hash covers, for its error message: the text, or (file, tensor) for a
# whole tensor, put into words only when its check fails (formatting 10,000 messages
# that are never shown cost a tenth of a small-tensor load)
Subject = str | tuple[str, Key]

# called with the bytes a save is about to write and the files it is about to reuse
BeforeWriting = Callable[[int, Mapping[str, int]], None]

_INLINE = 32 * 1024 * 1024  # bytes below which a save hashes on the calling thread

# verify() reads a file this many bytes at a time, several windows in flight
VERIFY_WINDOW = 16 * 1024 * 1024
_WINDOWS_IN_FLIGHT = 4


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
    hash computed from the bytes being saved: never from a flag.
    """

    name: str
    files: Mapping[str, tuple[str, Mapping[str, str]]]  # file -> (header hash, key -> hash)

    @classmethod
    def of(cls, name: str, manifest: Mapping[str, Any]) -> Reusable:
        """The reusable files of a checkpoint (format v2 tensor files; none in v1)."""
        hashes: dict[str, dict[str, str]] = defaultdict(dict)
        for obj in manifest["objects"].values():
            for key, info in obj["tensors"].items():
                for piece in info.get("shards", [info]):  # format v3: each rank's piece
                    if "hash" in piece:
                        hashes[piece["file"]][key] = piece["hash"]
        return cls(name, {file: (record["hash"], hashes[file])
                          for file, record in manifest["files"].items() if "header" in record})


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
    reused host chunks (ckpts._streaming), never copied to the host whole; with
    ``through_chunks``, every file is (so the device path runs on any machine).

    With ``reusable``, a file equal to that checkpoint's file of the same name is
    reused (:meth:`Storage.reuse`) instead of written. Deciding hashes the file's
    tensors first, smallest first, and stops at the first that differs: a file that
    changed costs about one small tensor's hash, and those hashes are not taken again.
    ``before_writing`` gets the bytes about to be written and the files (with their
    sizes) about to be reused, once that is decided; it may raise to stop the save
    before anything is written. With ``block``, a tensor of more than ``block`` bytes
    also gets the hash of each ``block`` bytes (for readers of part of it).
    """
    outs = [_OutFile(name, items, block, streamed=through_chunks
                     or any(tensor.device.type != "cpu" for _, tensor in items))
            for name, items in files]
    streamed = [out for out in outs if out.streamed]
    chunks = _Chunks([tensor for out in streamed for tensor in out.tensors])
    same = [reusable is not None and _unchanged(reusable.files.get(out.name), out, chunks)
            for out in outs]
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
                 threads=_io.IO_THREADS)
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


@paused_gc()
def read_tensors(
    storage: Storage,
    name: str,
    files: Mapping[str, Mapping[str, Any]],
    entries: Mapping[Key, TensorEntry],
    targets: Mapping[Key, torch.Tensor],
    *,
    fill_targets: bool,
    through_chunks: bool = False,
) -> dict[Key, torch.Tensor]:
    """Read the tensors of ``entries`` (of checkpoint ``name``, whose manifest file
    records are ``files``) and check their hashes. Keys are (object name, tensor key).

    Every file touched has its header read too, checked against its hash and
    compared with the manifest's entries, so a file that external tools would read
    differently is refused as well. With ``fill_targets``, a target that is a
    contiguous CPU tensor of the saved dtype and shape receives the bytes directly
    (no second copy; on a hash failure it holds unchecked bytes), and such a tensor
    outside host memory (CUDA) receives them through a few reused host chunks
    (ckpts._streaming; with ``through_chunks``, CPU ones too). Otherwise every
    tensor is read into new memory and, once all are verified, copied into its
    target where dtype and shape match. Keys without a usable target come back as
    new CPU tensors.

    Raises:
        CorruptCheckpointError: a hash differs, a file is short, or a header
            disagrees with the manifest.
        FileNotFoundError, OSError: the storage failed.
    """
    by_file: dict[str, dict[Key, TensorEntry]] = defaultdict(dict)
    for key, entry in entries.items():
        by_file[entry.file][key] = entry
    plan = _ReadPlan(storage, name, map_files=not fill_targets, through_chunks=through_chunks)
    for key, entry in entries.items():
        if entry.shards:  # format v3: assembled whole from every rank's piece
            plan.shards(key, entry, files)
    for file, wanted in by_file.items():
        if not file:
            continue
        live = {key: targets[key] for key in wanted if key in targets} if fill_targets else {}
        if "header" in files[file] and all(e.hash is not None for e in wanted.values()):
            plan.tensors_by_range(file, files[file], wanted, live)
        else:  # format v1: the whole file, under one hash
            plan.whole_file(file, files[file], wanted, live)
    loaded = plan.run()
    destinations, sources = [], []
    with torch.no_grad():  # entered once: per tensor, it cost as much as the copy
        for key, tensor in loaded.items():
            target = targets.get(key)
            if target is not None and target is not tensor and target.dtype == tensor.dtype \
                    and target.shape == tensor.shape:
                if target.is_conj() or target.is_neg() or target.device.type != "cpu":
                    target.copy_(tensor)  # resolves those views; copies across devices
                else:
                    destinations.append(target)
                    sources.append(tensor)
                loaded[key] = target
            elif key in plan.mapped:  # handed back: memory of its own, not the file's map
                loaded[key] = tensor.clone()
        if destinations:  # one call: with 10,000 small tensors, a loop of copy_ cost more
            torch._foreach_copy_(destinations, sources)
    return loaded


class _ReadPlan:
    """The ranges to read from one checkpoint, where each lands, and the hashes to check.

    With ``map_files``, a backend that can memory-map a file (LocalStorage's optional
    ``map_file``) lends its bytes instead: they are hashed where they lie in the page
    cache, and tensors are views of the map until the caller copies them out (one
    copy in all, as from a read into new memory, without its page faults).
    """

    def __init__(self, storage: Storage, name: str, *, map_files: bool,
                 through_chunks: bool = False) -> None:
        self.storage, self.name, self.through_chunks = storage, name, through_chunks
        self.map_file = getattr(storage, "map_file", None) if map_files else None
        self.ranges: list[Range] = []
        self.loaded: dict[Key, torch.Tensor] = {}
        self.mapped: dict[Key, tuple[torch.Tensor, TensorEntry]] = {}  # the file's bytes
        self.hashes: list[tuple[Subject, str, list[memoryview]]] = []  # expected, bytes
        self.headers: list[tuple[str, int, memoryview, dict[Key, TensorEntry]]] = []
        # format v3: tensors assembled from pieces, pieces read aside, and their headers
        self.assembled: dict[Key, torch.Tensor] = {}
        self.boxes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (box, piece read aside)
        self.pieces_by_file: dict[str, dict[Key, TensorEntry]] = {}
        self.streamed: dict[Key, Destination] = {}  # live targets filled through chunks

    def _map(self, file: str, nbytes: int) -> tuple[memoryview, torch.Tensor] | None:
        """The file's bytes, mapped, when the backend can map it (also as one uint8
        tensor, which each tensor of the file slices); None otherwise."""
        if self.map_file is None:
            return None
        data: memoryview = self.map_file(self.name, file)
        if len(data) != nbytes:
            raise CorruptCheckpointError(
                f"{self.storage.where(self.name)}/{file}: {len(data)} bytes, the manifest says "
                f"{nbytes} (truncated or overwritten)")
        whole = torch.frombuffer(data, dtype=torch.uint8) if nbytes \
            else torch.empty(0, dtype=torch.uint8)
        return data, whole

    def tensors_by_range(self, file: str, record: Mapping[str, Any],
                         wanted: Mapping[Key, TensorEntry],
                         live: Mapping[Key, torch.Tensor]) -> None:
        """Format v2: the header and each wanted tensor, each under its own hash."""
        where = f"{self.storage.where(self.name)}/{file}"
        mapped = self._map(file, record["nbytes"])
        header = mapped[0][:record["header"]] if mapped is not None else \
            self._read(file, 0, memoryview(bytearray(record["header"])))
        self.hashes.append((f"{where}: its header", record["hash"], [header]))
        self.headers.append((file, record["nbytes"], header, dict(wanted)))
        for key, entry in wanted.items():
            if mapped is not None:
                data, whole = mapped
                self.mapped[key] = (whole, entry)
                view = data[entry.begin:entry.end]
            elif _fits(entry, live.get(key)) and (self.through_chunks
                                                  or live[key].device.type != "cpu"):
                self.streamed[key] = Destination(entry, live[key])
                continue
            else:
                self.loaded[key] = _destination(entry, live.get(key))
                view = self._read(file, entry.begin, byte_view(self.loaded[key]))
            self.hashes.append(((file, key), str(entry.hash), [view]))

    def whole_file(self, file: str, record: Mapping[str, Any], wanted: Mapping[Key, TensorEntry],
                   live: Mapping[Key, torch.Tensor]) -> None:
        """Every byte of the file goes somewhere (tensors into their destinations, the
        header and gaps into buffers), in order, so its one hash can be checked."""
        where = f"{self.storage.where(self.name)}/{file}"
        size = record["nbytes"]
        header = read_header(self.storage, self.name, file, size)
        mapped = self._map(file, size)
        if mapped is not None:
            self.hashes.append((where, record["hash"], [mapped[0]]))
            for key, expected in wanted.items():
                self.mapped[key] = (mapped[1], stored_entry(where, header, key[1], expected))
            return
        parts: list[tuple[int, memoryview]] = []
        for key, expected in wanted.items():
            found = stored_entry(where, header, key[1], expected)
            self.loaded[key] = _destination(found, live.get(key))
            parts.append((found.begin, byte_view(self.loaded[key])))
        parts.sort(key=lambda part: part[0])
        views, position = [], 0
        for offset, view in parts:
            if offset > position:  # bytes no wanted entry covers: read them to hash them
                views.append((position, memoryview(bytearray(offset - position))))
            views.append((offset, view))
            position = offset + len(view)
        if size > position:
            views.append((position, memoryview(bytearray(size - position))))
        self.ranges += [Range(file, offset, view) for offset, view in views]
        self.hashes.append((where, record["hash"], [view for _, view in views]))

    def shards(self, key: Key, entry: TensorEntry, files: Mapping[str, Mapping[str, Any]]
               ) -> None:
        """Format v3: a tensor saved in pieces by many ranks, assembled whole in new
        memory: each piece read into its box (through a buffer when the box is not one
        contiguous span), under its own hash, its file's header checked too."""
        dtype = DTYPE_NAMES[entry.dtype]
        whole = torch.empty(entry.shape, dtype=dtype)
        self.assembled[key] = whole
        for shard in entry.shards:
            box = whole
            for dim, (origin, size) in enumerate(zip(shard.origin, shard.size, strict=True)):
                box = box.narrow(dim, origin, size)
            target = box if box.is_contiguous() else torch.empty(shard.size, dtype=dtype)
            if target is not box:
                self.boxes.append((box, target))
            self._header(shard.file, files[shard.file])[key] = TensorEntry(
                file=shard.file, dtype=entry.dtype, shape=shard.size, begin=shard.begin,
                end=shard.end, hash=shard.hash)
            view = self._read(shard.file, shard.begin, byte_view(target))
            self.hashes.append((f"{self.storage.where(self.name)}/{shard.file}: tensor "
                                f"{key[1]!r} of {key[0]!r} (its piece at {list(shard.origin)})",
                                shard.hash, [view]))

    def _header(self, file: str, record: Mapping[str, Any]) -> dict[Key, TensorEntry]:
        """Plan to read and check ``file``'s header once; the entries to compare it with."""
        if file not in self.pieces_by_file:
            header = self._read(file, 0, memoryview(bytearray(record["header"])))
            where = f"{self.storage.where(self.name)}/{file}"
            self.hashes.append((f"{where}: its header", record["hash"], [header]))
            self.pieces_by_file[file] = {}
            self.headers.append((file, record["nbytes"], header, self.pieces_by_file[file]))
        return self.pieces_by_file[file]

    def _read(self, file: str, offset: int, view: memoryview) -> memoryview:
        """Plan to read ``view``'s bytes from ``offset`` of ``file``; returns ``view``."""
        self.ranges.append(Range(file, offset, view))
        return view

    def run(self) -> dict[Key, torch.Tensor]:
        """Read every range, check every hash, then compare the v2 headers."""
        self.storage.read_ranges(self.name, self.ranges)
        checks = [(subject, expected, digest(views[0]) if len(views) == 1
                   else _digest_of_parts(views)) for subject, expected, views in self.hashes]
        if self.streamed:
            targets = list(self.streamed.values())
            hashes = read_into(self.storage, self.name, targets,
                              shared_pool(pinned=any(d.target.is_cuda for d in targets)),
                              transfers_for([d.target for d in targets]), threads=_io.IO_THREADS)
            checks += [((d.entry.file, key), str(d.entry.hash), actual)
                       for (key, d), actual in zip(self.streamed.items(), hashes, strict=True)]
            self.loaded.update({key: d.target for key, d in self.streamed.items()})
        for subject, expected, actual in checks:
            if actual != expected:
                what = subject if isinstance(subject, str) else \
                    f"{self.storage.where(self.name)}/{subject[0]}: tensor {subject[1][1]!r} " \
                    f"of {subject[1][0]!r}"
                raise CorruptCheckpointError(
                    f"{what}: content hash {actual} differs from the manifest's {expected}")
        for file, size, raw, wanted in self.headers:
            where = f"{self.storage.where(self.name)}/{file}"
            length = header_length(bytes(raw[:8]), size, where)
            if 8 + length != len(raw):
                raise CorruptCheckpointError(f"{where}: its header is not {len(raw)} bytes long")
            found = parse_header(bytes(raw[8:]), size, file=file, where=where,
                                 expected={key[1]: saved for key, saved in wanted.items()})
            for key, saved in wanted.items():
                if found.get(key[1]) is saved:  # parse_header found it as the manifest says
                    continue
                entry = stored_entry(where, found, key[1], saved)
                if (entry.begin, entry.end) != (saved.begin, saved.end):
                    raise CorruptCheckpointError(
                        f"{where}: tensor {key[1]!r} is at bytes {entry.begin}..{entry.end} "
                        f"of the file, the manifest says {saved.begin}..{saved.end}")
        self.loaded.update(_views_of(self.mapped))
        for box, piece in self.boxes:
            box.copy_(piece)
        self.loaded.update(self.assembled)
        return self.loaded


def _digest_of_parts(views: Sequence[memoryview]) -> str:
    """The hash of the bytes of ``views`` one after the other (format v1: a whole file)."""
    hasher = xxhash.xxh3_128()
    for view in views:
        hasher.update(view)
    return HASH_PREFIX + hasher.hexdigest()


def _views_of(mapped: Mapping[Key, tuple[torch.Tensor, TensorEntry]]
              ) -> dict[Key, torch.Tensor]:
    """The tensors of mapped files, as views of the files' bytes. A run of tensors of one
    dtype lying end to end in a file is cut by one ``split`` (one call for thousands of
    small tensors, where a view each cost more than their copy)."""
    views: dict[Key, torch.Tensor] = {}
    run: list[tuple[Key, TensorEntry]] = []
    whole = torch.empty(0, dtype=torch.uint8)

    def cut() -> None:
        if len(run) > 1:
            dtype, first, last = DTYPE_NAMES[run[0][1].dtype], run[0][1], run[-1][1]
            pieces = whole[first.begin:last.end].view(dtype).split_with_sizes(
                [(entry.end - entry.begin) // dtype.itemsize for _, entry in run])
            for (key, entry), piece in zip(run, pieces, strict=True):
                views[key] = piece if len(entry.shape) == 1 else piece.view(entry.shape)
        elif run:
            views[run[0][0]] = _view_of(whole, run[0][1])
        run.clear()

    for key, (file_bytes, entry) in sorted(mapped.items(), key=lambda item: (
            id(item[1][0]), item[1][1].begin)):
        if run and (file_bytes is not whole or entry.dtype != run[-1][1].dtype
                    or entry.begin != run[-1][1].end):
            cut()
        whole = file_bytes
        run.append((key, entry))
        if entry.end == entry.begin or entry.begin % DTYPE_NAMES[entry.dtype].itemsize:
            cut()  # empty, or (a foreign file) unaligned: a view of its own, or a copy
    cut()
    return views


def _view_of(whole: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The tensor ``entry`` describes, as a view of a mapped file's bytes (``whole``)."""
    dtype = DTYPE_NAMES[entry.dtype]
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=dtype)
    raw = whole[entry.begin:entry.end]
    if entry.begin % dtype.itemsize:
        raw = raw.clone()  # a foreign file with unaligned data: realign before the view
    return raw.view(dtype).view(entry.shape)


def _destination(entry: TensorEntry, target: torch.Tensor | None) -> torch.Tensor:
    """The target itself when the saved bytes can land in its memory, else new memory."""
    if target is not None and target.device.type == "cpu" and _fits(entry, target):
        return target
    return torch.empty(entry.shape, dtype=DTYPE_NAMES[entry.dtype])


def _fits(entry: TensorEntry, target: torch.Tensor | None) -> bool:
    """Whether the saved bytes can land in ``target``'s memory as they are. (A conjugate
    or negative view's memory holds other values than it shows.)"""
    return target is not None and target.is_contiguous() \
        and target.dtype == DTYPE_NAMES[entry.dtype] and tuple(target.shape) == entry.shape \
        and not target.is_conj() and not target.is_neg()


def read_header(storage: Storage, name: str, file: str, size: int) -> dict[str, TensorEntry]:
    """A safetensors file's header entries (absolute byte ranges), read by range."""
    where = f"{storage.where(name)}/{file}"
    prefix = memoryview(bytearray(8))
    storage.read_ranges(name, [Range(file, 0, prefix[: min(8, size)])])
    length = header_length(bytes(prefix[: min(8, size)]), size, where)
    raw = memoryview(bytearray(length))
    storage.read_ranges(name, [Range(file, 8, raw)])
    return parse_header(bytes(raw), size, file=file, where=where)


def check_files(storage: Storage, name: str, manifest: Mapping[str, Any]) -> list[str]:
    """Stream every file of a checkpoint through its hashes; the problems found.

    Each file is read in windows of :data:`VERIFY_WINDOW` bytes (a few in flight),
    so memory stays small whatever the checkpoint's size. v2 tensor files: the
    header and each tensor against their own hashes; other files: the whole file.
    """
    spans: dict[str, list[tuple[int, int, str, str]]] = defaultdict(list)
    for file, record in manifest["files"].items():
        if "header" in record:
            spans[file].append((0, record["header"], record["hash"], "its header"))
        else:
            spans[file].append((0, record["nbytes"], record["hash"], "its content"))
    for obj in manifest["objects"].values():
        for key, info in obj["tensors"].items():
            for piece in info.get("shards", [info]):  # format v3: each rank's piece
                if "offsets" in piece:
                    begin, end = piece["offsets"]
                    spans[piece["file"]].append((begin, end, piece["hash"], f"tensor {key!r}"))
    problems = []
    for file, file_spans in spans.items():
        problem = _stream_hashes(storage, name, file, sorted(file_spans))
        if problem:
            problems.append(f"{storage.where(name)}/{file}: {problem}")
    return problems


def _stream_hashes(storage: Storage, name: str, file: str,
                   spans: list[tuple[int, int, str, str]]) -> str | None:
    """Read ``file`` once, in order, feeding each span's bytes to its own hasher."""
    end = max((span[1] for span in spans), default=0)
    hashers = [xxhash.xxh3_128() for _ in spans]
    window_span = VERIFY_WINDOW * _WINDOWS_IN_FLIGHT
    for start in range(0, end, window_span):
        views = [memoryview(bytearray(min(VERIFY_WINDOW, end - offset)))
                 for offset in range(start, min(end, start + window_span), VERIFY_WINDOW)]
        storage.read_ranges(name, [Range(file, start + i * VERIFY_WINDOW, view)
                                   for i, view in enumerate(views)])
        data = b"".join(views) if len(views) > 1 else views[0]
        for (begin, stop, _, _), hasher in zip(spans, hashers, strict=True):
            low, high = max(begin, start), min(stop, start + len(data))
            if low < high:
                hasher.update(memoryview(data)[low - start: high - start])
    for (_, _, expected, what), hasher in zip(spans, hashers, strict=True):
        actual = HASH_PREFIX + hasher.hexdigest()
        if actual != expected:
            return f"content hash of {what} is {actual}, the manifest says {expected}"
    return None

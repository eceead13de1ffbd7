"""Tensors from a Storage: one read path that checks every byte it hands back
(writing: ckpts._tensors.writing).

Reading (:func:`read_tensors`) asks the storage for byte ranges, in parallel, and
checks hashes before anything is handed back: per tensor for format v2 (only the
tensors asked for are read), per whole file for format v1 (whose files are read
whole, gaps and headers included, since one hash covers them all). The same
reader serves restore (bytes land straight in the live tensors), ``load_weights``,
``load_state`` and ``diff`` (every tensor checked before any is copied out: in the
page cache through a memory map where the backend can map files, else read into
new memory).
(``verify`` streams whole files through the hashes: ckpts._checkpoint.verify.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xxhash

from ckpts._format.headers import header_length, parse_header, read_header
from ckpts._format.manifest import HASH_PREFIX, TensorEntry, digest
from ckpts._format.safetensors import DTYPE_NAMES, byte_view, stored_entry
from ckpts._tensors.gc import paused_gc
from ckpts._tensors.pieces import BoxRead
from ckpts._tensors.streaming import (
    Destination,
    read_into,
    shared_pool,
    transfers_for,
)
from ckpts.errors import CorruptCheckpointError
from ckpts.storage._port import Range, Storage

# a tensor, as the readers name it: (saved object name, tensor key)
Key = tuple[str, str]

# what a checked hash covers, for its error message: the text, or (file, tensor) for a
# whole tensor, put into words only when its check fails (formatting 10,000 messages
# that are never shown cost a tenth of a small-tensor load)
Subject = str | tuple[str, Key]


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
    (ckpts._tensors.streaming; with ``through_chunks``, CPU ones too). Otherwise every
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

    With ``map_files``, a backend that can memory-map a file (``Storage.map_file``,
    LocalStorage's) lends its bytes instead: they are hashed where they lie in the page
    cache, and tensors are views of the map until the caller copies them out (one
    copy in all, as from a read into new memory, without its page faults).
    """

    def __init__(self, storage: Storage, name: str, *, map_files: bool,
                 through_chunks: bool = False) -> None:
        self.storage, self.name, self.through_chunks = storage, name, through_chunks
        self.map_files = map_files
        self.ranges: list[Range] = []
        self.loaded: dict[Key, torch.Tensor] = {}
        self.mapped: dict[Key, tuple[torch.Tensor, TensorEntry]] = {}  # the file's bytes
        self.hashes: list[tuple[Subject, str, list[memoryview]]] = []  # expected, bytes
        self.headers: list[tuple[str, int, memoryview, dict[Key, TensorEntry]]] = []
        # format v3: tensors assembled from pieces, the reads of the pieces, their headers
        self.assembled: dict[Key, torch.Tensor] = {}
        self.pieces: list[tuple[str, BoxRead]] = []  # (what the read is, for errors; it)
        self.pieces_by_file: dict[str, dict[Key, TensorEntry]] = {}
        self.streamed: dict[Key, Destination] = {}  # live targets filled through chunks

    def _map(self, file: str, nbytes: int) -> tuple[memoryview, torch.Tensor] | None:
        """The file's bytes, mapped, when the backend can map it (also as one uint8
        tensor, which each tensor of the file slices); None otherwise."""
        data = self.storage.map_file(self.name, file) if self.map_files else None
        if data is None:
            return None
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
        memory: each piece read whole, in one read, into its box (through a buffer when
        the box is not one contiguous span; ckpts._tensors.pieces), under its own hash,
        its file's header checked too."""
        dtype = DTYPE_NAMES[entry.dtype]
        whole = torch.empty(entry.shape, dtype=dtype)
        self.assembled[key] = whole
        for shard in entry.shards:
            box = whole
            for dim, (origin, size) in enumerate(zip(shard.origin, shard.size, strict=True)):
                box = box.narrow(dim, origin, size)
            self._header(shard.file, files[shard.file])[key] = TensorEntry(
                file=shard.file, dtype=entry.dtype, shape=shard.size, begin=shard.begin,
                end=shard.end, hash=shard.hash)
            read = BoxRead(shard, dtype, [0] * len(shard.size), shard.size, box)
            self.ranges += read.ranges()
            self.pieces.append((f"{self.storage.where(self.name)}/{shard.file}: tensor "
                                f"{key[1]!r} of {key[0]!r} (its piece at {list(shard.origin)})",
                                read))

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
                              transfers_for([d.target for d in targets]),
                              threads=self.storage.io_threads())
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
        for what, read in self.pieces:
            read.check_and_land(what)
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

"""Format v4: the tensor tables out of the manifest, in index files it covers by hash (no torch).

A v4 ``manifest.json`` holds what is per checkpoint, and for each object with tensors
only the name of the index file that describes it (``"index"``). Three kinds of index:

- ``<object>.index.json`` (a save by one process): the object's JSON tree, tied
  aliases and tensor entries, as a v2 manifest held them;
- ``layout.json`` (a save by many ranks, written by rank 0): the tree and aliases of
  each object the ranks share (model, optimizer), and each tensor's dtype, global
  shape and compact layout (ckpts._format.layout): O(tensors), whatever the ranks;
- ``rank-NNNNN.json`` (one per rank, written by that rank): its data files with their
  sizes and header hashes, each shared tensor's piece it saved (file, byte range,
  hash, block hashes), and its per-rank objects (RNG, loader positions) whole.

The manifest records each index file's size and xxh3-128 hash, an index records each
data file's header hash and each tensor's (or block's) hash: every byte a reader uses
is covered by a chain of hashes from the manifest. :class:`Contents` reads the index
files a reader needs, checks each against its hash before using it, and hands back
objects in the v3 shape (``tree``, ``aliases``, ``tensors``), so the readers of every
format share one code path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ckpts._format.layout import Layout, every_piece, layout_problem
from ckpts._format.manifest import (
    DTYPE_SIZES,
    INDEXED_FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    check_file_name,
    check_file_record,
    check_tensor_entries,
    digest,
    is_shape,
    load_manifest,
    piece_fits,
)
from ckpts.errors import CorruptCheckpointError
from ckpts.storage._port import MANIFEST

if TYPE_CHECKING:
    from ckpts.storage._port import Storage

LAYOUT = "layout.json"


def object_index_name(name: str) -> str:
    """The index file of an object saved by one process."""
    return f"{name}.index.json"


def rank_index_name(rank: int) -> str:
    """The index file of one rank of a job."""
    return f"rank-{rank:05d}.json"


def read_manifest(storage: Storage, name: str, *, tensor_entries: bool = True,
                  sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Load and check a checkpoint's manifest and, with ``tensor_entries``, every
    object's tensor entries: a v4 manifest comes back expanded as v1-v3 held it
    (:meth:`Contents.expanded`, which reads every index file). ``tensor_entries=False``
    reads the manifest alone (a listing; a reader of some objects then uses
    :class:`Contents`). ``sizes`` and the errors: see
    :func:`ckpts._format.manifest.load_manifest`.
    """
    manifest = load_manifest(storage, name, tensor_entries=tensor_entries, sizes=sizes)
    if tensor_entries and manifest["format_version"] >= INDEXED_FORMAT_VERSION:
        return Contents(storage, name, manifest).expanded()
    return manifest


class Contents:
    """What a committed checkpoint holds beyond its manifest's own fields: each object's
    tree, aliases and tensor entries, and every file. Format v4 keeps them in index
    files, read when first needed (each once) and checked against the manifest's hash;
    v1-v3 keep them in the manifest itself.

    Raises (from every method): CorruptCheckpointError naming the file when an index
    is missing from the manifest, has another size or hash, or is malformed; OSError
    when the storage fails.
    """

    def __init__(self, storage: Storage, name: str, manifest: dict[str, Any]) -> None:
        self.storage, self.name, self.manifest = storage, name, manifest
        self.where = storage.where(name)
        self.files: dict[str, Any] = dict(manifest["files"])  # grows with each rank index
        self._indexes: dict[str, dict[str, Any]] = {}
        self._objects: dict[tuple[str, bool], dict[str, Any]] = {}
        size = manifest.get("world_size", 1)
        if type(size) is not int or size < 1 or (LAYOUT in self.files and (
                size > len(self.files)
                or any(rank_index_name(rank) not in self.files for rank in range(size)))):
            raise CorruptCheckpointError(
                f"{self.where}/{MANIFEST}: world_size {str(size)[:20]} does not match the "
                "ranks' index files it lists: the manifest is damaged; restore another "
                "checkpoint")

    @property
    def indexed(self) -> bool:
        """Whether the checkpoint keeps its tensor tables in index files (format v4)."""
        return bool(self.manifest["format_version"] >= INDEXED_FORMAT_VERSION)

    def index(self, file: str) -> dict[str, Any]:
        """An index file's content, checked against the manifest's size and hash."""
        if file in self._indexes:
            return self._indexes[file]
        where = f"{self.where}/{file}"
        record = self.manifest["files"].get(file)
        if record is None:
            raise CorruptCheckpointError(
                f"{self.where}/{MANIFEST} does not list the index {file}: the manifest is "
                "damaged; restore another checkpoint")
        if record["nbytes"] > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where} is recorded with {record['nbytes']} bytes, "
                                         "more than any index: the manifest is damaged")
        try:
            payload = self.storage.read(self.name, file)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{where} is missing; restore another checkpoint") from e
        if len(payload) != record["nbytes"] or digest(payload) != record["hash"]:
            raise CorruptCheckpointError(
                f"{where} differs from the manifest's record of it (size or hash): it is "
                "damaged; restore another checkpoint, and run `ckpts verify` on this one")
        try:
            content = json.loads(payload)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{where} is not a valid JSON index: {e}") from e
        if not isinstance(content, dict) or not isinstance(content.get("objects", {}), dict) \
                or not isinstance(content.get("files", {}), dict) \
                or not isinstance(content.get("pieces", {}), dict):
            raise CorruptCheckpointError(f"{where} is not a ckpts index")
        for data_file, data_record in content.get("files", {}).items():  # a rank's files
            check_file_name(data_file, where)
            check_file_record(data_file, data_record, where)
            if self.files.get(data_file, data_record) != data_record:
                raise CorruptCheckpointError(f"{where} records {data_file}, which another "
                                             "index records otherwise")
        self.files.update(content.get("files", {}))
        self._indexes[file] = content
        return content

    def rank_index(self, rank: int) -> dict[str, Any]:
        """The index of one rank of the job (its data files join :attr:`files`)."""
        return self.index(rank_index_name(rank))

    def object(self, name: str, *, located: bool = True) -> dict[str, Any]:
        """Saved object ``name`` as v1-v3 manifests hold it: kind, class, tree, aliases,
        and tensor entries, checked. ``located=False`` leaves a shared object's tensors
        as its layout gives them (dtype, shape and layout: no rank index is read), for
        a rank that plans its own reads (ckpts._checkpoint.sharded)."""
        key = (name, located)
        if key in self._objects:
            return self._objects[key]
        described: dict[str, Any] = self.manifest["objects"][name]
        if "index" not in described:  # v1-v3, or an object without tensors
            check_tensor_entries(self.manifest, name, f"{self.where}/{MANIFEST}")
            self._objects[key] = described
            return described
        file = described["index"]
        saved = self.index(file).get("objects", {}).get(name)
        where = f"{self.where}/{file}"
        if not isinstance(saved, dict) or "tree" not in saved \
                or not isinstance(saved.get("tensors"), dict) \
                or not isinstance(saved.get("aliases", {}), dict):
            raise CorruptCheckpointError(f"{where} does not describe object {name!r}")
        if not all(isinstance(target, str) and target in saved["tensors"]
                   for target in saved.get("aliases", {}).values()):
            raise CorruptCheckpointError(f"{where}: object {name!r} has malformed aliases")
        obj = {**{k: v for k, v in described.items() if k != "index"}, "tree": saved["tree"],
               "tensors": saved["tensors"], "aliases": saved.get("aliases", {})}
        if file == LAYOUT:
            self._check_layouts(name, saved["tensors"], where)
            if located:
                obj["tensors"] = {key: self._located(name, key, entry)
                                  for key, entry in saved["tensors"].items()}
        # the tree's depth, and the entries unless they are layouts (checked above)
        checked = obj if located or file != LAYOUT else {**obj, "tensors": {}}
        check_tensor_entries({"files": self.files, "format_version": INDEXED_FORMAT_VERSION,
                              "objects": {name: checked}}, name, where)
        self._objects[key] = obj
        return obj

    def _check_layouts(self, name: str, entries: Mapping[str, Any], where: str) -> None:
        size = self.manifest.get("world_size", 1)
        for key, entry in entries.items():
            problem = layout_problem(entry, size)
            if problem is None and entry.get("dtype") not in DTYPE_SIZES:
                problem = "has no known dtype"
            if problem is not None:
                raise CorruptCheckpointError(f"{where}: tensor {key!r} of object {name!r} "
                                             f"{problem}; restore another checkpoint")

    def _located(self, name: str, key: str, entry: Mapping[str, Any]) -> dict[str, Any]:
        """A shared tensor's v3 entry: each saved piece, found in its rank's index."""
        layout = Layout.from_json(entry)
        shards = []
        for rank, (origin, size) in every_piece(layout):
            shards.append(self.located_piece(rank, name, key, entry, origin, size))
        if len(shards) == 1 and shards[0]["size"] == list(layout.shape):
            whole = {k: v for k, v in shards[0].items() if k not in ("origin", "size")}
            return {**whole, "dtype": entry["dtype"], "shape": entry["shape"]}
        return {"dtype": entry["dtype"], "shape": entry["shape"], "shards": shards}

    def located_piece(self, rank: int, name: str, key: str, entry: Mapping[str, Any],
                      origin: Sequence[int], size: Sequence[int]) -> dict[str, Any]:
        """Rank ``rank``'s piece of shared tensor ``key`` (layout ``entry``) as a v3 shard,
        at its box ``origin``, ``size``: checked to fit the tensor and the rank's file."""
        piece = {**self.piece(rank, name, key), "origin": list(origin), "size": list(size)}
        if not piece_fits(piece, entry["shape"], DTYPE_SIZES[entry["dtype"]], self.files):
            raise CorruptCheckpointError(
                f"{self.where}/{rank_index_name(rank)}: the piece of tensor {key!r} of "
                f"object {name!r} has a byte range or hash that does not fit it")
        return piece

    def piece(self, rank: int, name: str, key: str) -> dict[str, Any]:
        """Where rank ``rank`` saved its piece of shared tensor ``key`` of ``name``."""
        pieces = self.rank_index(rank).get("pieces", {}).get(name)
        piece = pieces.get(key) if isinstance(pieces, dict) else None
        if not isinstance(piece, dict) or not isinstance(piece.get("file"), str) \
                or not is_shape(piece.get("offsets")) or not isinstance(piece.get("hash"), str):
            raise CorruptCheckpointError(
                f"{self.where}/{rank_index_name(rank)} lacks rank {rank}'s piece of tensor "
                f"{key!r} of object {name!r}, which {LAYOUT} says it saved: the checkpoint "
                "is damaged; restore another checkpoint")
        return piece

    def expanded(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """The manifest as v1-v3 held it: every object (or just ``names``) with its tree
        and located tensor entries, and every file (rank indexes read: all of them)."""
        manifest = dict(self.manifest)
        wanted = list(manifest["objects"] if names is None else names)
        objects = dict(manifest["objects"])
        objects.update({name: self.object(name) for name in wanted})
        if self.indexed and names is None:
            for rank in range(manifest.get("world_size", 1) if LAYOUT in self.files else 0):
                self.rank_index(rank)
        manifest.update(objects=objects, files=dict(self.files))
        return manifest

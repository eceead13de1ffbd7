"""The manifest: the commit marker and table of contents of a checkpoint (no torch needed).

``manifest.json`` is written last into a checkpoint. It holds the format version,
step, epoch, metrics, tags, creation time, library versions, and every file with its
byte size and xxh3-128 hash. Reading it needs only the standard library, so listing
a run never imports torch.

Format v4 (written now) keeps the manifest small whatever the tensors and ranks: an
object with tensors is described by an index file that the manifest covers by hash
(ckpts._format.index), and a tensor saved by many ranks by its compact layout
(ckpts._format.layout). Formats v1-v3 (still read) hold each object's JSON tree and
tensor entries in the manifest: v2 a record per tensor (file, byte range, own hash),
v3 also a record per rank's shard, v1 none (a file's hash covers the whole file).
docs/format.md has every schema.

xxh3-128 runs at memory speed (~15 GB/s here, against ~1.5 GB/s for sha256), so
hashing costs a save almost nothing. It detects corruption, not tampering.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import xxhash

from ckpts.errors import (
    CorruptCheckpointError,
    FormatVersionError,
    NotACheckpointError,
    WriteError,
)
from ckpts.storage._port import MANIFEST

if TYPE_CHECKING:
    from ckpts.storage._port import Storage

FORMAT_NAME = "ckpts"
SHARDED_FORMAT_VERSION = 3  # the first with tensor shards and per-rank objects
INDEXED_FORMAT_VERSION = 4  # the first with index files and compact layouts
FORMAT_VERSION = INDEXED_FORMAT_VERSION  # what a save writes
READABLE_VERSION = INDEXED_FORMAT_VERSION
BLOCK = 2**20  # v3: a tensor or shard above this many bytes has a hash per block of it
HASH_PREFIX = "xxh3_128:"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# JSON levels an object's tree may nest (a state_dict nests under 10): what the codec
# writes, and what readers that walk a tree (decode, diff) can walk without recursing deep
MAX_TREE_DEPTH = 100

# safetensors dtype names (all that safetensors 0.8 stores) and their sizes in bytes
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype name, shape, byte range in the file and,
    from format v2, its own hash (v1: ``None``, and the range comes from the header).
    A tensor saved by many ranks (format v3) has ``shards`` instead of a file."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0
    hash: str | None = None
    shards: tuple[Shard, ...] = ()


@dataclass(frozen=True)
class Shard:
    """One saved piece of a tensor: a rank's piece (format v3), or a whole tensor seen
    as the one piece at the origin (:func:`tensor_pieces`). Its bytes are ``begin ..
    end`` of ``file`` (a safetensors tensor of shape ``size`` under the tensor's key),
    under ``hash``, and above BLOCK bytes (v3) also under ``blocks``, the hash of each
    BLOCK of them; ``origin`` is its place in the whole tensor."""

    file: str
    begin: int
    end: int
    hash: str
    origin: tuple[int, ...]
    size: tuple[int, ...]
    blocks: tuple[str, ...] = ()


def manifest_allowance(tensors: int) -> int:
    """A generous bound on a manifest's size (and the headers'): ~300 bytes a tensor."""
    return 300 * tensors + 65536


def digest(data: Any) -> str:
    """The xxh3-128 hash of bytes (or a buffer), as the manifest records it."""
    return HASH_PREFIX + xxhash.xxh3_128(data).hexdigest()


def encode_json(data: Any) -> bytes:
    """Strict (no NaN), compact JSON: a 40,000-tensor manifest encodes 5x faster than
    indented."""
    return (json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n").encode()


def load_manifest(storage: Storage, name: str, *, tensor_entries: bool = True,
                  sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Load and check a checkpoint's manifest file (its index files, format v4, are
    left to ckpts._format.index.read_manifest, which most readers call).

    Args:
        storage: the run's storage.
        name: the checkpoint's name in it.
        tensor_entries: False leaves the objects' tensor entries and the depth of their
            trees unchecked (everything else is checked): a reader of one object out of
            many then checks just that object with :func:`check_tensor_entries` before
            using it.
        sizes: the checkpoint's file sizes, when the caller has them (a listing's);
            else the checkpoint is listed: a manifest above MAX_MANIFEST_BYTES is
            refused by its size, before it is read.

    Raises:
        NotACheckpointError: the checkpoint has no manifest (not committed, deleted).
        CorruptCheckpointError: it is not a valid manifest.
        FormatVersionError: a newer ckpts wrote it.
        OSError: the storage failed.
    """
    where = f"{storage.where(name)}/{MANIFEST}"
    _check_size((storage.sizes(name) if sizes is None else sizes).get(MANIFEST, 0), where)
    try:
        payload = storage.read(name, MANIFEST)
    except FileNotFoundError as e:
        raise NotACheckpointError(
            f"{storage.where(name)} is not a committed checkpoint (no {MANIFEST}); pass a "
            "step-* checkpoint of a run, e.g. manager.latest()") from e
    return parse_manifest(payload, where, tensor_entries=tensor_entries)


def parse_manifest(payload: bytes, where: str, *, tensor_entries: bool = True
                   ) -> dict[str, Any]:
    """Parse and check manifest bytes (see :func:`check_manifest`)."""
    _check_size(len(payload), where)
    try:
        manifest = json.loads(payload)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd numbers or depth
        raise CorruptCheckpointError(f"{where} is not a valid JSON manifest: {e}") from e
    check_manifest(manifest, where, tensor_entries=tensor_entries)
    return manifest  # type: ignore[no-any-return]


def _check_size(size: int, where: str) -> None:
    if size > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"{where} has {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES}): it is "
            "damaged or not a ckpts manifest; restore another checkpoint, or delete this one")


def check_manifest(manifest: Any, path: str, *, tensor_entries: bool = True) -> None:
    """Check a manifest against its version's schema (docs/format.md), strictly.

    Every field has its type checked, file names cannot leave the checkpoint, and
    every tensor entry names a listed file, a known dtype and a shape (v2: and a
    byte range inside its file that fits them, and a hash); anything else is a
    CorruptCheckpointError naming the field. With ``tensor_entries=False`` the
    tensor entries and the trees' depth are left to :func:`check_tensor_entries`
    (most of the work: a state of 40,000 small tensors has 40,000 of them, a
    weights-only load reads 10,000); each object's own fields are checked all the same.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{path} is not a ckpts manifest (no \"format\": \"ckpts\")")
    version = _field(manifest, "format_version", int, path)
    if version > READABLE_VERSION:
        raise FormatVersionError(
            f"{path} uses format version {version}, but this ckpts reads up to version "
            f"{READABLE_VERSION}; upgrade ckpts to read it."
        )
    if version < 1 or _field(manifest, "step", int, path) < 0:
        raise CorruptCheckpointError(f"{path}: format_version and step must be positive")
    epoch = manifest.get("epoch")
    if epoch is not None and (type(epoch) is not int or epoch < 0):
        raise CorruptCheckpointError(f"{path}: epoch must be null or an int >= 0")
    _field(manifest, "created", str, path)
    _check_metrics(_field(manifest, "metrics", dict, path), path)
    tags = _field(manifest, "tags", list, path)
    if not all(isinstance(tag, str) for tag in tags):
        raise CorruptCheckpointError(f"{path}: tags must be strings")
    files = _field(manifest, "files", dict, path)
    for name, record in files.items():
        check_file_name(name, path)
        check_file_record(name, record, path)
    for name, obj in _field(manifest, "objects", dict, path).items():
        _check_object(name, obj, files, version, path)
        if tensor_entries and "index" not in obj:  # an index is checked when read
            check_tensor_entries(manifest, name, path)
    per_rank = manifest.get("per_rank", [])
    if not isinstance(per_rank, list) or not all(isinstance(n, str) for n in per_rank):
        raise CorruptCheckpointError(f"{path}: per_rank must be a list of object names")


def check_file_record(name: str, record: Any, path: str) -> None:
    """A file's record: its size, its hash and (a tensor file) its header's size."""
    header = record.get("header", 0) if isinstance(record, dict) else None
    if not isinstance(record, dict) or type(record.get("nbytes")) is not int \
            or record["nbytes"] < 0 or not isinstance(record.get("hash"), str) \
            or type(header) is not int or not 0 <= header <= record["nbytes"]:
        raise CorruptCheckpointError(f"{path}: file record for {name!r} is malformed")


def piece_fits(piece: dict[str, Any], shape: list[int], itemsize: int,
               files: Mapping[str, Any]) -> bool:
    """A shard's entry (with its ``origin`` and ``size``) fits its tensor and its file."""
    return _fits(piece, piece.get("origin"), piece.get("size"), shape, itemsize, files)


def _fits(piece: dict[str, Any], origin: Any, size: Any, shape: list[int], itemsize: int,
          files: Mapping[str, Any]) -> bool:
    """A tensor's (or shard's) entry: a listed file, a hash, a byte range in the file's
    data that fits ``size``, the box at ``origin`` inside the tensor's shape (a shard;
    None for a whole tensor), and (v3) either no block hashes or one per BLOCK."""
    offsets = piece.get("offsets")
    if not isinstance(piece.get("hash"), str) or piece.get("file") not in files \
            or not is_shape(offsets) or len(offsets) != 2:
        return False
    if origin is not None and not (
            is_shape(origin) and is_shape(size) and len(origin) == len(shape) == len(size)
            and all(o + n <= d for o, n, d in zip(origin, size, shape, strict=True))):
        return False
    record, numel = files[piece["file"]], math.prod(size)
    blocks = piece.get("blocks")
    return bool(record.get("header", 0) <= offsets[0] <= offsets[1] <= record["nbytes"]
                and offsets[1] - offsets[0] == numel * itemsize
                and (blocks is None or (isinstance(blocks, list)
                     and all(isinstance(b, str) for b in blocks)
                     and len(blocks) in (0, -(-numel * itemsize // BLOCK)))))


def check_tensor_entries(manifest: dict[str, Any], name: str, path: str) -> None:
    """Check the tensor entries of object ``name`` of a manifest that
    :func:`check_manifest` checked with ``tensor_entries=False`` (or already checked),
    and that its tree nests at most MAX_TREE_DEPTH deep.

    Raises:
        CorruptCheckpointError: an entry is malformed, or the tree too deep; the message
            names the tensor, the object and the manifest ``path``.
    """
    if _nests_too_deep(manifest["objects"][name]["tree"]):
        raise CorruptCheckpointError(
            f"{path}: object {name!r} nests deeper than {MAX_TREE_DEPTH} levels in its state, "
            "which ckpts never writes: the manifest is damaged; restore another checkpoint")
    files, version = manifest["files"], manifest["format_version"]
    for key, info in manifest["objects"][name]["tensors"].items():
        problem = _entry_problem(info, files, version)
        if problem is not None:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} of object {name!r} {problem}")


def _entry_problem(info: Any, files: dict[str, Any], version: int) -> str | None:
    """What is wrong with one tensor entry, or None: it names a listed file (v3: or
    has shards), a known dtype and a shape; from v2, a hash and a byte range in the
    file's data that fits them (v3: each shard's, inside the whole tensor, and the
    shards together cover the tensor once)."""
    located = isinstance(info, dict) and (
        (isinstance(info.get("shards"), list) and info["shards"] and "file" not in info)
        or (isinstance(info.get("file"), str) and info["file"] in files))
    if not located or not isinstance(info.get("dtype"), str) \
            or info["dtype"] not in DTYPE_SIZES or not is_shape(info.get("shape")):
        return "has a malformed entry"
    shape, itemsize = info["shape"], DTYPE_SIZES[info["dtype"]]
    if "shards" in info:
        if version < SHARDED_FORMAT_VERSION:
            return f"has shards, which format {version} lacks"
        fits = all(isinstance(piece, dict) and _fits(
            piece, piece.get("origin"), piece.get("size"), shape, itemsize, files)
            for piece in info["shards"])
        if fits and not _tiles(info["shards"], shape):
            return (f"has shards that do not cover its shape {shape} exactly once (a gap or "
                    "an overlap): the manifest is damaged; restore another checkpoint")
    else:  # the whole tensor (no box to check): 40,000 of these in a big optimizer
        fits = version < 2 or _fits(info, None, shape, shape, itemsize, files)
    return None if fits else "has a malformed byte range, shard or hash"


def _tiles(shards: list[dict[str, Any]], shape: list[int]) -> bool:
    """Whether shards (each inside ``shape``: :func:`_fits`) cover the tensor exactly
    once, as a DTensor's shards do: along each dimension the shards' spans follow each
    other from 0 to the end, and the shards are every combination of those spans, each
    once (a shard of no elements covers nothing). Linear in the shards, but for a sort."""
    if not all(shape):  # no elements to cover (so every shard, inside it, is empty)
        return True
    boxes = [(piece["origin"], piece["size"]) for piece in shards if all(piece["size"])]
    if len({(tuple(origin), tuple(size)) for origin, size in boxes}) != len(boxes):
        return False  # a shard listed twice
    combinations = 1
    for dim, extent in enumerate(shape):
        spans = sorted({(origin[dim], origin[dim] + size[dim]) for origin, size in boxes})
        end = 0
        for begin, stop in spans:
            if begin != end:  # a gap, or spans that overlap
                return False
            end = stop
        if end != extent:
            return False
        combinations *= len(spans)
    return combinations == len(boxes)


def _nests_too_deep(tree: Any) -> bool:
    """Whether a JSON value nests lists and dicts more than MAX_TREE_DEPTH deep (the
    value itself is level 1). Level by level, each node once and no recursion, so the
    answer never depends on Python's recursion limit."""
    level = [tree] if isinstance(tree, (dict, list)) else []
    for _ in range(MAX_TREE_DEPTH):
        if not level:
            return False
        level = [child for node in level for child in (
            node.values() if type(node) is dict else node) if isinstance(child, (dict, list))]
    return bool(level)


def _check_object(name: str, obj: Any, files: Mapping[str, Any], manifest_version: int,
                  path: str) -> None:
    """An object's own fields (its tensor entries: :func:`check_tensor_entries`): its
    tree and tensors, or (v4) the listed index file that holds them."""
    if not isinstance(obj, dict) or not isinstance(obj.get("kind", ""), str):
        raise CorruptCheckpointError(f"{path}: object {name!r} is malformed")
    if "index" in obj:
        if manifest_version < INDEXED_FORMAT_VERSION or not isinstance(obj["index"], str) \
                or obj["index"] not in files:
            raise CorruptCheckpointError(
                f"{path}: object {name!r} names an index {str(obj['index'])[:80]!r} that the "
                f"manifest does not list (or format {manifest_version} has no indexes)")
        if not isinstance(obj.get("hf_config", {}), dict):
            raise CorruptCheckpointError(f"{path}: object {name!r} has a malformed hf_config")
        return
    if "tree" not in obj or not isinstance(obj.get("tensors"), dict):
        raise CorruptCheckpointError(f"{path}: object {name!r} is malformed")
    if not isinstance(obj.get("hf_config", {}), dict):
        raise CorruptCheckpointError(f"{path}: object {name!r} has a malformed hf_config")
    aliases = obj.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(target, str) and target in obj["tensors"] for target in aliases.values()
    ):
        raise CorruptCheckpointError(f"{path}: object {name!r} has malformed aliases")


def _check_metrics(metrics: dict[str, Any], path: str) -> None:
    for name, value in metrics.items():
        number = type(value) in (int, float) or (
            isinstance(value, dict) and value.get("__float__") in ("nan", "inf", "-inf")
            and len(value) == 1
        )
        if not number:
            raise CorruptCheckpointError(f"{path}: metric {name!r} is not a number")


def check_file_name(name: str, manifest_path: str) -> None:
    """Refuse a file reference that could escape the checkpoint directory."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name \
            or len(name.encode("utf-8", "replace")) > 255:
        raise CorruptCheckpointError(
            f"{manifest_path}: file name {name[:80]!r} is not a plain name inside the checkpoint"
        )


def manifest_tensor_entries(obj: Mapping[str, Any]) -> dict[str, TensorEntry]:
    """The tensor entries of one manifest object (dtype, shape and file of each key)."""
    return {key: tensor_entry(info) for key, info in obj["tensors"].items()}


def tensor_entry(info: Mapping[str, Any]) -> TensorEntry:
    """One manifest tensor entry (checked by :func:`check_manifest`) as a record."""
    shape = tuple(info["shape"])
    if "shards" in info:
        return TensorEntry(file="", dtype=info["dtype"], shape=shape, shards=tensor_pieces(info))
    if "hash" in info:  # positional: 10,000 entries are made per load of 10,000 weights
        begin, end = info["offsets"]
        return TensorEntry(info["file"], info["dtype"], shape, begin, end, info["hash"])
    # v1 (the range is in the file's header), or a v4 layout (no file: many ranks' pieces)
    return TensorEntry(file=info.get("file", ""), dtype=info["dtype"], shape=shape)


def tensor_pieces(info: Mapping[str, Any]) -> tuple[Shard, ...]:
    """The saved pieces of a v2 or v3 tensor entry (checked): its shards, or the whole
    tensor as the one piece at the origin."""
    if "shards" in info:
        return tuple(_shard(piece, piece["origin"], piece["size"]) for piece in info["shards"])
    return (_shard(info, [0] * len(info["shape"]), info["shape"]),)


def _shard(piece: Mapping[str, Any], origin: list[int], size: list[int]) -> Shard:
    begin, end = piece["offsets"]
    return Shard(piece["file"], begin, end, piece["hash"], tuple(origin), tuple(size),
                 tuple(piece.get("blocks", ())))


def new_tensor_entry(file: str, dtype: str, shape: Sequence[int], begin: int, end: int,
                     tensor_hash: str, blocks: Sequence[str] | None = None) -> dict[str, Any]:
    """The manifest entry of a tensor saved whole (what :func:`tensor_entry` reads): in
    ``file`` at bytes ``begin .. end``, under ``tensor_hash`` and (v3, above BLOCK
    bytes) ``blocks``."""
    entry = {"file": file, "dtype": dtype, "shape": list(shape), "offsets": [begin, end],
             "hash": tensor_hash}
    if blocks:
        entry["blocks"] = list(blocks)
    return entry


def new_sharded_entry(dtype: str, shape: Sequence[int], shards: Iterable[Shard]
                      ) -> dict[str, Any]:
    """The manifest entry of a tensor saved in pieces by many ranks (format v3; what
    :func:`tensor_entry` reads): its shards, ordered by origin."""
    return {"dtype": dtype, "shape": list(shape), "shards": [
        {"file": shard.file, "offsets": [shard.begin, shard.end], "hash": shard.hash,
         "origin": list(shard.origin), "size": list(shard.size),
         **({"blocks": list(shard.blocks)} if shard.blocks else {})}
        for shard in sorted(shards, key=lambda shard: shard.origin)]}


def is_shape(value: Any) -> TypeGuard[list[int]]:
    """A list of non-negative ints."""
    if not isinstance(value, list):
        return False
    # a loop, not all(generator): twice as fast, and this runs for each tensor entry
    for dim in value:  # noqa: SIM110
        if type(dim) is not int or dim < 0:
            return False
    return True


def _field(manifest: dict[str, Any], key: str, kind: type, path: str) -> Any:
    value = manifest.get(key)
    if type(value) is not kind:
        raise CorruptCheckpointError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    return value


def update_manifest(storage: Storage, name: str,
                    change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Change a committed manifest's top-level fields (metrics, tags) in place with
    ``change``, atomically and serialized with every other update (Storage.update): a
    reader sees the old or the new manifest, and two updates at once both count.
    ``change`` may run more than once, on a newer manifest each time. Returns the
    manifest written.

    Raises:
        NotACheckpointError: the checkpoint was deleted (by retention?) meanwhile.
        CorruptCheckpointError: its manifest is damaged.
        WriteError: the storage failed (a full disk); the old manifest is unchanged.
    """
    where = f"{storage.where(name)}/{MANIFEST}"
    written: list[dict[str, Any]] = []

    def edit(payload: bytes) -> bytes:
        manifest = parse_manifest(payload, where)
        change(manifest)
        written[:] = [manifest]
        return encode_json(manifest)

    try:
        storage.update(name, edit)
    except FileNotFoundError as e:
        raise NotACheckpointError(
            f"{storage.where(name)} was deleted (retention?) before the update") from e
    except OSError as e:
        raise WriteError(f"{where}: could not update the manifest ({e}); it is unchanged. "
                         f"Free some space (or fix the permissions) and try again") from e
    return written[0]

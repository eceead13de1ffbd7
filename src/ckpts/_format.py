"""On-disk format v1: safetensors shards, their hashes, and the manifest.

A checkpoint directory holds standard ``.safetensors`` files (readable with
``safetensors.safe_open`` and no ckpts code) and ``manifest.json``, written last as
the commit marker. Every file's xxh3-128 hash is computed while it is written and
recorded in the manifest; xxh3 runs at memory speed (~15 GB/s here, against ~1.5
GB/s for sha256), so checking integrity costs almost nothing. It detects corruption,
not tampering.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from ckpts.errors import CorruptCheckpointError, FormatVersionError, UnserializableStateError

FORMAT_NAME = "ckpts"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HASH_PREFIX = "xxh3_128:"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPE_NAMES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype name, shape and byte range in the data."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0


@dataclass(frozen=True)
class FileRecord:
    """A written file's size and content hash, as recorded in the manifest."""

    nbytes: int
    hash: str


def tensor_bytes(tensor: torch.Tensor, *, key: str) -> memoryview:
    """The raw little-endian bytes of a tensor, copied to CPU only when needed."""
    if tensor.dtype not in DTYPES:
        raise UnserializableStateError(
            f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store; "
            f"cast it to one of {sorted(str(d) for d in DTYPES)} in its state_dict()."
        )
    if tensor.layout is not torch.strided or tensor.is_quantized:
        raise UnserializableStateError(
            f"tensor {key!r} is {tensor.layout} (quantized={tensor.is_quantized}); only dense "
            "tensors can be saved. Convert it with .to_dense() or .dequantize()."
        )
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> FileRecord:
    """Write a standard safetensors file, hashing the bytes as they go out, then fsync it."""
    items = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _dtype_name(tensor, key),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    digest = xxhash.xxh3_128()
    with open(path, "wb", buffering=0) as f:
        for chunk in _file_chunks(header_bytes, items):
            f.write(chunk)
            digest.update(chunk)
        os.fsync(f.fileno())
    return FileRecord(nbytes=8 + len(header_bytes) + offset, hash=HASH_PREFIX + digest.hexdigest())


def write_json(path: Path, data: Any) -> FileRecord:
    """Write a JSON file (strict: no NaN), fsync it, and return its record."""
    payload = (json.dumps(data, indent=1, allow_nan=False) + "\n").encode()
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(nbytes=len(payload), hash=HASH_PREFIX + xxhash.xxh3_128(payload).hexdigest())


def hash_file(path: Path) -> str:
    """The content hash of a file, read through a memory map."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                digest.update(mapped)
    return HASH_PREFIX + digest.hexdigest()


def read_header(path: Path) -> tuple[dict[str, TensorEntry], int]:
    """Parse and check a safetensors header. Returns the entries and the data start offset.

    Offsets are made absolute (from the start of the file) and checked against the
    real file size, so a truncated or hostile file fails here, not in a later read.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(f"{path}: shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CorruptCheckpointError(
                f"{path}: header claims {header_len} bytes but the file has {size}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: the safetensors header is not valid JSON") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        entries[key] = _header_entry(path, key, info, data_start, size)
    return entries, data_start


def read_manifest(directory: Path) -> dict[str, Any]:
    """Load and check ``manifest.json``; raise CorruptCheckpointError or FormatVersionError."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {e}") from e
    check_manifest(manifest, path)
    return manifest  # type: ignore[no-any-return]


def check_manifest(manifest: Any, path: Path) -> None:
    """Check a manifest's shape: version, step, files and objects, with safe file names."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{path} is not a ckpts manifest (no \"format\": \"ckpts\")")
    version = manifest.get("format_version")
    if type(version) is not int:
        raise CorruptCheckpointError(f"{path}: format_version must be an integer")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} uses format version {version}, but this ckpts reads up to version "
            f"{FORMAT_VERSION}; upgrade ckpts to read it."
        )
    _expect(manifest, "step", int, path)
    files = _expect(manifest, "files", dict, path)
    for name, record in files.items():
        check_file_name(name, path)
        if not isinstance(record, dict) or type(record.get("nbytes")) is not int \
                or not isinstance(record.get("hash"), str):
            raise CorruptCheckpointError(f"{path}: file record for {name!r} is malformed")
    objects = _expect(manifest, "objects", dict, path)
    for name, obj in objects.items():
        if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), dict):
            raise CorruptCheckpointError(f"{path}: object {name!r} is malformed")
        for key, info in obj["tensors"].items():
            if not isinstance(info, dict) or info.get("file") not in files \
                    or info.get("dtype") not in DTYPE_NAMES or not _is_shape(info.get("shape")):
                raise CorruptCheckpointError(
                    f"{path}: tensor {key!r} of object {name!r} has a malformed entry"
                )
        aliases = obj.get("aliases", {})
        if not isinstance(aliases, dict) or any(a not in obj["tensors"] for a in aliases.values()):
            raise CorruptCheckpointError(f"{path}: object {name!r} has malformed aliases")


def check_file_name(name: str, manifest_path: Path) -> None:
    """Refuse a file reference that could escape the checkpoint directory."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CorruptCheckpointError(
            f"{manifest_path}: file name {name!r} is not a plain name inside the checkpoint"
        )


def manifest_tensor_entries(obj: Mapping[str, Any]) -> dict[str, TensorEntry]:
    """The tensor entries of one manifest object (dtype, shape and file of each key)."""
    return {
        key: TensorEntry(file=info["file"], dtype=info["dtype"], shape=tuple(info["shape"]))
        for key, info in obj["tensors"].items()
    }


def _file_chunks(
    header: bytes, items: list[tuple[str, torch.Tensor]]
) -> Iterable[bytes | memoryview]:
    yield struct.pack("<Q", len(header))
    yield header
    for key, tensor in items:
        yield tensor_bytes(tensor, key=key)


def _dtype_name(tensor: torch.Tensor, key: str) -> str:
    if tensor.dtype not in DTYPES:
        tensor_bytes(tensor, key=key)  # raises the explanatory error
    return DTYPES[tensor.dtype]


def _header_entry(path: Path, key: str, info: Any, data_start: int, size: int) -> TensorEntry:
    bad = CorruptCheckpointError(f"{path}: header entry for tensor {key!r} is malformed")
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_NAMES:
        raise bad
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not _is_shape(shape) or not isinstance(offsets, list) \
            or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise bad
    begin, end = data_start + offsets[0], data_start + offsets[1]
    itemsize = torch.empty(0, dtype=DTYPE_NAMES[info["dtype"]]).element_size()
    numel = 1
    for dim in shape:
        numel *= dim
    if end < begin or end - begin != numel * itemsize or end > size:
        raise CorruptCheckpointError(
            f"{path}: tensor {key!r} spans bytes {begin}..{end} of a {size}-byte file, "
            f"which does not fit its shape {shape} and dtype {info['dtype']} (truncated?)"
        )
    return TensorEntry(file=path.name, dtype=info["dtype"], shape=tuple(shape), begin=begin,
                       end=end)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(type(d) is int and d >= 0 for d in value)


def _expect(manifest: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = manifest.get(key)
    if type(value) is not kind:
        raise CorruptCheckpointError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    return value

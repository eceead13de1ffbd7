"""Safetensors shards: write them with the hash computed on the way out, read them back.

Files are standard ``.safetensors`` (``safetensors.safe_open`` reads them with no
ckpts code). Headers are checked against the real file size before any data is
trusted, so a truncated or hostile file fails with CorruptCheckpointError.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckpts._manifest import DTYPE_SIZES, TensorEntry, is_shape
from ckpts.errors import CorruptCheckpointError, UnserializableStateError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

# Every dtype safetensors 0.8 stores. Names torch added late (uint16/32/64 in 2.3, the
# fnuz float8s) are looked up, so an older torch simply stores fewer dtypes.
_DTYPE_NAMES_BY_ATTRIBUTE = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "complex64": "C64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2": "F8_E5M2", "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
DTYPES: dict[torch.dtype, str] = {
    getattr(torch, attribute): name for attribute, name in _DTYPE_NAMES_BY_ATTRIBUTE.items()
    if isinstance(getattr(torch, attribute, None), torch.dtype)
}
DTYPE_NAMES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPES.items()}


def encode_header(items: Sequence[tuple[str, torch.Tensor]]) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``items`` in order,
    padded with spaces so the data starts 8-byte aligned."""
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
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def tensor_bytes(tensor: torch.Tensor, *, key: str) -> memoryview:
    """The raw little-endian bytes of a tensor, copied to CPU only when needed.

    Other kinds never get here: ckpts._codec splits or refuses them when the state
    is captured; this check only guards the file format.
    """
    if tensor.dtype not in DTYPES or tensor.layout is not torch.strided \
            or tensor.is_quantized or tensor.device.type == "meta":
        raise UnserializableStateError(
            f"tensor {key!r} ({tensor.dtype}, {tensor.layout}, on {tensor.device}) is not a "
            f"dense tensor of a dtype safetensors stores ({sorted(DTYPES.values())}); "
            "cast or convert it in its state_dict()."
        )
    # a conjugate or negative view (z.conj(), z.conj().imag) holds its bytes unresolved
    return byte_view(tensor.detach().cpu().resolve_conj().resolve_neg().contiguous())


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


def _dtype_name(tensor: torch.Tensor, key: str) -> str:
    if tensor.dtype not in DTYPES:
        tensor_bytes(tensor, key=key)  # raises the explanatory error
    return DTYPES[tensor.dtype]


def _header_entry(path: Path, key: str, info: Any, data_start: int, size: int) -> TensorEntry:
    bad = CorruptCheckpointError(f"{path}: header entry for tensor {key!r} is malformed")
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_SIZES:
        raise bad
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not is_shape(shape) or not isinstance(offsets, list) \
            or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise bad
    begin, end = data_start + offsets[0], data_start + offsets[1]
    itemsize = DTYPE_SIZES[info["dtype"]]
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


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory (writable: readinto fills it)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() <= 1:  # contiguous, yet its one stride may be anything (x[::4] of 4)
        flat = flat.as_strided((flat.numel(),), (1,))
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def copy_tensors(
    directory: Path,
    entries: Mapping[str, TensorEntry],
    targets: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Read tensors from memory-mapped files, copying each straight into its target.

    A target is used when its dtype and shape match the saved tensor; otherwise (or
    with no target) a new CPU tensor is returned for that key.
    """
    by_file: dict[str, list[str]] = defaultdict(list)
    for key, entry in entries.items():
        by_file[entry.file].append(key)
    # every header is read once and checked before any target is written
    headers = {name: read_header(directory / name)[0] for name in by_file}
    found = {key: stored_entry(directory / name, headers[name], key, entries[key])
             for name, keys in by_file.items() for key in keys}
    loaded: dict[str, torch.Tensor] = {}
    for file_name, keys in by_file.items():
        with open(directory / file_name, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for key in keys:
            source = _mapped_tensor(mapped, found[key])
            target = targets.get(key)
            if target is not None and target.dtype == source.dtype \
                    and target.shape == source.shape:
                with torch.no_grad():
                    target.copy_(source)
                loaded[key] = target
            else:
                loaded[key] = source.clone()
            del source
    return loaded


def stored_entry(path: Path, header: Mapping[str, TensorEntry], key: str,
                  expected: TensorEntry) -> TensorEntry:
    """The header's entry for ``key``, which must agree with the manifest's."""
    found = header.get(key)
    if found is None or (found.dtype, found.shape) != (expected.dtype, expected.shape):
        raise CorruptCheckpointError(
            f"{path}: tensor {key!r} is missing from the file or differs from the manifest's "
            f"dtype and shape ({expected.dtype}{list(expected.shape)})"
        )
    return found


def _mapped_tensor(mapped: mmap.mmap, entry: TensorEntry) -> torch.Tensor:
    dtype = DTYPE_NAMES[entry.dtype]
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=dtype)
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=entry.end - entry.begin,
                           offset=entry.begin)
    if entry.begin % raw.new_empty(0, dtype=dtype).element_size():
        raw = raw.clone()  # a foreign file with unaligned data: realign before the view
    return raw.view(dtype).reshape(entry.shape)

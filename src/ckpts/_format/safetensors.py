"""Safetensors files: dtypes, headers, and the bytes of tensors.

Files are standard ``.safetensors`` (``safetensors.safe_open`` reads them with no
ckpts code). Headers are checked against the real file size before any data is
trusted, so a truncated or hostile file fails with CorruptCheckpointError.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from ckpts._format.manifest import DTYPE_SIZES, TensorEntry, is_shape
from ckpts.errors import CorruptCheckpointError, UnserializableStateError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_INT = frozenset({int})  # the one type of a header's numbers (bool and float are refused)
_Item = TypeVar("_Item")  # what aligned_order orders, beside each tensor

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


def aligned_order(items: Iterable[tuple[_Item, torch.Tensor]]
                  ) -> list[tuple[_Item, torch.Tensor]]:
    """``items`` in the order a file holds them: wider dtypes first, so that with the
    data 8-byte aligned every tensor starts at a multiple of its element size (a view
    of the file's bytes needs no copy). Items of one width keep their order."""
    return sorted(items, key=lambda item: -item[1].element_size())


def encode_header(items: Sequence[tuple[str, torch.Tensor]], *, align: int = 8) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``items`` in order,
    padded with spaces so the data starts at a multiple of ``align`` bytes (a multiple
    of 8)."""
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
    encoded += b" " * (-(len(encoded) + 8) % align)
    return struct.pack("<Q", len(encoded)) + encoded


def tensor_bytes(tensor: torch.Tensor, *, key: str) -> memoryview:
    """The raw little-endian bytes of a tensor, copied to CPU only when needed."""
    return byte_view(dense(tensor, key=key).cpu())


def dense(tensor: torch.Tensor, *, key: str) -> torch.Tensor:
    """The tensor as a contiguous tensor where it lives, whose memory holds the values it
    shows (a conjugate or negative view, ``z.conj().imag``, holds them unresolved).

    Other kinds never get here: ckpts._format.codec splits or refuses them when the state
    is captured; this check only guards the file format.
    """
    if tensor.dtype not in DTYPES or tensor.layout is not torch.strided \
            or tensor.is_quantized or tensor.device.type == "meta":
        raise UnserializableStateError(
            f"tensor {key!r} ({tensor.dtype}, {tensor.layout}, on {tensor.device}) is not a "
            f"dense tensor of a dtype safetensors stores ({sorted(DTYPES.values())}); "
            "cast or convert it in its state_dict()."
        )
    return tensor.detach().resolve_conj().resolve_neg().contiguous()


def header_length(prefix: bytes, size: int, where: str) -> int:
    """The JSON header's length, from a safetensors file's first 8 bytes, checked against
    the file's size."""
    if len(prefix) < 8:
        raise CorruptCheckpointError(f"{where}: shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise CorruptCheckpointError(
            f"{where}: header claims {length} bytes but the file has {size}")
    return int(length)


def parse_header(raw: bytes, size: int, *, file: str, where: str,
                 expected: Mapping[str, TensorEntry] | None = None) -> dict[str, TensorEntry]:
    """Parse and check a safetensors JSON header (the bytes after the length prefix).

    Offsets are made absolute (from the start of the file) and checked against the
    real file size, so a truncated or hostile file fails here, not in a later read.
    ``__metadata__`` must map strings to strings and each entry hold just its dtype,
    shape and offsets, so nothing in a header nests.

    ``expected``: entries known to be well formed and to fit this file (a checked
    manifest's, by key). A header entry that says exactly what its expected entry
    says (the same dtype, shape and byte range, every number a JSON integer, as a
    safetensors reader requires) comes back as that very object, its checks already
    done; any other entry is checked in full. A reader compares by identity first.
    """
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # or past json's depth
        raise CorruptCheckpointError(f"{where}: the safetensors header is not valid JSON") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: the safetensors header is not a JSON object")
    data_start = 8 + len(raw)
    expected = expected or {}
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":  # str -> str, as safetensors reads it: nothing nests
            if type(info) is not dict or not all(type(value) is str for value in info.values()):
                raise CorruptCheckpointError(
                    f"{where}: the safetensors header's __metadata__ is not a map of strings "
                    "to strings; the file is damaged")
            continue
        known = expected.get(key)
        if known is not None and type(info) is dict and len(info) == 3:  # cheap tests first
            offsets, shape = info.get("data_offsets"), info.get("shape")
            if type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int \
                    and type(offsets[1]) is int and offsets[0] >= 0 \
                    and offsets[0] + data_start == known.begin \
                    and offsets[1] + data_start == known.end and known.end <= size \
                    and info.get("dtype") == known.dtype and type(shape) is list \
                    and tuple(shape) == known.shape and _INT.issuperset(map(type, shape)):
                entries[key] = known
                continue
        entries[key] = _header_entry(where, file, key, info, data_start, size)
    return entries


def _dtype_name(tensor: torch.Tensor, key: str) -> str:
    if tensor.dtype not in DTYPES:
        dense(tensor, key=key)  # raises the explanatory error
    return DTYPES[tensor.dtype]


def _header_entry(where: str, file: str, key: str, info: Any, data_start: int, size: int
                  ) -> TensorEntry:
    shape = info.get("shape") if isinstance(info, dict) else None
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not isinstance(info, dict) or len(info) != 3 or not isinstance(info.get("dtype"), str) \
            or info["dtype"] not in DTYPE_SIZES or not is_shape(shape) \
            or not isinstance(offsets, list) or len(offsets) != 2 \
            or not all(type(o) is int and o >= 0 for o in offsets):
        raise CorruptCheckpointError(
            f"{where}: header entry for tensor {key!r} is malformed (it must hold dtype, shape "
            "and data_offsets, and nothing else)")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    itemsize = DTYPE_SIZES[info["dtype"]]
    numel = 1
    for dim in shape:
        numel *= dim
    if end < begin or end - begin != numel * itemsize or end > size:
        raise CorruptCheckpointError(
            f"{where}: tensor {key!r} spans bytes {begin}..{end} of a {size}-byte file, "
            f"which does not fit its shape {shape} and dtype {info['dtype']} (truncated?)"
        )
    return TensorEntry(file=file, dtype=info["dtype"], shape=tuple(shape), begin=begin, end=end)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory (writable: readinto fills it)."""
    return memoryview(flat_bytes(tensor).numpy()).cast("B")  # type: ignore[arg-type]


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes, as a flat uint8 tensor where it lives."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() <= 1:  # contiguous, yet its one stride may be anything (x[::4] of 4)
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)


def stored_entry(where: str, header: Mapping[str, TensorEntry], key: str,
                 expected: TensorEntry) -> TensorEntry:
    """The header's entry for ``key``, which must agree with the manifest's."""
    found = header.get(key)
    if found is None or (found.dtype, found.shape) != (expected.dtype, expected.shape):
        raise CorruptCheckpointError(
            f"{where}: tensor {key!r} is missing from the file or differs from the manifest's "
            f"dtype and shape ({expected.dtype}{list(expected.shape)})"
        )
    return found

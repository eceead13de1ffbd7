"""Safetensors headers read back, without torch: the length prefix, the JSON entries
checked against the file's size, and one header read by range from a storage.

``verify`` needs nothing more than these and the hashes, so it never imports torch;
the readers of tensor data (ckpts._tensors.reading) use the same checks.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from ckpts._format.manifest import DTYPE_SIZES, TensorEntry, is_shape
from ckpts.errors import CorruptCheckpointError
from ckpts.storage._port import Range, Storage

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_INT = frozenset({int})  # the one type of a header's numbers (bool and float are refused)


def read_header(storage: Storage, name: str, file: str, size: int) -> dict[str, TensorEntry]:
    """A safetensors file's header entries (absolute byte ranges), read by range.

    ``size`` is the file's size (its manifest record's), which the header must fit.
    """
    where = f"{storage.where(name)}/{file}"
    prefix = memoryview(bytearray(8))
    storage.read_ranges(name, [Range(file, 0, prefix[: min(8, size)])])
    length = header_length(bytes(prefix[: min(8, size)]), size, where)
    raw = memoryview(bytearray(length))
    storage.read_ranges(name, [Range(file, 8, raw)])
    return parse_header(bytes(raw), size, file=file, where=where)


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



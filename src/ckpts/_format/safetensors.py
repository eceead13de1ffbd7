"""Safetensors files: dtypes, headers written, and the bytes of tensors.

Files are standard ``.safetensors`` (``safetensors.safe_open`` reads them with no
ckpts code). Headers read back are checked against the real file size before any
data is trusted, so a truncated or hostile file fails with CorruptCheckpointError;
those checks need no torch and live in :mod:`ckpts._format.headers`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from ckpts._format.manifest import TensorEntry
from ckpts.errors import CorruptCheckpointError, UnserializableStateError

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


def _dtype_name(tensor: torch.Tensor, key: str) -> str:
    if tensor.dtype not in DTYPES:
        dense(tensor, key=key)  # raises the explanatory error
    return DTYPES[tensor.dtype]


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

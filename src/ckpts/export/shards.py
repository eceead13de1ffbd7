"""Plain safetensors weights for export: one file, or shards plus the Hugging Face index.

Shards are named as ``save_pretrained`` names them (``model-00001-of-00003.safetensors``
and ``model.safetensors.index.json``), filled in ``state_dict`` order up to the
shard size. Each file is written tensor by tensor (so the progress callback moves
and no second copy of the model is built) through the same header encoder the
checkpoints use, into a temporary name renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ckpts._format import encode_header, tensor_bytes

Progress = Callable[[int], None]  # called with the bytes just written


def write_weights(tensors: Mapping[str, torch.Tensor], directory: Path, *, stem: str = "model",
                  max_shard_size: int, progress: Progress | None = None) -> list[Path]:
    """Write ``tensors`` as ``<stem>.safetensors``, or as shards plus
    ``<stem>.safetensors.index.json`` above ``max_shard_size`` bytes. Returns the files."""
    shards = _plan(tensors, max_shard_size)
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(1, len(shards) + 1)]
    written = []
    for name, keys in zip(names, shards, strict=True):
        written.append(_write_file(directory / name, [(k, tensors[k]) for k in keys], progress))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": {k: name for name, keys in zip(names, shards, strict=True)
                           for k in keys},
        }
        index_path = directory / f"{stem}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(index_path)
    return written


def _plan(tensors: Mapping[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        if shards[-1] and size + _nbytes(tensor) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += _nbytes(tensor)
    return shards


def _write_file(path: Path, items: list[tuple[str, torch.Tensor]],
                progress: Progress | None) -> Path:
    # wider dtypes first keeps every tensor aligned to its element size in the file
    items = sorted(items, key=lambda item: -item[1].element_size())
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        f.write(encode_header(items))
        for key, tensor in items:
            f.write(tensor_bytes(tensor, key=key))
            if progress is not None:
                progress(_nbytes(tensor))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    return path


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

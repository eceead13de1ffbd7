"""Plain safetensors weights for export: one file, or shards plus the Hugging Face index.

Shards are planned as a checkpoint's are (files of about equal size, at most the
shard size) and named as ``save_pretrained`` names them
(``model-00001-of-00003.safetensors`` and ``model.safetensors.index.json``). Each
file is written tensor by tensor (so the progress callback moves and no second
copy of the model is built) through the same header encoder the checkpoints use,
into a temporary name renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ckpts._checkpoint.write import plan_shards
from ckpts._format.safetensors import aligned_order, encode_header, tensor_bytes

Progress = Callable[[int], None]  # called with the bytes just written


def write_weights(tensors: Mapping[str, torch.Tensor], directory: Path, *, stem: str = "model",
                  max_shard_size: int, progress: Progress | None = None) -> list[Path]:
    """Write ``tensors`` as ``<stem>.safetensors``, or as shards plus
    ``<stem>.safetensors.index.json`` above ``max_shard_size`` bytes. Returns the files."""
    # file name -> keys (an object without tensors still gets its one, empty, file)
    shards = plan_shards(stem, tensors, max_shard_size) or {f"{stem}.safetensors": []}
    written = []
    for name, keys in shards.items():
        written.append(_write_file(directory / name, [(k, tensors[k]) for k in keys], progress))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": {k: name for name, keys in shards.items() for k in keys},
        }
        index_path = directory / f"{stem}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(index_path)
    return written


def _write_file(path: Path, items: list[tuple[str, torch.Tensor]],
                progress: Progress | None) -> Path:
    items = aligned_order(items)
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

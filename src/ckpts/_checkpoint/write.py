"""Writing one checkpoint: a TrainState snapshot into staged tensor files and a manifest.

Each object's distinct tensors go into ``<name>.safetensors`` (or, above the shard
size, ``<name>-00001-of-0000N.safetensors`` plus ``<name>.safetensors.index.json``,
the Hugging Face layout), so a model's weights load with ``safe_open`` or
``from_pretrained`` as they are. Everything else about the object (its JSON tree,
tied-tensor aliases, each tensor's file, dtype, shape, byte range and hash) is in its
index file ``<name>.index.json`` (format v4), which ``manifest.json`` covers by hash.
"""

from __future__ import annotations

import datetime
import math
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckpts._format.codec import encode
from ckpts._format.index import object_index_name
from ckpts._format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    digest,
    encode_json,
    manifest_allowance,
    new_tensor_entry,
)
from ckpts._format.safetensors import DTYPES, aligned_order
from ckpts._state.train_state import ObjectSnapshot
from ckpts._tensors.writing import BeforeWriting, Reusable, write_tensor_files
from ckpts._version import __version__
from ckpts.storage._port import Staged, Storage


def write_checkpoint(
    storage: Storage,
    staged: Staged,
    *,
    step: int,
    snapshots: Mapping[str, ObjectSnapshot],
    metrics: Mapping[str, float],
    epoch: int | None,
    max_shard_size: int,
    reusable: Reusable | None = None,
    before_writing: BeforeWriting = lambda nbytes, reused: None,
) -> tuple[dict[str, Any], list[str], Reusable]:
    """Write every object's tensor files (all at once, see ckpts._tensors.writing) and index
    files into ``staged``, reusing ``reusable``'s unchanged files (see
    :func:`ckpts._tensors.writing.write_tensor_files`, which also explains ``before_writing``).
    The bytes ``before_writing`` gets include an allowance for the manifest.
    Returns the manifest, for the caller to commit, the files reused, and the files
    the next save may reuse."""
    tensor_count = sum(len(snap.tensors) for snap in snapshots.values())
    placements = {name: plan_shards(name, snap.tensors, max_shard_size, snap.frozen)
                  for name, snap in snapshots.items()}
    jobs = [(f, [(k, snapshots[name].tensors[k]) for k in keys])
            for name, placement in placements.items() for f, keys in placement.items()]
    indexes = {}
    for name, placement in placements.items():
        if len(placement) > 1:
            tensors = snapshots[name].tensors
            indexes[f"{name}.safetensors.index.json"] = encode_json({
                "metadata": {"total_size": sum(t.numel() * t.element_size()
                                               for t in tensors.values())},
                "weight_map": {k: f for f, keys in placement.items() for k in keys},
            })
    written = dict(zip([f for f, _ in jobs],
                       write_tensor_files(storage, staged, jobs, list(indexes.items()),
                                          reusable=reusable, before_writing=lambda nbytes, reused:
                                          before_writing(nbytes + manifest_allowance(
                                              tensor_count), reused)),
                       strict=True))
    files: dict[str, Any] = {
        f: {"nbytes": w.nbytes, "header": w.header, "hash": w.header_hash}
        for f, w in written.items()
    }
    files.update({f: {"nbytes": len(data), "hash": digest(data)} for f, data in indexes.items()})
    objects = {}
    for name, snap in snapshots.items():
        if not snap.tensors:  # JSON alone: in the manifest itself
            objects[name] = describe(snap, {})
            continue
        index = encode_json({"objects": {name: object_contents(snap, {
            k: new_tensor_entry(f, DTYPES[snap.tensors[k].dtype], snap.tensors[k].shape,
                                *written[f].tensors[k])
            for f, keys in placements[name].items() for k in keys})}})
        storage.write(staged, [(object_index_name(name), [memoryview(index)])])
        files[object_index_name(name)] = {"nbytes": len(index), "hash": digest(index)}
        objects[name] = {**object_fields(snap), "index": object_index_name(name)}
    reused = [f for f, w in written.items() if w.reused]
    following = Reusable(staged.name, {
        f: (w.header_hash, {key: entry[2] for key, entry in w.tensors.items()})
        for f, w in written.items()})
    return new_manifest(step=step, epoch=epoch, metrics=metrics, files=files,
                        objects=objects), reused, following


def describe(snap: ObjectSnapshot, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """One object's whole entry, given its tensors' entries: its manifest fields and
    its contents (a manifest holds this for an object without tensors)."""
    return {**object_fields(snap), **object_contents(snap, tensors)}


def object_fields(snap: ObjectSnapshot) -> dict[str, Any]:
    """An object's fields in the manifest: its kind, class and Hugging Face config."""
    fields: dict[str, Any] = {"kind": snap.kind, "class": snap.class_name}
    if snap.hf_config is not None:
        fields["hf_config"] = snap.hf_config
    return fields


def object_contents(snap: ObjectSnapshot, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """An object's contents, as its index holds them: JSON tree, aliases, tensor entries."""
    return {"tree": snap.tree, "aliases": snap.aliases, "tensors": dict(tensors)}


def new_manifest(*, step: int, epoch: int | None, metrics: Mapping[str, float],
                 files: Mapping[str, Any], objects: Mapping[str, Any], world_size: int = 1,
                 per_rank: Sequence[str] = ()) -> dict[str, Any]:
    """A checkpoint's manifest (format v4)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "created": now.isoformat(timespec="milliseconds"),
        "metrics": encode(dict(metrics), {}),
        "tags": [],
        "versions": {
            "ckpts": __version__, "torch": torch.__version__, "python": platform.python_version(),
        },
        "world_size": world_size,
        "files": dict(files),
        "objects": dict(objects),
    }
    if per_rank:
        manifest["per_rank"] = list(per_rank)
    return manifest


def plan_shards(name: str, tensors: Mapping[str, torch.Tensor], max_shard_size: int,
                frozen: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Group keys into files of at most ``max_shard_size`` bytes and of about equal size
    (a bigger tensor gets its own file), so threads write them side by side. Within a
    file, wider dtypes come first so every tensor is aligned.

    Keys in ``frozen`` (parameters that do not require grad) get files of their own,
    first, so that an unchanged frozen base is whole files a later save can reuse.
    This is layout only: whether a file is reused is decided by hashes."""
    groups = [[k for k in tensors if k in frozen], [k for k in tensors if k not in frozen]]
    shards = [shard for keys in groups if keys
              for shard in _split(keys, tensors, max_shard_size)]
    if len(shards) <= 1:
        return {f"{name}.safetensors": shards[0]} if shards else {}
    count = len(shards)
    return {f"{name}-{i:05d}-of-{count:05d}.safetensors": keys
            for i, keys in enumerate(shards, start=1)}


def _split(keys: list[str], tensors: Mapping[str, torch.Tensor], max_shard_size: int
           ) -> list[list[str]]:
    ordered = [k for k, _ in aligned_order((k, tensors[k]) for k in keys)]
    sizes = {k: tensors[k].numel() * tensors[k].element_size() for k in ordered}
    total = sum(sizes.values())
    target = total / max(1, math.ceil(total / max_shard_size))
    shards: list[list[str]] = [[]]
    size = 0
    for key in ordered:
        # a new file once this tensor would end past the cap, or mostly past the target
        if shards[-1] and (size + sizes[key] > max_shard_size
                           or size + sizes[key] / 2 > target):
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += sizes[key]
    return shards

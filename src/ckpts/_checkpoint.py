"""One checkpoint directory: write a TrainState snapshot into it, read it back in place.

Each object's distinct tensors go into ``<name>.safetensors`` (or, above the shard
size, ``<name>-00001-of-0000N.safetensors`` plus ``<name>.safetensors.index.json``,
the Hugging Face layout), so a model's weights load with ``safe_open`` or
``from_pretrained`` as they are. Everything else about the object (its JSON tree,
tied-tensor aliases, each tensor's file, dtype and shape) is in ``manifest.json``.
"""

from __future__ import annotations

import datetime
import math
import platform
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckpts._codec import decode, encode
from ckpts._format import DTYPES
from ckpts._io import ReadRequest, read_files_into, write_files
from ckpts._manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    FileRecord,
    TensorEntry,
    manifest_tensor_entries,
    write_json,
)
from ckpts._state import ObjectSnapshot, Stateful, TrainState
from ckpts._version import __version__
from ckpts.errors import CorruptCheckpointError, IncompatibleStateError, InvalidArgumentError

# What a load_state_dict given a damaged or foreign state may raise (CheckpointErrors pass).
LOAD_ERRORS = (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError)


def write_checkpoint(
    directory: Path,
    *,
    step: int,
    snapshots: Mapping[str, ObjectSnapshot],
    metrics: Mapping[str, float],
    epoch: int | None,
    max_shard_size: int,
) -> dict[str, Any]:
    """Write every object's tensors (all files at once, see ckpts._io), then the manifest
    (last). Returns the manifest."""
    files: dict[str, FileRecord] = {}
    objects: dict[str, Any] = {}
    placements = {name: _plan_shards(name, snap.tensors, max_shard_size)
                  for name, snap in snapshots.items()}
    jobs = [(f, [(k, snapshots[name].tensors[k]) for k in keys])
            for name, placement in placements.items() for f, keys in placement.items()]
    records = write_files([(directory / f, items) for f, items in jobs])
    files.update(zip([f for f, _ in jobs], records, strict=True))
    for name, snap in snapshots.items():
        placement = placements[name]
        if len(placement) > 1:
            index_name = f"{name}.safetensors.index.json"
            weight_map = {k: f for f, keys in placement.items() for k in keys}
            total = sum(t.numel() * t.element_size() for t in snap.tensors.values())
            files[index_name] = write_json(
                directory / index_name,
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        objects[name] = {
            "kind": snap.kind,
            "class": snap.class_name,
            "tree": snap.tree,
            "tensors": {
                k: {"file": f, "dtype": DTYPES[snap.tensors[k].dtype],
                    "shape": list(snap.tensors[k].shape)}
                for f, keys in placement.items() for k in keys
            },
            "aliases": snap.aliases,
        }
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
        "world_size": 1,
        "files": {n: {"nbytes": r.nbytes, "hash": r.hash} for n, r in files.items()},
        "objects": objects,
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


def restore_into(directory: Path, manifest: Mapping[str, Any], state: TrainState) -> None:
    """Check the checkpoint fits ``state``, then load every object in place.

    Every file is read once, straight into the live tensors where dtype and shape
    fit (no second copy of the state in memory), and hashed on the way in.

    Raises:
        IncompatibleStateError: objects, keys, shapes or dtypes do not match;
            checked from the manifest before anything is read or changed.
        CorruptCheckpointError: a file's hash does not match. Its bytes may already
            be in live tensors, but no ``load_state_dict`` has run; restoring
            another checkpoint overwrites them all.
    """
    saved = manifest["objects"]
    missing = sorted(set(state.objects) - set(saved))
    unexpected = sorted(set(saved) - set(state.objects))
    if missing or unexpected:
        raise IncompatibleStateError(
            f"{directory} holds objects {sorted(saved)} but the TrainState has "
            f"{sorted(state.objects)} (missing: {missing}, unexpected: {unexpected}); "
            "restore with a TrainState of the same names",
            missing=missing, unexpected=unexpected,
        )
    for name, obj in state.objects.items():
        check_compatible(directory, name, saved[name], obj, strict=True)
    owners, requests = [], []
    for name, obj in state.objects.items():
        live: dict[str, torch.Tensor] = {}
        encode(obj.state_dict(), live)
        by_file: dict[str, dict[str, TensorEntry]] = defaultdict(dict)
        for key, entry in manifest_tensor_entries(saved[name]).items():
            by_file[entry.file][key] = entry
        for file_name, entries in by_file.items():
            owners.append(name)
            requests.append(ReadRequest(directory / file_name,
                                        manifest["files"][file_name]["hash"], entries, live))
    loaded: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensors in zip(owners, read_files_into(requests), strict=True):
        loaded[name].update(tensors)
    for name, obj in state.objects.items():
        _load_object(directory, name, saved[name], obj, loaded[name])


def check_compatible(
    directory: Path, name: str, saved: Mapping[str, Any], obj: Stateful, *, strict: bool
) -> None:
    """Compare a saved object with a live one before anything is overwritten.

    Modules are compared key by key (missing, unexpected, dtype and shape);
    optimizers by the number and size of their parameter groups.
    """
    if isinstance(obj, torch.nn.Module):
        _check_module(directory, name, saved, obj, strict=strict)
    elif isinstance(obj, torch.optim.Optimizer):
        try:
            groups = decode(saved["tree"], lambda key: None)["param_groups"]
            saved_sizes = [len(g["params"]) for g in groups]
        except (KeyError, TypeError, IndexError) as e:
            raise CorruptCheckpointError(
                f"{directory}: optimizer {name!r} has no usable param_groups in its manifest "
                f"entry ({e!r})"
            ) from e
        live_sizes = [len(g["params"]) for g in obj.param_groups]
        if saved_sizes != live_sizes:
            raise IncompatibleStateError(
                f"{directory}: optimizer {name!r} was saved with parameter groups of sizes "
                f"{saved_sizes}, the live optimizer has {live_sizes}; build it over the "
                "same parameters in the same order"
            )


def _load_object(directory: Path, name: str, saved: Mapping[str, Any], obj: Stateful,
                 loaded: dict[str, torch.Tensor]) -> None:
    """Hand an object its state: the tree, with the tensors already read."""
    for alias, key in saved.get("aliases", {}).items():
        loaded[alias] = loaded[key]

    def tensor(key: str) -> torch.Tensor:
        if key not in loaded:
            raise CorruptCheckpointError(
                f"{directory}: object {name!r} refers to tensor {key!r}, which it does not list")
        return loaded[key]

    state_dict = decode(saved["tree"], tensor)
    try:
        obj.load_state_dict(state_dict)
    except LOAD_ERRORS as e:
        raise IncompatibleStateError(
            f"{directory}: {type(obj).__qualname__}.load_state_dict rejected object "
            f"{name!r}: {e}. Objects restored before it were already loaded; restore "
            "again once the live object matches the one that was saved"
        ) from e


def _check_module(
    directory: Path, name: str, saved: Mapping[str, Any], module: torch.nn.Module, *, strict: bool
) -> None:
    live: dict[str, torch.Tensor] = {}
    encode(module.state_dict(), live)
    entries = manifest_tensor_entries(saved)
    for alias, key in saved.get("aliases", {}).items():
        entries[alias] = entries[key]
    missing = sorted(set(live) - set(entries)) if strict else []
    unexpected = sorted(set(entries) - set(live)) if strict else []
    mismatched = [
        (key, f"{entries[key].dtype}{list(entries[key].shape)}",
         f"{DTYPES.get(t.dtype, str(t.dtype))}{list(t.shape)}")
        for key, t in live.items()
        if key in entries and (tuple(t.shape) != entries[key].shape
                               or DTYPES.get(t.dtype) != entries[key].dtype)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{directory}: module {name!r} does not match the checkpoint"]
        lines += [f"  missing in checkpoint: {k}" for k in missing[:20]]
        lines += [f"  unexpected in checkpoint: {k}" for k in unexpected[:20]]
        lines += [f"  {k}: checkpoint {a}, model {b}" for k, a, b in mismatched[:20]]
        lines.append("Build the model with the same configuration as the saved one"
                     + (", or pass strict=False to skip missing/unexpected keys." if strict
                        else "."))
        raise IncompatibleStateError(
            "\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched
        )


def _plan_shards(name: str, tensors: Mapping[str, torch.Tensor], max_shard_size: int
                 ) -> dict[str, list[str]]:
    """Group keys into files of at most ``max_shard_size`` bytes and of about equal size
    (a bigger tensor gets its own file), so threads write them side by side. Within a
    file, wider dtypes come first so every tensor is aligned."""
    if not tensors:
        return {}
    ordered = sorted(tensors, key=lambda k: -tensors[k].element_size())
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
    if len(shards) == 1:
        return {f"{name}.safetensors": shards[0]}
    count = len(shards)
    return {f"{name}-{i:05d}-of-{count:05d}.safetensors": keys
            for i, keys in enumerate(shards, start=1)}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"`` or ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        text = size.strip().upper()
        number = text.rstrip("KMGTIB")
        unit = text[len(number):].strip()
        try:
            value = int(float(number) * units[unit]) if math.isfinite(float(number)) else -1
        except (ValueError, KeyError):
            value = -1
    else:
        value = -1
    if value <= 0:
        raise InvalidArgumentError(
            f"size {size!r} is not a positive byte count; use an int or e.g. '500MB', '2GiB'"
        )
    return value

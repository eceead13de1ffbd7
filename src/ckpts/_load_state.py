"""load_state: one saved object's state as plain data, with no live object to load into.

Sampling scripts want a model's ``model_args``, an evaluation job the epoch counter a
callback kept, Lightning's CheckpointIO the whole state dict it hands to the Trainer:
none of them has (or wants to build) the object the state came from. This reads one
object's JSON tree from the manifest, decodes it with the codec, and fills in its
tensors through the same read path as :func:`ckpts.load_weights` (every file
hash-checked, then memory-mapped and copied to CPU).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ckpts._codec import decode
from ckpts._format import DTYPE_NAMES, copy_tensors
from ckpts._manifest import MANIFEST, TensorEntry, manifest_tensor_entries, read_manifest
from ckpts._verify import check_file
from ckpts.errors import CorruptCheckpointError, NotACheckpointError

if TYPE_CHECKING:
    from ckpts._catalog import Checkpoint


def load_state(
    checkpoint: Checkpoint | str | os.PathLike[str],
    name: str,
    *,
    tensors: bool = True,
) -> Any:
    """Read one saved object's ``state_dict`` as plain data, building nothing.

    Tuples, int dict keys, ``None`` and nan/inf come back as they were saved.

    Args:
        checkpoint: a :class:`Checkpoint` (e.g. ``manager.latest()``) or the path
            of a checkpoint directory.
        name: the object's name in the :class:`TrainState` it was saved from
            (``"model"``, ``"optimizer"``, ``"rng"``...).
        tensors: if True, tensors are read (hash-checked) as CPU tensors. If False,
            no tensor file is opened and each tensor is a ``meta`` tensor of the
            saved dtype and shape (``t.device.type == "meta"``), a placeholder
            that holds no data.

    Returns:
        The object's state, as its ``state_dict()`` returned it when saved.

    Raises:
        NotACheckpointError: the path holds no committed checkpoint, or it has no
            object called ``name`` (the message lists the objects it has).
        CorruptCheckpointError: a tensor file of the object fails its size or
            hash check.

    Example:
        >>> config = ckpts.load_state("runs/exp1/step-00000500", "config")  # doctest: +SKIP
        >>> model = GPT(**config["model_args"])                              # doctest: +SKIP
    """
    directory = Path(getattr(checkpoint, "path", checkpoint))  # type: ignore[arg-type]
    if not (directory / MANIFEST).is_file():
        raise NotACheckpointError(
            f"{directory} is not a checkpoint (no {MANIFEST}); pass a step-* directory "
            "of a run, e.g. manager.latest().path"
        )
    manifest = read_manifest(directory)
    objects = manifest["objects"]
    if name not in objects:
        raise NotACheckpointError(
            f"{directory} has no object named {name!r}; it holds {sorted(objects)}. "
            "Pass one of those names"
        )
    saved = objects[name]
    entries = manifest_tensor_entries(saved)
    values = _read_tensors(directory, manifest, entries) if tensors else _placeholders(entries)
    for alias, key in saved.get("aliases", {}).items():
        values[alias] = values[key]

    def tensor(key: str) -> torch.Tensor:
        if key not in values:
            raise CorruptCheckpointError(
                f"{directory}: object {name!r} refers to tensor {key!r}, which it does not list")
        return values[key]

    return decode(saved["tree"], tensor)


def _read_tensors(directory: Path, manifest: dict[str, Any],
                  entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    for file_name in sorted({e.file for e in entries.values()}):
        record = manifest["files"][file_name]
        problem = check_file(directory / file_name, record["nbytes"], record["hash"])
        if problem:
            raise CorruptCheckpointError(f"cannot load the state: {problem}")
    return copy_tensors(directory, entries, {})


def _placeholders(entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(entry.shape, dtype=DTYPE_NAMES[entry.dtype], device="meta")
            for key, entry in entries.items()}

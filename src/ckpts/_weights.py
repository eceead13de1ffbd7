"""Reading one saved object without a TrainState: a module's weights, or any object's state.

``load_weights`` fills a live module for inference and reads no optimizer bytes;
``load_state`` hands back one object's ``state_dict`` as plain data. Both check
the files they read against the manifest's sizes and hashes first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ckpts._checkpoint import check_compatible, decode_object, load_module_weights
from ckpts._format import DTYPE_NAMES, copy_tensors
from ckpts._manifest import MANIFEST, TensorEntry, manifest_tensor_entries, read_manifest
from ckpts._verify import check_file
from ckpts.errors import CorruptCheckpointError, NotACheckpointError

if TYPE_CHECKING:
    from ckpts._catalog import Checkpoint


def load_weights(
    checkpoint: Checkpoint | str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    strict: bool = True,
    name: str | None = None,
) -> None:
    """Load a module's weights from a checkpoint, reading none of the optimizer state.

    The module's files are hash-checked, then memory-mapped and copied straight into
    the parameters and buffers. Tied weights stay tied.

    Args:
        checkpoint: a :class:`Checkpoint` (e.g. ``manager.latest()``) or the path of
            a checkpoint directory.
        model: the module to load into; it must have the saved architecture.
        strict: if False, keys missing on either side are skipped (shapes must
            still match).
        name: which saved object to read. Default: the one named ``model``, or the
            only module in the checkpoint.

    Raises:
        NotACheckpointError: the path holds no committed checkpoint.
        CorruptCheckpointError: the module's files fail their size or hash check.
        IncompatibleStateError: keys, shapes or dtypes do not match ``model``.

    Example:
        >>> model = build_model()                                   # doctest: +SKIP
        >>> ckpts.load_weights("runs/exp1/step-00000500", model)    # doctest: +SKIP
    """
    directory, manifest = _open(checkpoint)
    obj_name, saved = _pick_module(directory, manifest, name)
    entries = manifest_tensor_entries(saved)
    check_compatible(directory, obj_name, saved, model, strict=strict)  # from the manifest alone
    _check_files(directory, manifest, entries)
    load_module_weights(directory, obj_name, saved, model)


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
    directory, manifest = _open(checkpoint)
    objects = manifest["objects"]
    if name not in objects:
        raise NotACheckpointError(
            f"{directory} has no object named {name!r}; it holds {sorted(objects)}. "
            "Pass one of those names"
        )
    saved = objects[name]
    entries = manifest_tensor_entries(saved)
    if tensors:
        _check_files(directory, manifest, entries)
        values = copy_tensors(directory, entries, {})
    else:  # placeholders: no tensor file is opened
        values = {key: torch.empty(entry.shape, dtype=DTYPE_NAMES[entry.dtype], device="meta")
                  for key, entry in entries.items()}
    return decode_object(directory, name, saved, values)


def read_module_tensors(
    checkpoint: Checkpoint | str | os.PathLike[str], *, name: str | None = None
) -> dict[str, torch.Tensor]:
    """Read one saved module's tensors into a dict, with no live module and no optimizer bytes.

    The module's files are hash-checked first. Tied weights (saved once, with an
    alias) come back as the very same tensor under both keys, as ``state_dict()``
    gives them; :func:`module_record` tells which keys are aliases.

    Args:
        checkpoint: a :class:`Checkpoint` or the path of a checkpoint directory.
        name: which saved object to read (default as in :func:`load_weights`).

    Returns:
        ``state_dict`` key -> CPU tensor, in the saved dtype.

    Raises:
        NotACheckpointError: the path holds no committed checkpoint, or no such module.
        CorruptCheckpointError: the module's files fail their size or hash check.
    """
    directory, manifest = _open(checkpoint)
    _, saved = _pick_module(directory, manifest, name)
    entries = manifest_tensor_entries(saved)
    _check_files(directory, manifest, entries)
    tensors = copy_tensors(directory, entries, {})
    for alias, key in saved.get("aliases", {}).items():
        tensors[alias] = tensors[key]
    return tensors


def module_record(
    checkpoint: Checkpoint | str | os.PathLike[str], *, name: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The name and manifest entry of a saved module (class, aliases, ``hf_config``...)."""
    directory, manifest = _open(checkpoint)
    return _pick_module(directory, manifest, name)


def _open(checkpoint: Checkpoint | str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    directory = Path(getattr(checkpoint, "path", checkpoint))  # type: ignore[arg-type]
    if not (directory / MANIFEST).is_file():
        raise NotACheckpointError(
            f"{directory} is not a checkpoint (no {MANIFEST}); pass a step-* directory "
            "of a run, e.g. manager.latest().path"
        )
    return directory, read_manifest(directory)


def _check_files(directory: Path, manifest: dict[str, Any],
                 entries: dict[str, TensorEntry]) -> None:
    for file_name in sorted({e.file for e in entries.values()}):
        record = manifest["files"][file_name]
        problem = check_file(directory / file_name, record["nbytes"], record["hash"])
        if problem:
            raise CorruptCheckpointError(f"cannot read {directory}: {problem}")


def _pick_module(directory: Path, manifest: dict[str, Any], name: str | None
                 ) -> tuple[str, dict[str, Any]]:
    objects = manifest["objects"]
    modules = [n for n, o in objects.items() if o.get("kind") == "module"]
    if name is None:
        name = "model" if "model" in objects else (modules[0] if len(modules) == 1 else None)
    if name is None or name not in objects:
        raise NotACheckpointError(
            f"{directory} has no module named {name or 'model'!r}; its modules are "
            f"{modules}. Pass name=... to choose one"
        )
    return name, objects[name]

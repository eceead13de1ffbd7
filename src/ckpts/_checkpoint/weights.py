"""Reading one saved object without a TrainState: a module's weights, or any object's state.

``load_weights`` fills a live module for inference and reads no optimizer bytes;
``load_state`` hands back one object's ``state_dict`` as plain data. Both read
through the one read path of ckpts._tensors.reading, which checks every tensor's hash
before handing it back. A checkpoint is given as a record, a path or a URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpts._checkpoint.verify import check_file_sizes
from ckpts._format.catalog import Checkpoint, open_checkpoint
from ckpts._format.index import Contents, read_manifest
from ckpts._format.manifest import manifest_tensor_entries
from ckpts._tensors.gc import paused_gc
from ckpts.errors import NotACheckpointError
from ckpts.storage._port import Storage

if TYPE_CHECKING:
    import torch

# torch (and the modules that need it) is imported where tensors are made: module_record
# reads the manifest alone, so `ckpts export` checks its arguments before importing torch


@paused_gc()
def load_weights(
    checkpoint: Checkpoint | str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    strict: bool = True,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Load a module's weights from a checkpoint, reading none of the optimizer state.

    Only the module's tensors are read (by byte range), each checked against its
    hash, then copied into the parameters and buffers: a failed check changes
    nothing in the model. Tied weights stay tied.

    Args:
        checkpoint: a :class:`Checkpoint` (e.g. ``manager.latest()``), or the path
            or URL of a checkpoint (``runs/exp1/step-00000500``,
            ``s3://bucket/run/step-00000500``).
        model: the module to load into; it must have the saved architecture.
        strict: if False, keys missing on either side are skipped (shapes must
            still match).
        name: which saved object to read. Default: the one named ``model``, or the
            only module in the checkpoint.
        storage_options: for a URL, the options of its fsspec filesystem (credentials,
            endpoint), as ``CheckpointManager`` takes them; default: the AWS variables.

    Raises:
        NotACheckpointError: the path holds no committed checkpoint.
        CorruptCheckpointError: the module's files fail their size or hash check.
        IncompatibleStateError: keys, shapes or dtypes do not match ``model``.

    Example:
        >>> model = build_model()                                   # doctest: +SKIP
        >>> ckpts.load_weights("runs/exp1/step-00000500", model)    # doctest: +SKIP
    """
    from ckpts._checkpoint.restore import fit_module, load_module_weights

    storage, checkpoint_name, manifest = _resolve(checkpoint, storage_options)
    where = storage.where(checkpoint_name)
    obj_name, manifest = _pick_module(storage, checkpoint_name, manifest, name)
    saved = manifest["objects"][obj_name]
    fit = fit_module(where, obj_name, saved, model, strict=strict)  # from the manifest alone
    _check_sizes(storage, checkpoint_name, manifest, obj_name)
    load_module_weights(storage, checkpoint_name, manifest, obj_name, model, fit)


@paused_gc()
def load_state(
    checkpoint: Checkpoint | str | os.PathLike[str],
    name: str,
    *,
    tensors: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Read one saved object's ``state_dict`` as plain data, building nothing.

    Tuples, int dict keys, ``None`` and nan/inf come back as they were saved.

    Args:
        checkpoint: a :class:`Checkpoint` (e.g. ``manager.latest()``), or the path
            or URL of a checkpoint.
        name: the object's name in the :class:`TrainState` it was saved from
            (``"model"``, ``"optimizer"``, ``"rng"``...).
        tensors: if True, tensors are read (hash-checked) as CPU tensors. If False,
            no tensor file is opened and each tensor is a ``meta`` tensor of the
            saved dtype and shape (``t.device.type == "meta"``), a placeholder
            that holds no data.
        storage_options: for a URL, the options of its fsspec filesystem (see
            :func:`load_weights`).

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
    import torch

    from ckpts._checkpoint.restore import decode_object
    from ckpts._format.safetensors import DTYPE_NAMES

    storage, checkpoint_name, manifest = _resolve(checkpoint, storage_options)
    where = storage.where(checkpoint_name)
    objects = manifest["objects"]
    if name not in objects:
        raise NotACheckpointError(
            f"{where} has no object named {name!r}; it holds {sorted(objects)}. "
            "Pass one of those names"
        )
    manifest = Contents(storage, checkpoint_name, manifest).expanded([name])
    saved = manifest["objects"][name]
    if tensors:
        values = _read_object(storage, checkpoint_name, manifest, name)
    else:  # placeholders: no tensor file is opened
        values = {key: torch.empty(entry.shape, dtype=DTYPE_NAMES[entry.dtype], device="meta")
                  for key, entry in manifest_tensor_entries(saved).items()}
    return decode_object(where, name, saved, values)


@paused_gc()
def read_module_tensors(
    checkpoint: Checkpoint | str | os.PathLike[str], *, name: str | None = None
) -> dict[str, torch.Tensor]:
    """Read one saved module's tensors into a dict, with no live module and no optimizer bytes.

    Every tensor is checked against its hash. Tied weights (saved once, with an
    alias) come back as the very same tensor under both keys, as ``state_dict()``
    gives them; :func:`module_record` tells which keys are aliases.

    Args:
        checkpoint: a :class:`Checkpoint`, or the path or URL of a checkpoint.
        name: which saved object to read (default as in :func:`load_weights`).

    Returns:
        ``state_dict`` key -> CPU tensor, in the saved dtype.

    Raises:
        NotACheckpointError: the path holds no committed checkpoint, or no such module.
        CorruptCheckpointError: the module's files fail their size or hash check.
    """
    storage, checkpoint_name, manifest = _resolve(checkpoint)
    obj_name, manifest = _pick_module(storage, checkpoint_name, manifest, name)
    saved = manifest["objects"][obj_name]
    tensors = _read_object(storage, checkpoint_name, manifest, obj_name)
    for alias, key in saved.get("aliases", {}).items():
        tensors[alias] = tensors[key]
    return tensors


def module_record(
    checkpoint: Checkpoint | str | os.PathLike[str], *, name: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The name and manifest entry of a saved module (class, aliases, ``hf_config``...)."""
    storage, checkpoint_name, manifest = _resolve(checkpoint)
    obj_name, manifest = _pick_module(storage, checkpoint_name, manifest, name)
    return obj_name, manifest["objects"][obj_name]


def _resolve(checkpoint: Checkpoint | str | os.PathLike[str],
          storage_options: Mapping[str, Any] | None = None
          ) -> tuple[Storage, str, dict[str, Any]]:
    """The storage, name and manifest of a checkpoint, checked but for its objects'
    tensor entries: each reader here reads one object, and reads and checks that
    object's entries (:meth:`Contents.expanded`; v4: its index file) before using them.
    The other objects' entries (an optimizer's, three times a model's) are never used,
    so they are not read; ``verify`` and ``restore`` check every entry they read."""
    storage, name = open_checkpoint(checkpoint, storage_options)
    return storage, name, read_manifest(storage, name, tensor_entries=False)


def _check_sizes(storage: Storage, checkpoint: str, manifest: dict[str, Any], name: str
                 ) -> None:
    """Before reading: the files of object ``name`` exist with their recorded sizes."""
    # from the checked manifest's own records: making a TensorEntry of each tensor just
    # to name its file cost 10 ms on 10,000 tensors
    files = {piece["file"] for info in manifest["objects"][name]["tensors"].values()
             for piece in info.get("shards", [info])}
    check_file_sizes(storage.where(checkpoint),
                     {"files": {f: manifest["files"][f] for f in sorted(files)}},
                     storage.sizes(checkpoint))


def _read_object(storage: Storage, checkpoint: str, manifest: dict[str, Any], name: str
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of one saved object, read and checked, as new CPU tensors."""
    from ckpts._tensors.reading import read_tensors

    _check_sizes(storage, checkpoint, manifest, name)
    entries = manifest_tensor_entries(manifest["objects"][name])
    read = read_tensors(storage, checkpoint, manifest["files"],
                        {(name, key): entry for key, entry in entries.items()}, {},
                        fill_targets=False)
    return {key: tensor for (_, key), tensor in read.items()}


def _pick_module(storage: Storage, checkpoint: str, manifest: dict[str, Any],
                 name: str | None) -> tuple[str, dict[str, Any]]:
    """The saved module's name, and the manifest with that object's entries read."""
    directory = storage.where(checkpoint)
    objects = manifest["objects"]
    modules = [n for n, o in objects.items() if o.get("kind") == "module"]
    if name is None:
        name = "model" if "model" in objects else (modules[0] if len(modules) == 1 else None)
    if name is None or name not in objects:
        raise NotACheckpointError(
            f"{directory} has no module named {name or 'model'!r}; its modules are "
            f"{modules}. Pass name=... to choose one"
        )
    return name, Contents(storage, checkpoint, manifest).expanded([name])

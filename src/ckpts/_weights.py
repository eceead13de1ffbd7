"""Weights-only loading for inference: one module's tensors, no optimizer bytes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ckpts._checkpoint import check_compatible
from ckpts._format import copy_tensors
from ckpts._manifest import MANIFEST, manifest_tensor_entries, read_manifest
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
    directory = Path(getattr(checkpoint, "path", checkpoint))  # type: ignore[arg-type]
    if not (directory / MANIFEST).is_file():
        raise NotACheckpointError(
            f"{directory} is not a checkpoint (no {MANIFEST}); pass a step-* directory "
            "of a run, e.g. manager.latest().path"
        )
    manifest = read_manifest(directory)
    obj_name, saved = _pick_module(directory, manifest, name)
    entries = manifest_tensor_entries(saved)
    check_compatible(directory, obj_name, saved, model, strict=strict)  # from the manifest alone
    for file_name in sorted({e.file for e in entries.values()}):
        record = manifest["files"][file_name]
        problem = check_file(directory / file_name, record["nbytes"], record["hash"])
        if problem:
            raise CorruptCheckpointError(f"cannot load weights: {problem}")
    live = model.state_dict()
    for alias, key in saved.get("aliases", {}).items():
        if alias in live and key not in live:
            live[key] = live[alias]
    copy_tensors(directory, {k: e for k, e in entries.items() if k in live}, live)


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

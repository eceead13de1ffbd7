"""Restoring one checkpoint in place: check that it fits the live objects, read every
tensor into them (hashed on the way in), then hand each object its state."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpts._checkpoint.filling import module_filled_in_place, optimizer_filled_in_place
from ckpts._checkpoint.job import Job
from ckpts._format.codec import decode, live_tensors
from ckpts._format.index import Contents
from ckpts._format.manifest import (
    TensorEntry,
    manifest_tensor_entries,
)
from ckpts._format.safetensors import DTYPES
from ckpts._state.data import ResumableLoader, reshards
from ckpts._state.train_state import (
    PER_RANK_KINDS,
    Stateful,
    TrainState,
    object_kind,
)
from ckpts._tensors.reading import read_tensors
from ckpts.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleStateError,
)
from ckpts.storage._port import Storage

log = logging.getLogger("ckpts")

MAX_LISTED = 20  # keys listed per kind of mismatch in an IncompatibleStateError


@dataclass(frozen=True)
class ModuleFit:
    """A live module found to fit a saved one (:func:`fit_module`): its tensors as
    the ``state_dict()`` that was checked gave them, and the saved tensor entries
    (aliases not included), so that reading into it calls neither again."""

    fillable: dict[str, torch.Tensor]  # see ckpts._format.codec.live_tensors
    other: dict[str, str]
    entries: dict[str, TensorEntry]


def restore_into(storage: Storage, name: str, manifest: dict[str, Any],
                 state: TrainState, job: Job) -> Contents:
    """Check the checkpoint fits ``state``, then load every object in place.

    Every object's ``state_dict()`` is called first: it tells whether the live
    object fits the checkpoint (a module's keys, dtypes and shapes; an optimizer's
    parameter groups) and which live tensors can take the saved bytes. Every file
    is then read once, hashed on the way in, straight into those live tensors (no
    second copy of the state in memory); finally each object gets the saved state:
    a module or torch optimizer whose every tensor was filled in place needs nothing
    more (ckpts._checkpoint.filling: torch's ``load_state_dict`` would copy each
    tensor onto itself, and scan keys in time that grows with modules x keys), any
    other object gets ``load_state_dict()``.

    Which live tensor is *filled* and which is *replaced*: a live tensor is filled
    in place when it is a dense tensor of the saved dtype and shape whose elements
    each have their own memory, and shares no memory with another live tensor
    being filled (tied weights count once). Anything else (an expanded or
    overlapping view, another dtype or shape, a composite kind such as a sparse or
    quantized tensor) is left as it is, and ``load_state_dict()`` receives a new
    tensor: a module copies it in (refused up front for an expanded or meta
    parameter, with IncompatibleStateError naming the key), another object
    decides for itself.

    Every process of ``job`` calls this; on many ranks each reads just the byte
    ranges its own tensors need (see ckpts._checkpoint.sharded), and per-rank objects
    come from this rank's copy (see :func:`match_objects`).

    Raises:
        IncompatibleStateError: objects, keys, shapes or dtypes do not match, or
            an object's ``state_dict()`` or ``load_state_dict()`` raised; the
            mismatch is checked from the manifest before anything is read or
            changed.
        CorruptCheckpointError: a file's hash does not match. Its bytes may already
            be in live tensors, but no ``load_state_dict`` has run; restoring
            another checkpoint overwrites them all.

    Returns:
        The checkpoint's contents as read (for the next save to reuse its files).
    """
    directory = storage.where(name)
    contents = Contents(storage, name, manifest)
    chosen = match_objects(directory, manifest, state, rank=job.rank, size=job.size,
                           saved_state=lambda saved_name: decode(
                               job.saved_object(contents, saved_name)["tree"],
                               lambda key: None))
    saved = {live_name: job.saved_object(contents, saved_name)
             for live_name, saved_name in chosen.items()}
    objects = {live_name: state.objects[live_name] for live_name in chosen}
    for obj_name, obj in objects.items():
        check_compatible(directory, obj_name, saved[obj_name], obj, strict=True,
                         for_restore=True)
        if saved[obj_name]["tensors"]:
            job.prepare(obj)
    # one read of every object's tensors at once (keys are unique per object only)
    live = {(obj_name, key): tensor for obj_name, obj in objects.items()
            for key, tensor in live_tensors(live_state(directory, obj_name, obj))[0].items()}
    read = job.read(storage, contents, {
        (obj_name, key): info for obj_name in objects
        for key, info in saved[obj_name]["tensors"].items()}, live)
    loaded: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for (obj_name, key), tensor in read.items():
        loaded[obj_name][key] = tensor
    for obj_name, obj in objects.items():
        load_object(directory, obj_name, saved[obj_name], obj, loaded[obj_name])
    return contents


def match_objects(directory: str, manifest: Mapping[str, Any], state: TrainState, *,
                  rank: int, size: int,
                  saved_state: Callable[[str], Any] | None = None) -> dict[str, str]:
    """Which saved object each live object restores from: the same name, or for a
    per-rank object (RNG, loader positions) saved by many ranks, this rank's copy.

    Per-rank objects restore only at the world size they were saved at; at another,
    they are left as they are, with a warning (another rank's random streams or data
    positions would be wrong for this rank). The exception is a ResumableLoader over a
    DistributedSampler whose saved state holds the job's position in the epoch (see
    ckpts._state.data.reshards): every rank restores rank 0's copy, and the loader shares
    the rest of the epoch out over the new ranks. ``saved_state(name)`` gives a saved
    object's state without its tensors, to tell; it is asked for rank 0's copy only (on
    format v4, rank 0's index alone is read). Without it, loaders are kept too.
    """
    saved = manifest["objects"]
    per_rank = set(manifest.get("per_rank", ()))
    saved_size = manifest.get("world_size", 1)
    chosen: dict[str, str] = {}
    kept: list[str] = []
    resharded: list[str] = []
    for live_name, obj in state.objects.items():
        first_copy = f"{live_name}.rank0" if live_name in per_rank else live_name
        if object_kind(obj) not in PER_RANK_KINDS and live_name not in per_rank:
            chosen[live_name] = live_name
        elif saved_size == size:
            chosen[live_name] = f"{live_name}.rank{rank}" if live_name in per_rank else live_name
        elif isinstance(obj, ResumableLoader) and saved_state is not None \
                and first_copy in saved and reshards(obj, saved_state(first_copy)):
            chosen[live_name] = first_copy
            resharded.append(live_name)
        else:
            kept.append(live_name)
    expected = set(chosen.values()) | {f"{n}.rank{r}" for n in per_rank for r in range(saved_size)}
    expected |= {n for n in kept if n not in per_rank}
    missing = sorted(n for n in chosen.values() if n not in saved)
    unexpected = sorted(set(saved) - expected)
    if missing or unexpected:
        raise IncompatibleStateError(
            f"{directory} holds objects {sorted(saved)} but the TrainState has "
            f"{sorted(state.objects)} (missing: {missing}, unexpected: {unexpected}); "
            "restore with a TrainState of the same names",
            missing=missing, unexpected=unexpected,
        )
    if kept and rank == 0:
        log.warning("%s was saved by %d rank(s) and is restored by %d: %s keep their current "
                    "state (per-rank state restores only at the same world size)",
                    directory, saved_size, size, ", ".join(sorted(kept)))
    if resharded and rank == 0:
        log.info("%s was saved by %d rank(s) and is restored by %d: %s go on with the rest of "
                 "the epoch, shared by the %d ranks", directory, saved_size, size,
                 ", ".join(sorted(resharded)), size)
    return chosen


def check_compatible(
    directory: str, name: str, saved: Mapping[str, Any], obj: Stateful, *, strict: bool,
    for_restore: bool = False,
) -> None:
    """Compare a saved object with a live one before anything is overwritten.

    Modules are compared key by key (missing, unexpected, dtype and shape, and
    live tensors that cannot take data: meta, expanded); optimizers by the number
    and size of their parameter groups. ``for_restore`` words the advice for
    ``restore()`` (which has no ``strict``) rather than ``load_weights()``.
    """
    if isinstance(obj, torch.nn.Module):
        fit_module(directory, name, saved, obj, strict=strict, for_restore=for_restore)
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


def decode_object(directory: str, name: str, saved: Mapping[str, Any],
                  tensors: dict[str, torch.Tensor]) -> Any:
    """One saved object's state: its JSON tree with the tensors (already read) put back,
    tied aliases included."""
    for alias, key in saved.get("aliases", {}).items():
        tensors[alias] = tensors[key]

    def tensor(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CorruptCheckpointError(
                f"{directory}: object {name!r} refers to tensor {key!r}, which it does not list")
        return tensors[key]

    return decode(saved["tree"], tensor)


def load_object(directory: str, name: str, saved: Mapping[str, Any], obj: Stateful,
                 loaded: dict[str, torch.Tensor]) -> None:
    """Hand an object its state: the tree, with the tensors already read."""
    state_dict = decode_object(directory, name, saved, loaded)
    try:
        if not (optimizer_filled_in_place(obj, state_dict)
                or module_filled_in_place(obj, state_dict)):
            obj.load_state_dict(state_dict)
    except CheckpointError:
        raise
    except Exception as e:  # a user's load_state_dict may raise anything
        raise IncompatibleStateError(
            f"{directory}: {type(obj).__qualname__}.load_state_dict rejected object "
            f"{name!r} ({type(e).__name__}: {e}). Objects restored before it were already "
            "loaded; restore again once the live object matches the one that was saved"
        ) from e


def load_module_weights(storage: Storage, checkpoint: str, manifest: Mapping[str, Any],
                        name: str, module: torch.nn.Module, fit: ModuleFit) -> None:
    """Copy saved module ``name``'s tensors into ``module``, which :func:`fit_module`
    found to fit (``fit``).

    Dense tensors are read and verified, then copied into the module's own; nothing
    in the module changes when a hash fails. Composite ones (complex128, sparse,
    quantized) are rebuilt from their parts and handed to
    ``module.load_state_dict(..., strict=False)``. Saved keys the module lacks are
    not read.
    """
    directory = storage.where(checkpoint)
    saved = manifest["objects"][name]
    fillable, other, entries = fit.fillable, fit.other, fit.entries
    aliases: dict[str, str] = saved.get("aliases", {})
    targets = dict(fillable)
    wanted = fillable.keys() | other.keys()
    for alias, key in aliases.items():
        if alias in wanted:
            wanted |= {key}
            if alias in fillable and key not in targets:
                targets[key] = fillable[alias]
    read = read_tensors(storage, checkpoint, manifest["files"],
                        {(name, k): e for k, e in entries.items() if k in wanted},
                        {(name, k): t for k, t in targets.items()}, fill_targets=False)
    loaded = {key: tensor for (_, key), tensor in read.items()}
    for alias, key in aliases.items():
        if key in loaded:
            loaded.setdefault(alias, loaded[key])
    tree = saved["tree"]
    composites = {
        key: decode(node, loaded.get)
        for key, node in (tree.items() if isinstance(tree, dict) else ())
        if isinstance(node, dict) and isinstance(node.get("__tensor__"), dict)
    }
    composites = {key: tensor for key, tensor in composites.items() if tensor is not None}
    if not composites:
        return
    try:
        module.load_state_dict(composites, strict=False)
    except Exception as e:  # a module's own _load_from_state_dict may raise anything
        raise IncompatibleStateError(
            f"{directory}: {type(module).__qualname__}.load_state_dict rejected the "
            f"tensors {sorted(composites)} of object {name!r} ({type(e).__name__}: {e})"
        ) from e


def live_state(directory: str, name: str, obj: Stateful) -> Any:
    """The live object's ``state_dict()``, whose failure names the object."""
    try:
        return obj.state_dict()
    except CheckpointError:
        raise
    except Exception as e:  # a user's state_dict may raise anything
        raise IncompatibleStateError(
            f"{directory}: cannot restore object {name!r} ({type(obj).__qualname__}): its "
            f"state_dict(), called first to check that it fits the checkpoint, raised "
            f"{type(e).__name__}: {e}. Nothing was changed; fix the object and restore again"
        ) from e


def fit_module(
    directory: str, name: str, saved: Mapping[str, Any], module: torch.nn.Module, *,
    strict: bool, for_restore: bool = False,
) -> ModuleFit:
    """Check a live module against saved module ``name`` (see :func:`check_compatible`),
    from the manifest alone, calling its ``state_dict()`` once.

    Raises:
        IncompatibleStateError: keys, shapes or dtypes differ, or a live tensor
            cannot take data; the message lists them and says what to do.
    """
    fillable, other = live_tensors(live_state(directory, name, module))
    fit = ModuleFit(fillable, other, manifest_tensor_entries(saved))
    entries = fit.entries
    if saved.get("aliases"):
        entries = {**entries, **{alias: entries[key] for alias, key in saved["aliases"].items()}}
    keys = fillable.keys() | other.keys()
    missing = sorted(keys - entries.keys()) if strict else []
    unexpected = sorted(entries.keys() - keys) if strict else []
    mismatched = [
        (key, f"{entry.dtype}{list(entry.shape)}",
         f"{DTYPES.get(t.dtype, str(t.dtype))}{list(t.shape)}")
        for key, t in fillable.items()
        if (entry := entries.get(key)) is not None
        and (t.shape != entry.shape or DTYPES.get(t.dtype) != entry.dtype)  # Size is a tuple
    ]
    # a module copies into its tensors: one that cannot hold the data is an error
    unfillable = sorted((key, why) for key, why in other.items()
                        if key in entries and not why.startswith("is part of"))
    if not (missing or unexpected or mismatched or unfillable):
        return fit
    lines = [f"{directory}: module {name!r} does not match the checkpoint"]
    lines += _listed([f"  missing in checkpoint: {k}" for k in missing])
    lines += _listed([f"  unexpected in checkpoint: {k}" for k in unexpected])
    lines += _listed([f"  {k}: checkpoint {a}, model {b}" for k, a, b in mismatched])
    lines += _listed([f"  {k}: the model's tensor {why}" for k, why in unfillable])
    advice = "Build the model with the same configuration as the saved one"
    if unfillable:
        advice += ", with real tensors of its own (to_empty() a meta model, clone() an " \
                  "expanded parameter)"
    if (missing or unexpected) and for_restore:
        advice += ("; restore() needs every key, but ckpts.load_weights(checkpoint, model, "
                   "strict=False) loads just a model's matching weights")
    elif (missing or unexpected) and strict:
        advice += ", or pass strict=False to ckpts.load_weights to skip missing/unexpected keys"
    lines.append(advice + ".")
    raise IncompatibleStateError(
        "\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched
    )


def _listed(lines: list[str]) -> list[str]:
    """The first MAX_LISTED lines, and how many more there are."""
    if len(lines) <= MAX_LISTED:
        return lines
    return [*lines[:MAX_LISTED], f"  … and {len(lines) - MAX_LISTED} more"]

"""TrainState: the named objects of a training run, as tensors plus a JSON tree.

Anything with ``state_dict()`` and ``load_state_dict()`` is Stateful: modules,
optimizers, LR schedulers, ``torch.amp.GradScaler``, a :class:`ResumableLoader`,
or a user's own class. The process-wide random generators are added automatically
under the reserved name ``rng``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ckpts._format.codec import TensorNotes, encode, is_dtensor
from ckpts._state.data import ResumableLoader
from ckpts._state.rng import RNGState
from ckpts.errors import CheckpointError, InvalidArgumentError, UnserializableStateError

RNG_NAME = "rng"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state can be captured and put back in place."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


@dataclass
class ObjectSnapshot:
    """One object's state, split into an encoded JSON tree and its distinct tensors.

    ``aliases`` maps a key whose tensor is the very same tensor as another key's
    (tied weights such as GPT-2's ``lm_head.weight``) to that other key, so the
    data is stored once and restored tied. ``hf_config`` is a Hugging Face model's
    ``config`` as transformers writes it to ``config.json`` (None for other objects).
    """

    kind: str
    class_name: str
    tree: Any
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    hf_config: dict[str, Any] | None = None
    frozen: frozenset[str] = frozenset()
    """Keys of a module's parameters that do not require grad: a layout hint (they get
    files of their own, see ckpts._checkpoint.write.plan_shards), never a reason to skip."""
    notes: TensorNotes | None = None
    """What was noted of ``tensors`` (in order) while the state was walked: their local
    data, shapes, dtypes (see ckpts._checkpoint.staging.Stager). None: nothing was noted."""


class TrainState:
    """The named objects a checkpoint saves and restores, plus every RNG.

    Args:
        **objects: name -> Stateful object. Names become file names
            (``model`` -> ``model.safetensors``), so they are identifiers;
            ``rng`` is reserved for the random generators, captured automatically.

    Saving calls each object's ``state_dict()``; restoring calls it too, first,
    to check that the live object fits the checkpoint and to find the live
    tensors the saved data goes into (docs/format.md, "Restoring in place"),
    then ``load_state_dict()``. An exception raised inside either is re-raised
    as a CheckpointError naming the object.

    Raises:
        InvalidArgumentError: an object lacks state_dict/load_state_dict, or a
            name is not usable.

    Example:
        >>> import torch, ckpts
        >>> model = torch.nn.Linear(2, 2)
        >>> state = ckpts.TrainState(model=model, optimizer=torch.optim.SGD(model.parameters()))
        >>> sorted(state.objects)
        ['model', 'optimizer', 'rng']
    """

    def __init__(self, **objects: Stateful) -> None:
        if not objects:
            raise InvalidArgumentError(
                "TrainState needs at least one object, e.g. TrainState(model=model)"
            )
        for name, obj in objects.items():
            if name == RNG_NAME:
                raise InvalidArgumentError(
                    f"the name {RNG_NAME!r} is reserved: TrainState captures the random "
                    "generators under it automatically; pick another name"
                )
            if not _NAME.match(name):
                raise InvalidArgumentError(
                    f"object name {name!r} must be an identifier (letters, digits, _ and -)"
                )
            if not isinstance(obj, Stateful):
                raise InvalidArgumentError(
                    f"object {name!r} ({type(obj).__qualname__}) has no state_dict() and "
                    "load_state_dict(); wrap it in a class that has both"
                )
        self.objects: dict[str, Stateful] = {**objects, RNG_NAME: RNGState()}

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={type(o).__qualname__}" for n, o in self.objects.items())
        return f"TrainState({parts})"

    def snapshot(self) -> dict[str, ObjectSnapshot]:
        """Capture every object's current state (tensors are referenced, not copied)."""
        return {name: snapshot_object(name, obj) for name, obj in self.objects.items()}


def snapshot_object(name: str, obj: Stateful) -> ObjectSnapshot:
    """Split one object's state_dict into a JSON tree and its distinct tensors.

    Raises:
        UnserializableStateError: ``state_dict()`` raised, or returned a value with
            no pickle-free encoding; the message names the object and the key.
    """
    what = f"object {name!r} ({type(obj).__qualname__})"
    try:
        state_dict = obj.state_dict()
    except CheckpointError:
        raise
    except Exception as e:
        raise UnserializableStateError(
            f"cannot save {what}: its state_dict() raised {type(e).__name__}: {e}. "
            "Fix the object (or leave it out of the TrainState); nothing was written."
        ) from e
    tensors: dict[str, torch.Tensor] = {}
    notes = TensorNotes()
    try:
        tree = encode(state_dict, tensors, notes=notes)
    except UnserializableStateError as e:
        raise UnserializableStateError(f"{what}: {e}") from e
    aliases = _tied(tensors, notes.addresses)
    distinct = tensors
    if aliases:
        distinct = {key: t for key, t in tensors.items() if key not in aliases}
        notes = notes.without({i for i, key in enumerate(tensors) if key in aliases})
    return ObjectSnapshot(
        kind=object_kind(obj),
        class_name=type(obj).__qualname__,
        tree=tree,
        tensors=distinct,
        aliases=aliases,
        hf_config=hf_config(what, obj),
        frozen=_frozen_parameters(obj, distinct),
        notes=notes,
    )


def _frozen_parameters(obj: Stateful, tensors: Mapping[str, torch.Tensor]) -> frozenset[str]:
    if not isinstance(obj, torch.nn.Module):
        return frozenset()
    return frozenset(key for key, parameter in obj.named_parameters(remove_duplicate=False)
                     if not parameter.requires_grad and key in tensors)


def hf_config(what: str, obj: object) -> dict[str, Any] | None:
    """A Hugging Face model's config as transformers writes it to ``config.json``.

    Recorded so that an export can write ``config.json`` without the model class.
    Only a :class:`torch.nn.Module` whose ``config`` has ``to_dict()`` has one (or the
    plain state of a model ``ckpts import`` read with its ``config.json``); the
    config's own ``to_json_string()`` (which turns dtypes into names) is used when
    it exists. A config that is still not strict JSON (NaN, objects) is refused.
    """
    config = getattr(obj, "config", None) if isinstance(obj, torch.nn.Module) else None
    imported = None if isinstance(obj, torch.nn.Module) else getattr(obj, "hf_config", None)
    if not callable(getattr(config, "to_dict", None)) and not isinstance(imported, dict):
        return None
    try:
        if isinstance(imported, dict):  # ckpts import's model: its config.json
            data = imported
        elif callable(getattr(config, "to_json_string", None)):
            data = json.loads(config.to_json_string(use_diff=False))  # type: ignore[union-attr]
        else:
            data = config.to_dict()  # type: ignore[union-attr]
        json.dumps(data, allow_nan=False)
    except Exception as e:  # a config is user code: whatever it raises, say which object
        raise UnserializableStateError(
            f"cannot save {what}: its config ({type(config).__qualname__}) is not plain "
            f"JSON ({e}); make every config value a str, number, bool, None, list or dict"
        ) from e
    if not isinstance(data, dict):
        raise UnserializableStateError(
            f"cannot save {what}: its config.to_dict() returned {type(data).__qualname__}, "
            "not a dict")
    return data


PER_RANK_KINDS = ("rng", "loader")  # each rank of a job saves and restores its own


def object_kind(obj: object) -> str:
    """A coarse kind recorded in the manifest: module, optimizer, scheduler, rng, loader or
    object."""
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
        return "scheduler"
    if isinstance(obj, RNGState):
        return "rng"
    if isinstance(obj, ResumableLoader):
        return "loader"
    return "object"


def _tied(tensors: Mapping[str, torch.Tensor], addresses: list[int]) -> dict[str, str]:
    """Map each key whose tensor is the very same view of the same memory as an earlier
    key's (tied weights) to that earlier key.

    Two tensors are the same view only if they start at the same address (``addresses``:
    each tensor's ``data_ptr()``, in order), so the full identity (storage, offset, shape,
    strides, dtype, ...) is compared only among keys that share one. Without ties that
    is one set of ints, which matters with tens of thousands of small tensors.
    """
    if len(set(addresses)) == len(addresses):
        return {}
    first_at: dict[int, str] = {}
    shared: set[str] = set()  # keys whose address another key has too
    for key, address in zip(tensors, addresses, strict=True):
        first = first_at.setdefault(address, key)
        if first is not key:
            shared.update((first, key))
    first_key: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for key in (key for key in tensors if key in shared):
        value = tensors[key]
        tensor = value.to_local() if is_dtensor(value) else value  # type: ignore[attr-defined]
        # empty tensors have no memory to compare: only the same object is tied
        identity: tuple[Any, ...] = ("empty", id(value)) if tensor.numel() == 0 else (
            tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.is_conj(),
            tensor.is_neg(),
        )
        if identity in first_key:
            aliases[key] = first_key[identity]
        else:
            first_key[identity] = key
    return aliases

"""Typed JSON encoding of non-tensor state, with tensors pulled out by reference.

JSON alone cannot say "tuple", "dict with int keys" or "nan", and pickle is never
an option, so values are encoded with a few tagged objects::

    None, bool, int, str, finite float  ->  themselves
    float nan / inf / -inf              ->  {"__float__": "nan" | "inf" | "-inf"}
    tuple                               ->  {"__tuple__": [...]}
    dict with only plain str keys       ->  {...}
    any other dict (int keys, ...)      ->  {"__dict__": [[key, value], ...]}
    torch.Tensor                        ->  {"__tensor__": "<tensor key>"}

A str key is plain unless it starts with ``__`` (reserved for the tags). Any other
type is refused with :class:`UnserializableStateError` naming its key path.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ckpts.errors import CorruptCheckpointError, UnserializableStateError

if TYPE_CHECKING:
    import torch

_FLOAT_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode(value: Any, tensors: dict[str, torch.Tensor], *, path: str = "") -> Any:
    """Encode ``value`` as JSON-able data; tensors go into ``tensors`` under a unique key.

    Tensor keys are the dotted key path (``state.0.exp_avg``), so a module's flat
    state_dict keeps its own names. Raises UnserializableStateError for other types.
    """
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        if math.isfinite(value):
            return value
        return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if _is_tensor(value):
        key = _unique_key(path or "tensor", tensors)
        tensors[key] = value
        return {"__tensor__": key}
    if kind is tuple:
        return {"__tuple__": [encode(v, tensors, path=_join(path, i)) for i, v in enumerate(value)]}
    if kind is list:
        return [encode(v, tensors, path=_join(path, i)) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = [(k, encode(v, tensors, path=_join(path, k))) for k, v in value.items()]
        if all(type(k) is str and not k.startswith("__") for k, _ in items):
            return dict(items)
        return {"__dict__": [[_encode_key(k, path), v] for k, v in items]}
    raise UnserializableStateError(
        f"cannot save {kind.__qualname__} at key {path or '<root>'!r}: ckpts stores only "
        "tensors, None, bool, int, float, str, list, tuple and dict (never pickle). "
        "Convert it (e.g. int(x), x.tolist(), str(x)) in its state_dict(), or leave it out."
    )


def decode(data: Any, load_tensor: Callable[[str], Any]) -> Any:
    """Invert :func:`encode`; ``load_tensor(key)`` supplies each referenced tensor.

    Raises:
        CorruptCheckpointError: a tag is malformed (the manifest is damaged).
    """
    if isinstance(data, list):
        return [decode(v, load_tensor) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        (tag, inner), = data.items()
        if tag in _TAGS:
            return _decode_tag(tag, inner, load_tensor)
    return {k: decode(v, load_tensor) for k, v in data.items()}


_TAGS = ("__tensor__", "__float__", "__tuple__", "__dict__")


def _decode_tag(tag: str, inner: Any, load_tensor: Callable[[str], Any]) -> Any:
    if tag == "__tensor__" and isinstance(inner, str):
        return load_tensor(inner)
    if tag == "__float__" and isinstance(inner, str) and inner in _FLOAT_NAMES:
        return _FLOAT_NAMES[inner]
    if tag == "__tuple__" and isinstance(inner, list):
        return tuple(decode(v, load_tensor) for v in inner)
    if tag == "__dict__" and isinstance(inner, list) \
            and all(isinstance(pair, list) and len(pair) == 2 for pair in inner):
        decoded = {}
        for key, value in inner:
            key = decode(key, load_tensor)
            if not isinstance(key, (str, int, bool, tuple)) and key is not None:
                raise CorruptCheckpointError(f"unusable dict key {key!r} in the manifest")
            decoded[key] = decode(value, load_tensor)
        return decoded
    raise CorruptCheckpointError(f"malformed {tag} value in the manifest: {str(inner)[:80]}")


def _is_tensor(value: Any) -> bool:
    # Without torch imported (e.g. the CLI listing a run), nothing can be a tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _encode_key(key: Any, path: str) -> Any:
    if type(key) in (str, int, bool) or key is None:
        return key
    if type(key) is tuple:
        return {"__tuple__": [_encode_key(k, path) for k in key]}
    raise UnserializableStateError(
        f"cannot save dict key {key!r} of type {type(key).__qualname__} under "
        f"{path or '<root>'!r}: dict keys must be str, int, bool, None or tuples of them."
    )


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _unique_key(key: str, taken: Mapping[str, object]) -> str:
    if key not in taken:
        return key
    n = 1
    while f"{key}#{n}" in taken:
        n += 1
    return f"{key}#{n}"

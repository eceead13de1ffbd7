"""Typed JSON encoding of state, with every kind of tensor pulled out as plain tensors.

JSON alone cannot say "tuple", "dict with int keys" or "nan", and pickle is never
an option, so values are encoded with a few tagged objects::

    None, bool, int, str, finite float  ->  themselves
    float nan / inf / -inf              ->  {"__float__": "nan" | "inf" | "-inf"}
    tuple                               ->  {"__tuple__": [...]}
    dict with only plain str keys       ->  {...}
    any other dict (int keys, ...)      ->  {"__dict__": [[key, value], ...]}
    dense tensor of a safetensors dtype ->  {"__tensor__": "<tensor key>"}
    complex128, sparse, quantized       ->  {"__tensor__": {"kind": ..., "parts": {...}, ...}}

A str key is plain unless it starts with ``__`` (reserved for the tags).

A tensor kind that safetensors cannot store as it is (complex128, sparse COO and
compressed layouts, quantized) is split into dense *parts* that it can store,
each a ``{"__tensor__": key}`` of its own, plus the few numbers needed to put it
together again. Parts stay ordinary safetensors entries (``w.indices``,
``w.values``) that any tool reads. A reader that predates composite nodes finds
a ``__tensor__`` whose value is not a string and refuses it as malformed, so it
fails loudly instead of handing a dict to ``load_state_dict``.

Anything else (meta tensors, tensor subclasses, nested tensors, dtypes such as
complex32) is refused with :class:`UnserializableStateError` naming its key path.
docs/format.md has the table of kinds.

This module imports torch only when it meets a tensor, so listing a run stays
torch-free.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckpts._format.manifest import MAX_TREE_DEPTH
from ckpts.errors import CorruptCheckpointError, UnserializableStateError

if TYPE_CHECKING:
    import torch

_FLOAT_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# how deep a value's node may sit: its own containers reach 2 below it (a dict's pairs)
_DEEPEST = MAX_TREE_DEPTH - 2
# values that encode as themselves (floats are not: nan and inf need a tag)
_SCALARS = frozenset({int, str, bool, type(None)})

# composite kind -> the names of its parts, in order
_PARTS: dict[str, tuple[str, ...]] = {
    "complex128": ("real",),
    "sparse_coo": ("indices", "values"),
    "sparse_csr": ("crow_indices", "col_indices", "values"),
    "sparse_bsr": ("crow_indices", "col_indices", "values"),
    "sparse_csc": ("ccol_indices", "row_indices", "values"),
    "sparse_bsc": ("ccol_indices", "row_indices", "values"),
    "quantized_per_tensor": ("int_repr",),
    "quantized_per_channel": ("int_repr", "scales", "zero_points"),
}
# the int tensors a quantized tensor is made of, by quantized dtype name
_QUANTIZED_STORAGE = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}


@dataclass
class TensorNotes:
    """Facts about each tensor :func:`encode` pulls out, noted in the same walk.

    The lists run parallel to the ``tensors`` dict, in its order; for a DTensor they
    describe its local shard. Noting them during the walk visits each tensor once: with
    40,000 small tensors every further pass over them costs milliseconds, and an async
    save pays them on the training thread.
    """

    local: list[torch.Tensor] = field(default_factory=list)
    """Each tensor, or a DTensor's local shard: what staging copies."""
    addresses: list[int] = field(default_factory=list)
    """``data_ptr()`` of each: tied tensors start at the same address."""
    shapes: list[torch.Size] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    on_cuda: bool = False
    """Whether any of them is on a CUDA device (staging then uses pinned memory)."""

    def note(self, tensor: torch.Tensor) -> None:
        """Note one tensor (a DTensor's local shard, already unwrapped)."""
        self.local.append(tensor)
        self.addresses.append(tensor.data_ptr())
        self.shapes.append(tensor.shape)
        self.dtypes.append(tensor.dtype)
        self.on_cuda = self.on_cuda or tensor.is_cuda

    def without(self, positions: set[int]) -> TensorNotes:
        """The notes with the tensors at ``positions`` left out."""
        kept = [i for i in range(len(self.local)) if i not in positions]
        return TensorNotes(local=[self.local[i] for i in kept],
                           addresses=[self.addresses[i] for i in kept],
                           shapes=[self.shapes[i] for i in kept],
                           dtypes=[self.dtypes[i] for i in kept],
                           on_cuda=any(self.local[i].is_cuda for i in kept))


def encode(value: Any, tensors: dict[str, torch.Tensor], *, path: str = "",
           notes: TensorNotes | None = None) -> Any:
    """Encode ``value`` as JSON-able data; tensors go into ``tensors`` under a unique key.

    Tensor keys are the dotted key path (``state.0.exp_avg``), so a module's flat
    state_dict keeps its own names; the parts of a composite tensor add a suffix
    (``w.indices``), except a complex128 tensor's single real view, which keeps it.
    With ``notes``, each tensor's address, shape, dtype and device are noted too.

    Raises:
        UnserializableStateError: a value (or tensor kind) has no pickle-free
            encoding, or its tree would nest deeper than MAX_TREE_DEPTH; the message
            names its key path and the fix.
    """
    return _Encoder(live=False, plain=tensors, notes=notes).encode(value, path, 1)


def live_tensors(value: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a live state_dict, under the keys :func:`encode` gives them.

    Returns ``(fillable, other)``: ``fillable`` holds the dense tensors of a
    storable dtype whose elements each have their own memory, which a restore may
    overwrite in place; ``other`` maps every other tensor key (the parts of a
    composite tensor, meta tensors, expanded or overlapping views, refused kinds)
    to why it is not filled. Never raises for unsupported values: the live state
    only supplies targets.
    """
    encoder = _Encoder(live=True, plain={})
    encoder.encode(value, "", 1)
    fillable: dict[str, torch.Tensor] = {}
    for key, tensor in encoder.plain.items():
        if _elements_distinct(tensor):
            fillable[key] = tensor
        else:
            encoder.other[key] = ("is an expanded or overlapping view (some of its elements "
                                  "share memory), so it cannot be filled in place")
    return fillable, encoder.other


class _Encoder:
    """One walk over a state: the JSON tree, the plain tensors and (live) the rest."""

    def __init__(self, *, live: bool, plain: dict[str, torch.Tensor],
                 notes: TensorNotes | None = None) -> None:
        self.live = live
        self.plain = plain
        self.notes = notes
        self.other: dict[str, str] = {}
        self._composite: list[str] = []  # kinds of the composite tensors being split
        torch = sys.modules.get("torch")  # without torch imported, nothing is a tensor
        # the exact types of a plain tensor; subclasses (DTensor, ...) take the long way
        self._tensor_types: tuple[type, ...] = () if torch is None \
            else (torch.Tensor, torch.nn.Parameter)
        self._strided = None if torch is None else torch.strided
        if torch is not None:
            _load_storable()

    def encode(self, value: Any, path: str, depth: int) -> Any:
        """``value`` as typed JSON, whose node will sit ``depth`` levels deep in the tree."""
        kind = type(value)
        if depth > _DEEPEST and kind not in _SCALARS and not (
                kind is float and math.isfinite(value)):
            if self.live:
                return None
            raise UnserializableStateError(
                f"cannot save the value at key {path!r}: the state nests too deep (its typed "
                f"JSON may nest {MAX_TREE_DEPTH} levels) for ckpts to read it back; flatten it "
                "in its state_dict() (e.g. a dict of paths to values)")
        # dicts and plain tensors first: a state of 40,000 small tensors is mostly these,
        # and each test costs on the training thread during an async save
        if isinstance(value, dict):
            return self._mapping(value, path, depth)
        if kind in self._tensor_types:
            return self._tensor(value, path, depth)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:
            if math.isfinite(value):
                return value
            return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if _is_tensor(value):
            return self._tensor(value, path, depth)
        if kind is tuple or kind is list:
            if all(type(v) in _SCALARS for v in value):  # e.g. python's RNG state: 625 ints
                items = list(value)
            else:
                inner = depth + 2 if kind is tuple else depth + 1  # {"__tuple__": [...]}
                items = [self.encode(v, _join(path, i), inner) for i, v in enumerate(value)]
            return {"__tuple__": items} if kind is tuple else items
        if isinstance(value, Mapping):
            return self._mapping(value, path, depth)
        if self.live:
            return None
        raise UnserializableStateError(
            f"cannot save {kind.__qualname__} at key {path or '<root>'!r}: ckpts stores only "
            "tensors, None, bool, int, float, str, list, tuple and dict (never pickle). "
            "Convert it (e.g. int(x), x.tolist(), str(x)) in its state_dict(), or leave it out."
        )

    def _mapping(self, value: Mapping[Any, Any], path: str, depth: int) -> Any:
        encoded = {}
        plain_keys = all(type(key) is str and not key.startswith("__") for key in value)
        inner = depth + 1 if plain_keys else depth + 3  # {"__dict__": [[key, value], ...]}
        # the commonest entry, a plain dense tensor, is checked, kept and noted right here
        # (what _is_plain, _tensor and TensorNotes.note do, without three calls); names
        # are bound once per mapping, as this runs for each of 40,000 small tensors
        tensor_types, strided, plain, other = (self._tensor_types, self._strided, self.plain,
                                               self.other)
        fast = not self._composite and inner <= _DEEPEST  # else parts, deep ones: long way
        notes = self.notes
        if notes is not None:
            note_local, note_address = notes.local.append, notes.addresses.append
            note_shape, note_dtype = notes.shapes.append, notes.dtypes.append
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)  # _join, inlined
            if fast and type(item) in tensor_types and item.layout is strided \
                    and (dtype := item.dtype) in _STORABLE and not item.is_meta \
                    and not item.is_nested and where and where not in plain \
                    and where not in other:
                plain[where] = item
                if notes is not None:
                    note_local(item)
                    note_address(item.data_ptr())
                    note_shape(item.shape)
                    note_dtype(dtype)
                    if item.is_cuda:
                        notes.on_cuda = True
                encoded[key] = {"__tensor__": where}
            else:
                encoded[key] = self.encode(item, where, inner)
        if plain_keys:
            return encoded
        if self.live:  # only the tensors matter; an odd key is the saver's business
            return None
        return {"__dict__": [[_encode_key(k, path, inner), v] for k, v in encoded.items()]}

    def _tensor(self, tensor: torch.Tensor, path: str, depth: int) -> Any:
        split = None
        if not _is_plain(tensor):  # the common case is checked cheaply first
            refusal = _refusal(tensor)
            if refusal is not None:
                if not self.live:
                    raise UnserializableStateError(
                        f"cannot save the tensor at key {path or '<root>'!r}: it {refusal}"
                    )
                self.other[self._key(path)] = refusal
                return None
            try:
                split = _split(tensor)
            except RuntimeError as e:  # a kind torch cannot take apart on this device
                if self.live:
                    self.other[self._key(path)] = f"cannot be taken apart ({e})"
                    return None
                raise UnserializableStateError(
                    f"cannot save the tensor at key {path or '<root>'!r} ({tensor.layout}, "
                    f"{tensor.dtype}, on {tensor.device}): taking it apart failed ({e}); "
                    "convert it (.to_dense(), .dequantize(), .cpu()) in its state_dict()"
                ) from e
        if split is None:
            key = path or "tensor"
            if key in self.plain or key in self.other:
                key = self._key(path)
            if self._composite and self.live:
                self.other[key] = f"is part of a {self._composite[-1]} tensor"
            else:
                self.plain[key] = tensor
                if self.notes is not None:
                    self.notes.note(tensor.to_local() if is_dtensor(tensor)  # type: ignore[attr-defined]
                                    else tensor)
            return {"__tensor__": key}
        kind, parts, params = split
        self._composite.append(kind)
        try:  # {"__tensor__": {"kind": ..., "parts": {name: part}, param: value}}
            encoded_parts = {name: self.encode(part, path if kind == "complex128"
                                               else _join(path, name), depth + 3)
                             for name, part in parts.items()}
        finally:
            self._composite.pop()
        return {"__tensor__": {"kind": kind, "parts": encoded_parts, **{
            k: self.encode(v, _join(path, k), depth + 2) for k, v in params.items()}}}

    def _key(self, path: str) -> str:
        """A key no tensor has yet: the path, or the path plus ``#n``."""
        key = path or "tensor"
        n = 0
        while key in self.plain or key in self.other:
            n += 1
            key = f"{path or 'tensor'}#{n}"
        return key


_STORABLE: frozenset[Any] = frozenset()  # safetensors' dtypes, filled on first use


def _load_storable() -> None:
    global _STORABLE
    if not _STORABLE:
        from ckpts._format.safetensors import DTYPES

        _STORABLE = frozenset(DTYPES)


def _is_plain(tensor: torch.Tensor) -> bool:
    """A dense tensor of a dtype safetensors stores, stored as it is. (Quantized tensors
    fail the dtype test: no quantized dtype is a safetensors dtype.)"""
    _load_storable()
    torch = sys.modules["torch"]
    if type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter:
        if not is_dtensor(tensor):
            return False
        # a shard of a tensor spread over ranks (FSDP2): see ckpts._checkpoint.sharded
        tensor = tensor.to_local()  # type: ignore[attr-defined]
        if type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter:
            return False
    return tensor.layout is torch.strided and tensor.dtype in _STORABLE \
        and not tensor.is_meta and not tensor.is_nested


def is_dtensor(value: Any) -> bool:
    """A torch.distributed DTensor (looked up only once torch.distributed is loaded).
    The class name is checked first: this runs once per tensor, 40,000 times in a save
    of many small tensors."""
    if "DTensor" not in type(value).__name__:
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _refusal(tensor: torch.Tensor) -> str | None:
    """Why this tensor cannot be saved at all (with the fix), or None."""
    import torch

    from ckpts._format.safetensors import DTYPES

    if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):  # type: ignore[attr-defined]
        return ("is an uninitialized lazy parameter (a Lazy* module that has not run yet); "
                "run one forward pass before saving")
    if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
        return (f"is a tensor subclass ({type(tensor).__qualname__}), which ckpts does not "
                "store; convert it to a plain tensor in its state_dict() (e.g. DTensor: "
                ".full_tensor())")
    if tensor.device.type == "meta":
        return ("is a meta tensor, which has no data to save; materialize it "
                "(e.g. module.to_empty(device='cpu') and initialize) before saving")
    if tensor.is_nested:
        return ("is a nested tensor, which ckpts does not store; save its components "
                "(tensor.unbind()) instead")
    layout = str(tensor.layout).removeprefix("torch.")
    if layout not in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr",
                      "sparse_bsc"):
        return (f"has layout {layout}, which ckpts does not store; convert it with "
                ".to_dense() in its state_dict()")
    if tensor.is_quantized:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _QUANTIZED_STORAGE:
            return (f"is quantized as {dtype}, which ckpts does not store (only qint8, quint8 "
                    "and qint32); dequantize it with .dequantize() in its state_dict()")
        scheme = str(tensor.qscheme()).removeprefix("torch.")
        if scheme not in ("per_tensor_affine", "per_channel_affine",
                          "per_channel_affine_float_qparams"):
            return (f"is quantized with scheme {scheme}, which ckpts does not store; "
                    "dequantize it with .dequantize() in its state_dict()")
        return None
    if layout == "strided" and tensor.dtype not in DTYPES \
            and tensor.dtype is not torch.complex128:
        storable = ", ".join(sorted(str(d).removeprefix("torch.") for d in DTYPES))
        return (f"has dtype {str(tensor.dtype).removeprefix('torch.')}, which safetensors "
                f"cannot store; cast it in its state_dict() to one of: {storable}, complex128")
    return None


def _split(tensor: torch.Tensor) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
    """A composite tensor's kind, dense parts and parameters; None for a plain tensor."""
    import torch

    layout = str(tensor.layout).removeprefix("torch.")
    if tensor.is_quantized:
        tensor = tensor.detach()
        if tensor.qscheme() is torch.per_tensor_affine:
            return ("quantized_per_tensor", {"int_repr": tensor.int_repr()},
                    {"scale": tensor.q_scale(), "zero_point": tensor.q_zero_point()})
        return ("quantized_per_channel",
                {"int_repr": tensor.int_repr(), "scales": tensor.q_per_channel_scales(),
                 "zero_points": tensor.q_per_channel_zero_points()},
                {"axis": tensor.q_per_channel_axis()})
    if layout == "sparse_coo":
        tensor = tensor.detach()
        return ("sparse_coo", {"indices": tensor._indices(), "values": tensor._values()},
                {"size": list(tensor.shape), "coalesced": tensor.is_coalesced()})
    if layout in ("sparse_csr", "sparse_bsr"):
        tensor = tensor.detach()
        return (layout, {"crow_indices": tensor.crow_indices(),
                         "col_indices": tensor.col_indices(), "values": tensor.values()},
                {"size": list(tensor.shape)})
    if layout in ("sparse_csc", "sparse_bsc"):
        tensor = tensor.detach()
        return (layout, {"ccol_indices": tensor.ccol_indices(),
                         "row_indices": tensor.row_indices(), "values": tensor.values()},
                {"size": list(tensor.shape)})
    if tensor.dtype is torch.complex128:
        resolved = tensor.detach().resolve_conj().resolve_neg()
        return "complex128", {"real": torch.view_as_real(resolved)}, {}
    return None


def _elements_distinct(tensor: torch.Tensor) -> bool:
    """Whether no two elements share memory (false for expanded, stride-0 views)."""
    if is_dtensor(tensor):
        tensor = tensor.to_local()  # type: ignore[attr-defined]
    if tensor.is_contiguous():
        return True
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride(),
                                                         strict=True) if size > 1)
    reach = 0  # the largest element offset the smaller-stride dimensions reach
    for stride, size in dims:
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def decode(data: Any, load_tensor: Callable[[str], Any]) -> Any:
    """Invert :func:`encode`; ``load_tensor(key)`` supplies each referenced tensor.

    When ``load_tensor`` returns None (a dry run over the tree's structure), a
    composite tensor decodes to None too.

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
    if tag == "__tensor__" and isinstance(inner, dict) and isinstance(inner.get("kind"), str) \
            and inner["kind"] in _PARTS:
        return _decode_composite(inner, load_tensor)
    if tag == "__float__" and isinstance(inner, str) and inner in _FLOAT_NAMES:
        return _FLOAT_NAMES[inner]
    if tag == "__tuple__" and isinstance(inner, list):
        return tuple(decode(v, load_tensor) for v in inner)
    if tag == "__dict__" and isinstance(inner, list) \
            and all(isinstance(pair, list) and len(pair) == 2 for pair in inner):
        decoded = {}
        for key, value in inner:
            key = decode(key, load_tensor)
            if (not isinstance(key, (str, int, bool, tuple)) and key is not None) \
                    or (isinstance(key, tuple) and not _hashable(key)):
                raise CorruptCheckpointError(f"unusable dict key {key!r} in the saved state")
            decoded[key] = decode(value, load_tensor)
        return decoded
    raise CorruptCheckpointError(f"malformed {tag} value in the saved state: {str(inner)[:80]}")


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:  # a tuple holding a list or dict
        return False
    return True


def _decode_composite(node: dict[str, Any], load_tensor: Callable[[str], Any]) -> Any:
    """Put a complex128, sparse or quantized tensor together from its decoded parts."""
    kind = node["kind"]
    raw_parts = node.get("parts")
    if not isinstance(raw_parts, dict) or set(raw_parts) != set(_PARTS[kind]):
        raise CorruptCheckpointError(
            f"malformed {kind} tensor in the saved state: its parts should be "
            f"{list(_PARTS[kind])}, found {str(raw_parts)[:80]}")
    parts = {name: decode(raw_parts[name], load_tensor) for name in _PARTS[kind]}
    if any(part is None for part in parts.values()):
        return None
    params = {k: decode(v, load_tensor) for k, v in node.items() if k not in ("kind", "parts")}
    import torch

    if not all(isinstance(part, torch.Tensor) for part in parts.values()):
        raise CorruptCheckpointError(f"malformed {kind} tensor in the saved state: a part is "
                                     "not a tensor")
    try:
        return _assemble(kind, parts, params)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        raise CorruptCheckpointError(
            f"the {kind} tensor made of {_part_keys(raw_parts)} cannot be rebuilt from the "
            f"checkpoint ({e}); the manifest or its files are damaged"
        ) from e


def _assemble(kind: str, parts: dict[str, torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
    import torch

    if kind != "complex128" and any(part.is_meta for part in parts.values()):
        return _placeholder(kind, parts, params)
    if kind == "complex128":
        real = parts["real"]
        if real.dtype is not torch.float64 or real.dim() == 0 or real.shape[-1] != 2:
            raise ValueError(f"its real view is {real.dtype}{list(real.shape)}, "
                             "not float64[..., 2]")
        return torch.view_as_complex(real.contiguous())
    if kind == "sparse_coo":
        coalesced = params["coalesced"]
        if type(coalesced) is not bool:
            raise TypeError("coalesced is not a bool")
        return torch.sparse_coo_tensor(parts["indices"], parts["values"], _size(params),
                                       is_coalesced=coalesced, check_invariants=True)
    if kind.startswith("sparse_"):
        names = _PARTS[kind]
        layout = getattr(torch, kind)
        return torch.sparse_compressed_tensor(parts[names[0]], parts[names[1]], parts["values"],
                                              _size(params), layout=layout,
                                              check_invariants=True)
    int_repr = parts["int_repr"]
    if str(int_repr.dtype).removeprefix("torch.") not in _QUANTIZED_STORAGE.values():
        raise TypeError(f"its integer representation is {int_repr.dtype}")
    if kind == "quantized_per_tensor":
        scale, zero_point = params["scale"], params["zero_point"]
        if type(scale) not in (float, int) or type(zero_point) is not int:
            raise TypeError("scale or zero_point is not a number")
        return torch._make_per_tensor_quantized_tensor(int_repr, scale, zero_point)
    axis, scales, zero_points = params["axis"], parts["scales"], parts["zero_points"]
    if type(axis) is not int or not 0 <= axis < int_repr.dim():
        raise ValueError(f"axis {axis!r} is not a dimension of a {int_repr.dim()}-d tensor")
    if scales.shape != (int_repr.shape[axis],) or zero_points.shape != scales.shape:
        raise ValueError(f"{list(scales.shape)} scales and {list(zero_points.shape)} zero points "
                         f"do not match the {int_repr.shape[axis]} channels")
    return torch._make_per_channel_quantized_tensor(int_repr, scales, zero_points, axis)


def _placeholder(kind: str, parts: dict[str, torch.Tensor], params: dict[str, Any]
                 ) -> torch.Tensor:
    """A meta tensor of the composite's layout, dtype and shape, from meta parts (which
    ``ckpts.load_state(..., tensors=False)`` hands out: no data to check or rebuild)."""
    import torch

    if kind.startswith("sparse_"):
        size, dtype = _size(params), parts["values"].dtype
        try:
            return torch.empty(size, dtype=dtype, device="meta", layout=getattr(torch, kind))
        except RuntimeError:  # block layouts need a block size; strided stands in
            return torch.empty(size, dtype=dtype, device="meta")
    int_repr = parts["int_repr"]
    storage = str(int_repr.dtype).removeprefix("torch.")
    qdtype = next((q for q, s in _QUANTIZED_STORAGE.items() if s == storage), None)
    if qdtype is None:
        raise TypeError(f"its integer representation is {int_repr.dtype}")
    return torch.empty(int_repr.shape, dtype=getattr(torch, qdtype), device="meta")


def _size(params: dict[str, Any]) -> list[int]:
    size = params["size"]
    if not isinstance(size, list) or not all(type(d) is int and d >= 0 for d in size):
        raise TypeError(f"size {str(size)[:40]} is not a list of ints")
    return size


def _part_keys(raw_parts: dict[str, Any]) -> list[str]:
    keys = []
    for part in raw_parts.values():
        inner = part.get("__tensor__") if isinstance(part, dict) else None
        keys.append(inner if isinstance(inner, str) else "<composite>")
    return keys


def _is_tensor(value: Any) -> bool:
    # Without torch imported (e.g. the CLI listing a run), nothing can be a tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _encode_key(key: Any, path: str, depth: int) -> Any:
    """A dict key as typed JSON, whose node will sit ``depth`` levels deep in the tree."""
    if type(key) in (str, int, bool) or key is None:
        return key
    if type(key) is tuple and depth <= _DEEPEST:
        return {"__tuple__": [_encode_key(k, path, depth + 2) for k in key]}
    raise UnserializableStateError(
        f"cannot save dict key {key!r} of type {type(key).__qualname__} under "
        f"{path or '<root>'!r}: dict keys must be str, int, bool, None or tuples of them "
        f"(whose typed JSON, with the state above, nests at most {MAX_TREE_DEPTH} levels)."
    )


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)

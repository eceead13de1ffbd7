"""Random training states round-trip exactly through a real save and restore; bad ones fail cleanly.

Hypothesis builds nested trees (lists, tuples, dicts with str, int, bool, None and
tuple keys, keys with dots and ``__``) of None, bools, big ints, floats (NaN, inf,
-0.0), strings and tensors. Tensors have every dtype ckpts stores, arbitrary bit
patterns (NaN payloads included), random shapes (empty and zero-dim too) and come
as transposed, strided, offset, expanded, overlapping and conjugate views, or as
sparse COO/CSR and quantized tensors. The same tensor may appear several times,
and other views of its memory beside it.

Each tree is saved by a CheckpointManager and restored, either into a fresh object
or into live tensors of the same layout (which are then filled in place). It must
come back bit for bit, with the same container types, dict key types, dtypes and
layouts, and a tensor that appeared several times comes back as one tensor.
Trees holding an unsupported value must raise a CheckpointError and write nothing.

About 60 examples each by default (a few seconds); ``CKPTS_LONG=1`` runs 2,000.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpts

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor, torch.quantize_per_channel"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled"),
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype"),
]

LONG = os.environ.get("CKPTS_LONG") == "1"
PROPERTY = settings(
    max_examples=2000 if LONG else 60,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout; failures print a blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [
    "bfloat16", "bool", "complex64", "complex128", "float16", "float32", "float64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
]
SPARSE_DTYPES = ["bool", "complex128", "float32", "float64", "int64", "int8", "uint8"]
QUANTIZED = {"qint8": (torch.int8, -128, 127), "quint8": (torch.uint8, 0, 255),
             "qint32": (torch.int32, -1000, 1000)}


@st.composite
def dense(draw: st.DrawFn, dtype_names: list[str] = DTYPES,
          max_dims: int = 3) -> torch.Tensor:
    """A contiguous tensor of arbitrary bits (0/1 for bool)."""
    dtype = getattr(torch, draw(st.sampled_from(dtype_names)))
    shape = draw(st.lists(st.integers(0, 4), max_size=max_dims))
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if dtype is torch.bool:
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=nbytes, max_size=nbytes)))
    else:
        raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) \
        if nbytes else torch.empty(shape, dtype=dtype)


@st.composite
def views(draw: st.DrawFn) -> torch.Tensor:
    """A dense tensor, or a transposed, strided, offset, expanded, overlapping or conj view."""
    base = draw(dense())
    how = draw(st.sampled_from(["plain", "transpose", "step", "offset", "expand", "overlap",
                                "conj", "conj_imag"]))
    if how == "transpose" and base.dim() >= 2:
        return base.transpose(0, 1)
    if how == "step" and base.dim() >= 1:
        return base[::2]
    if how == "offset" and base.numel() >= 2:
        return base.reshape(-1)[1:]
    if how == "expand" and base.dim() >= 1 and base.shape[0] >= 1:
        return base[:1].expand(3, *base.shape[1:])
    if how == "overlap" and base.numel() >= 3:
        flat = base.reshape(-1)
        return flat.as_strided((flat.numel() - 1, 2), (1, 1))
    if how in ("conj", "conj_imag") and base.is_complex():
        return base.conj().imag if how == "conj_imag" else base.conj()
    return base


@st.composite
def sparse(draw: st.DrawFn) -> torch.Tensor:
    base = draw(dense(SPARSE_DTYPES, max_dims=2).filter(lambda t: t.dim() == 2))
    if draw(st.booleans()):
        return base.to_sparse()
    return base.to_sparse_csr()


@st.composite
def quantized(draw: st.DrawFn) -> torch.Tensor:
    dtype, low, high = QUANTIZED[draw(st.sampled_from(sorted(QUANTIZED)))]
    shape = draw(st.lists(st.integers(0, 3), max_size=2))
    values = draw(st.lists(st.integers(low, high), min_size=math.prod(shape),
                           max_size=math.prod(shape)))
    int_repr = torch.tensor(values, dtype=dtype).reshape(shape)
    scale = draw(st.floats(1e-6, 1e3))
    return torch._make_per_tensor_quantized_tensor(int_repr, scale, draw(st.integers(low, high)))


SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6))
KEYS = st.text(alphabet="ab._#_0", max_size=4) | st.integers(-3, 3) | st.booleans() \
    | st.none() | st.tuples(st.integers(0, 2), st.text(alphabet="ab_.", max_size=2))


@st.composite
def states(draw: st.DrawFn) -> Any:
    """A nested tree over a small pool of tensors, so some appear more than once."""
    pool = draw(st.lists(views() | sparse() | quantized(), min_size=1, max_size=4))
    strided = [t for t in pool if t.layout is torch.strided and not t.is_quantized]
    pool += [t.t() if t.dim() == 2 else t[1:] for t in strided[:2] if t.dim() >= 1]
    leaf = SCALARS | st.integers(0, len(pool) - 1).map(pool.__getitem__)
    tree = draw(st.recursive(
        leaf,
        lambda children: st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(KEYS, children, max_size=3),
        max_leaves=10,
    ))
    # every pooled tensor is saved at least once, beside the tree that may repeat it
    return (pool, tree) if draw(st.booleans()) else {"tree": tree, "pool": pool}


class Box:
    """A Stateful user object that hands back whatever it is given."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.loaded: Any = None

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.loaded = state


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's values as raw bytes, conjugation and negation resolved."""
    resolved = tensor.resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
    return resolved.reshape(-1).view(torch.uint8) if resolved.numel() else resolved


def assert_same_tensor(saved: torch.Tensor, restored: torch.Tensor) -> None:
    assert type(restored) is torch.Tensor
    assert (restored.layout, restored.dtype, restored.shape, restored.is_quantized) == \
        (saved.layout, saved.dtype, saved.shape, saved.is_quantized)
    if saved.is_quantized:
        assert (restored.q_scale(), restored.q_zero_point()) == \
            (saved.q_scale(), saved.q_zero_point())
        assert torch.equal(restored.int_repr(), saved.int_repr())
    elif saved.layout is torch.sparse_coo:
        assert restored.is_coalesced() == saved.is_coalesced()
        assert torch.equal(restored._indices(), saved._indices())
        assert torch.equal(bits(restored._values()), bits(saved._values()))
    elif saved.layout is torch.sparse_csr:
        assert torch.equal(restored.crow_indices(), saved.crow_indices())
        assert torch.equal(restored.col_indices(), saved.col_indices())
        assert torch.equal(bits(restored.values()), bits(saved.values()))
    else:
        assert torch.equal(bits(restored), bits(saved))


def assert_same(saved: Any, restored: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> None:
    """Exact equality of two trees: container and key types, float bits, tensor bits."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(restored, torch.Tensor)
        assert_same_tensor(saved, restored)
        pairs.append((saved, restored))
        return
    assert type(restored) is type(saved), (saved, restored)
    if isinstance(saved, float):
        assert (math.isnan(saved) and math.isnan(restored)) or \
            (saved == restored and math.copysign(1, saved) == math.copysign(1, restored))
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(restored)
        for a, b in zip(saved, restored, strict=True):
            assert_same(a, b, pairs)
    elif isinstance(saved, dict):
        assert list(saved) == list(restored)
        assert [type(k) for k in saved] == [type(k) for k in restored]
        for key in saved:
            assert_same(saved[key], restored[key], pairs)
    else:
        assert saved == restored


def live_copy(value: Any, memo: dict[int, Any]) -> Any:
    """The same tree with each dense tensor replaced by zeros of the same layout."""
    if isinstance(value, torch.Tensor):
        if value.layout is not torch.strided or value.is_quantized:
            return value
        if id(value) not in memo:
            memo[id(value)] = torch.zeros_like(value.resolve_conj().resolve_neg())
        return memo[id(value)]
    if isinstance(value, list):
        return [live_copy(v, memo) for v in value]
    if isinstance(value, tuple):
        return tuple(live_copy(v, memo) for v in value)
    if isinstance(value, dict):
        return {k: live_copy(v, memo) for k, v in value.items()}
    return value


@pytest.mark.timeout(3600 if LONG else 300)
@PROPERTY
@given(state=states(), into_live=st.booleans())
def test_random_states_round_trip_exactly(state: Any, into_live: bool) -> None:
    with tempfile.TemporaryDirectory() as run:
        manager = ckpts.CheckpointManager(run)
        manager.save(1, ckpts.TrainState(box=Box(state)))
        box = Box(live_copy(state, {}) if into_live else None)
        assert manager.restore(ckpts.TrainState(box=box)) == 1
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    assert_same(state, box.loaded, pairs)
    # a tensor that appeared several times is restored as one tensor
    for saved_a, restored_a in pairs:
        for saved_b, restored_b in pairs:
            if saved_a is saved_b and saved_a.layout is torch.strided \
                    and not saved_a.is_quantized and saved_a.dtype is not torch.complex128:
                assert restored_a is restored_b


class Opaque:
    pass


class Subclass(torch.Tensor):
    pass


def unsupported() -> st.SearchStrategy[Any]:
    return st.sampled_from([
        lambda: {1, 2}, lambda: b"bytes", lambda: 1 + 2j, Opaque, lambda: frozenset(),
        lambda: torch.empty(2, device="meta"), lambda: torch.ones(2, dtype=torch.complex32),
        lambda: torch.ones(2).as_subclass(Subclass),
        lambda: torch.ones(2, 2).to_sparse_csc().to_dense().to_mkldnn(),
        lambda: torch.nested.nested_tensor([torch.ones(1), torch.ones(2)]),
        lambda: {object(): 1}, lambda: {(1, 2.5): 1},
    ]).map(lambda make: make())


@pytest.mark.timeout(3600 if LONG else 300)
@PROPERTY
@given(state=states(), bad=unsupported(), where=st.integers(0, 3))
def test_unsupported_values_raise_checkpoint_errors_and_write_nothing(state: Any, bad: Any,
                                                                       where: int) -> None:
    tree = [state, bad] if where == 0 else {"a": (state, {"b": bad})} if where == 1 \
        else {3: [bad]} if where == 2 else (bad,)
    with tempfile.TemporaryDirectory() as run:
        manager = ckpts.CheckpointManager(run)
        with pytest.raises(ckpts.CheckpointError):
            manager.save(1, ckpts.TrainState(box=Box(tree)))
        assert manager.checkpoints() == []
        assert not [p for p in os.listdir(run) if "step" in p]

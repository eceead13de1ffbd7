"""Every kind of tensor a training state holds is stored without pickle, or refused by name.

Each dtype safetensors stores is written natively; complex128, sparse and quantized
tensors are written as plain parts plus a typed node in the manifest; meta tensors,
subclasses and the like are refused with an error naming the object and the key, and
nothing is written. Restoring into live tensors that cannot take the data in place
(expanded, meta) either replaces them or fails naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import ckpts
from conftest import TinyNet
from v4_worker import change_index

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor, torch.quantize_per_channel"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype"),
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
]


class Box:
    """A user's Stateful object: hands back what it is given, so restore shows what came back."""

    def __init__(self, state: Any = None) -> None:
        self.state = state
        self.loaded: Any = None

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.loaded = state


def save_and_restore(tmp_path: Path, state: Any, live: Any = None) -> Box:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(box=Box(state)))
    box = Box(live)
    assert manager.restore(ckpts.TrainState(box=box)) == 1
    return box


def manifest(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "step-00000001" / "manifest.json").read_text())  # type: ignore[no-any-return]


def saved_object(tmp_path: Path, name: str = "box") -> dict[str, Any]:
    """Object ``name`` of step 1 as stored: its tree, aliases and tensor entries, read from
    the index file the manifest names for it (format v4), a file listed in the manifest."""
    listed = manifest(tmp_path)
    assert listed["objects"][name]["index"] == f"{name}.index.json"
    assert not {"tree", "aliases", "tensors"} & set(listed["objects"][name])  # the index has them
    assert f"{name}.index.json" in listed["files"]
    index = json.loads((tmp_path / "step-00000001" / f"{name}.index.json").read_text())
    return index["objects"][name]  # type: ignore[no-any-return]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same layout, dtype, shape and values (and quantization parameters)."""
    if (a.layout, a.dtype, a.shape, a.is_quantized) != (b.layout, b.dtype, b.shape, b.is_quantized):
        return False
    if a.is_quantized:
        if a.qscheme() == torch.per_tensor_affine:
            params = (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point())
        else:
            params = torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales()) \
                and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points()) \
                and a.q_per_channel_axis() == b.q_per_channel_axis()
        return params and torch.equal(a.int_repr(), b.int_repr())
    if a.layout == torch.sparse_coo:
        return a.is_coalesced() == b.is_coalesced() and torch.equal(a._indices(), b._indices()) \
            and same(a._values(), b._values())
    if a.layout != torch.strided:
        return torch.equal(a.to_dense(), b.to_dense())
    if a.is_complex():
        return torch.equal(torch.view_as_real(a.resolve_conj()),
                           torch.view_as_real(b.resolve_conj()))
    return torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                       b.view(torch.uint8) if b.element_size() == 1 else b)


def native_dtypes() -> dict[str, torch.dtype]:
    names = {
        "BF16": "bfloat16", "BOOL": "bool", "C64": "complex64", "F16": "float16",
        "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "I8": "int8", "I16": "int16", "I32": "int32",
        "I64": "int64", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    }
    return {name: getattr(torch, attr) for name, attr in names.items()}


def sample(dtype: torch.dtype) -> torch.Tensor:
    """A 2x3 tensor of ``dtype`` with distinctive values (extremes for the ints)."""
    if dtype == torch.bool:
        return torch.tensor([[True, False, True], [False, False, True]])
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(2, 3, dtype=torch.complex64) if dtype.is_complex
                else torch.tensor([[0.5, -1.25, 2.0], [-0.0, 8.0, 0.125]]).to(dtype))
    info = torch.iinfo(dtype)
    values = [info.min, info.max, 0, 1, info.max - 1, 7]
    return torch.tensor(values, dtype=dtype).reshape(2, 3)


@pytest.mark.parametrize("name", sorted(native_dtypes()))
def test_every_safetensors_dtype_is_stored_natively(tmp_path: Path, name: str) -> None:
    tensor = sample(native_dtypes()[name])
    box = save_and_restore(tmp_path, {"t": tensor, "view": tensor.t()})
    assert same(box.loaded["t"], tensor) and same(box.loaded["view"], tensor.t())
    entry = saved_object(tmp_path)["tensors"]["t"]
    assert entry["dtype"] == name
    # an ordinary safetensors entry, readable with no ckpts code
    with safe_open(tmp_path / "step-00000001" / "box.safetensors", framework="pt") as f:
        assert same(f.get_tensor("t"), tensor)


def test_conjugate_and_negative_views_are_saved_resolved(tmp_path: Path) -> None:
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    one = torch.tensor([5 + 6j], dtype=torch.complex64)
    state = {"z": z, "conj": z.conj(), "neg": one.conj().imag,
             "conj128": z.to(torch.complex128).conj()}
    box = save_and_restore(tmp_path, state)
    assert box.loaded["conj"].tolist() == [1 - 2j, 3 + 4j] and box.loaded["z"].tolist() == \
        [1 + 2j, 3 - 4j]
    assert box.loaded["neg"].tolist() == [-6.0]
    assert box.loaded["conj128"].tolist() == [1 - 2j, 3 + 4j]


def composite_samples() -> dict[str, torch.Tensor]:
    dense = torch.tensor([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 4.0], [0.0, 0.0, 5.0, 0.0]])
    uncoalesced = torch.sparse_coo_tensor(torch.tensor([[0, 0, 2], [1, 1, 3]]),
                                          torch.tensor([1.0, 2.0, 3.0]), (3, 4),
                                          check_invariants=True)
    complex_ = torch.randn(3, 4, dtype=torch.complex128)
    return {
        "complex128": complex_,
        "complex128_strided_conj": complex_.t().conj(),
        "sparse_coo": dense.to_sparse(),
        "sparse_coo_uncoalesced": uncoalesced,
        "sparse_coo_hybrid": torch.randn(3, 4, 2).to_sparse(sparse_dim=2),
        "sparse_coo_complex128": complex_.to_sparse(),
        "sparse_csr": dense.to_sparse_csr(),
        "sparse_csc": dense.to_sparse_csc(),
        "sparse_bsr": torch.randn(4, 4).to_sparse_bsr((2, 2)),
        "sparse_bsc": torch.randn(4, 4).to_sparse_bsc((2, 2)),
        "qint8": torch.quantize_per_tensor(torch.randn(5), 0.05, 3, torch.qint8),
        "quint8": torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 128, torch.quint8),
        "qint32": torch.quantize_per_tensor(torch.randn(4), 1e-3, -7, torch.qint32),
        "qint8_per_channel": torch.quantize_per_channel(
            torch.randn(3, 2), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
            torch.tensor([0, 1, -1]), 0, torch.qint8),
    }


COMPOSITE_KINDS = [
    "complex128", "complex128_strided_conj", "qint32", "qint8", "qint8_per_channel", "quint8",
    "sparse_bsc", "sparse_bsr", "sparse_coo", "sparse_coo_complex128", "sparse_coo_hybrid",
    "sparse_coo_uncoalesced", "sparse_csc", "sparse_csr",
]


@pytest.mark.parametrize("kind", COMPOSITE_KINDS)
def test_composite_kinds_come_back_with_layout_dtype_and_values(tmp_path: Path, kind: str
                                                                ) -> None:
    tensor = composite_samples()[kind]
    box = save_and_restore(tmp_path, {"w": tensor})
    assert same(box.loaded["w"], tensor)
    # the parts are plain safetensors entries, readable with no ckpts code
    saved = saved_object(tmp_path)
    node = saved["tree"]["w"]["__tensor__"]
    expected_kind = "quantized_per_channel" if kind.endswith("per_channel") else \
        "quantized_per_tensor" if kind.startswith(("qint", "quint")) else \
        "_".join(kind.split("_")[:2]) if kind.startswith("sparse") else "complex128"
    assert isinstance(node, dict) and node["kind"] == expected_kind
    with safe_open(tmp_path / "step-00000001" / "box.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(saved["tensors"])


def test_a_sparse_tensor_is_stored_as_its_indices_and_values(tmp_path: Path) -> None:
    tensor = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse()
    save_and_restore(tmp_path, {"w": tensor})
    saved = saved_object(tmp_path)
    assert saved["tree"] == {"w": {"__tensor__": {
        "kind": "sparse_coo",
        "parts": {"indices": {"__tensor__": "w.indices"}, "values": {"__tensor__": "w.values"}},
        "size": [2, 2], "coalesced": True,
    }}}
    assert saved["tensors"]["w.indices"]["dtype"] == "I64"
    with safe_open(tmp_path / "step-00000001" / "box.safetensors", framework="pt") as f:
        assert f.get_tensor("w.values").tolist() == [2.0, 3.0]
        assert f.get_tensor("w.indices").tolist() == [[0, 1], [1, 0]]


def test_a_complex128_tensor_is_stored_as_its_real_view_under_its_own_key(tmp_path: Path
                                                                          ) -> None:
    tensor = torch.tensor([1 + 2j, -3.5 + 0.25j], dtype=torch.complex128)
    save_and_restore(tmp_path, {"z": tensor})
    with safe_open(tmp_path / "step-00000001" / "box.safetensors", framework="pt") as f:
        assert f.get_tensor("z").tolist() == [[1.0, 2.0], [-3.5, 0.25]]


def test_tied_composite_tensors_are_stored_once(tmp_path: Path) -> None:
    tensor = torch.randn(3, 3).to_sparse()
    box = save_and_restore(tmp_path, {"a": tensor, "b": tensor})
    saved = saved_object(tmp_path)
    assert saved["aliases"] == {"b.indices": "a.indices", "b.values": "a.values"}
    assert same(box.loaded["b"], tensor) and same(box.loaded["a"], tensor)


def test_async_save_stages_composite_kinds(tmp_path: Path) -> None:
    state = {"q": composite_samples()["qint8"], "s": composite_samples()["sparse_csr"],
             "u": torch.tensor([2**64 - 1], dtype=torch.uint64)}
    manager = ckpts.CheckpointManager(tmp_path, async_save=True)
    manager.save(1, ckpts.TrainState(box=Box(state)))
    manager.wait()
    box = Box()
    manager.restore(ckpts.TrainState(box=box))
    manager.close()
    assert all(same(box.loaded[k], v) for k, v in state.items())


class Weird(torch.Tensor):
    pass


def refused_values() -> dict[str, tuple[Any, str]]:
    return {
        "meta": (torch.empty(3, device="meta"), "meta tensor"),
        "subclass": (torch.ones(2).as_subclass(Weird), "tensor subclass (Weird)"),
        "nested": (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested tensor"),
        "complex32": (torch.ones(2, dtype=torch.complex32), "dtype complex32"),
        "quint4x2": (torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint4x2),
                     "quantized as quint4x2"),
        "mkldnn": (torch.ones(2, 2).to_mkldnn(), "layout _mkldnn"),
        "lazy": (torch.nn.LazyLinear(2).weight, "uninitialized lazy parameter"),
    }


@pytest.mark.parametrize("kind", ["complex32", "lazy", "meta", "mkldnn", "nested", "quint4x2",
                                  "subclass"])
def test_unsupported_kinds_are_refused_by_name_and_nothing_is_written(tmp_path: Path, kind: str
                                                                      ) -> None:
    value, says = refused_values()[kind]
    manager = ckpts.CheckpointManager(tmp_path)
    with pytest.raises(ckpts.UnserializableStateError) as info:
        manager.save(1, ckpts.TrainState(model=TinyNet(), box=Box({"inner": [1, value]})))
    message = str(info.value)
    assert says in message and "'inner.1'" in message and "'box' (Box)" in message
    assert manager.checkpoints() == []
    assert not list(tmp_path.glob("*step*"))


def test_a_meta_module_is_refused_at_save_naming_the_key(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(ckpts.UnserializableStateError, match=r"'model'.*'fc1.weight'.*meta"):
        ckpts.CheckpointManager(tmp_path).save(1, ckpts.TrainState(model=model))


class Buffered(torch.nn.Module):
    def __init__(self, buffer: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", buffer)


def test_restoring_into_an_expanded_buffer_names_the_key_and_changes_nothing(tmp_path: Path
                                                                             ) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(model=Buffered(torch.randn(4, 3))))
    live = Buffered(torch.ones(3).expand(4, 3))
    with pytest.raises(ckpts.IncompatibleStateError, match=r"table: .*expanded or overlapping"):
        manager.restore(ckpts.TrainState(model=live))
    assert torch.equal(live.table, torch.ones(4, 3))


def test_restoring_into_a_meta_module_names_the_key(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(model=TinyNet()))
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(ckpts.IncompatibleStateError, match=r"fc1.weight: .*meta tensor"):
        manager.restore(ckpts.TrainState(model=model))
    with pytest.raises(ckpts.IncompatibleStateError, match=r"fc1.weight: .*meta tensor"):
        ckpts.load_weights(tmp_path / "step-00000001", model)


def test_an_expanded_tensor_of_a_user_object_is_replaced_not_filled(tmp_path: Path) -> None:
    saved = torch.arange(12.0).reshape(4, 3)
    live = torch.ones(3).expand(4, 3)
    box = save_and_restore(tmp_path, {"t": saved}, live={"t": live})
    assert torch.equal(box.loaded["t"], saved) and box.loaded["t"] is not live
    assert torch.equal(live, torch.ones(4, 3))


def test_non_contiguous_and_offset_live_tensors_are_filled_in_place(tmp_path: Path) -> None:
    saved = {"t": torch.randn(3, 4), "row": torch.randn(4), "one": torch.randn(1)}
    base = torch.zeros(4, 3)
    other = torch.zeros(10)
    live = {"t": base.t(), "row": other[2:6], "one": other[::8][1:]}
    box = save_and_restore(tmp_path, saved, live=live)
    for key in saved:
        assert box.loaded[key] is live[key] and torch.equal(live[key], saved[key]), key
    assert torch.equal(base.t(), saved["t"])


def test_conjugate_live_views_are_filled_with_the_saved_values(tmp_path: Path) -> None:
    saved = {"z": torch.tensor([1 + 2j, 3 - 4j]), "neg": torch.tensor([5.0])}
    live = {"z": torch.zeros(2, dtype=torch.complex64).conj(),
            "neg": torch.zeros(1, dtype=torch.complex64).conj().imag}
    box = save_and_restore(tmp_path, saved, live=live)
    assert box.loaded["z"] is live["z"] and live["z"].tolist() == [1 + 2j, 3 - 4j]
    assert box.loaded["neg"] is live["neg"] and live["neg"].tolist() == [5.0]


def test_overlapping_live_views_get_the_saved_values(tmp_path: Path) -> None:
    saved = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([7.0, 8.0, 9.0])}
    base = torch.zeros(4)
    box = save_and_restore(tmp_path, saved, live={"a": base[0:3], "b": base[1:4]})
    assert torch.equal(box.loaded["a"], saved["a"]) and torch.equal(box.loaded["b"], saved["b"])


def test_adjacent_views_of_one_buffer_are_filled_in_place(tmp_path: Path) -> None:
    saved = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([7.0, 8.0, 9.0]),
             "tied": torch.tensor([7.0, 8.0, 9.0])}
    flat = torch.zeros(6)
    live = {"a": flat[0:3], "b": flat[3:6], "tied": flat[3:6]}
    box = save_and_restore(tmp_path, saved, live=live)
    assert all(box.loaded[key] is live[key] for key in live)
    assert flat.tolist() == [1.0, 2.0, 3.0, 7.0, 8.0, 9.0]


def test_a_module_with_composite_tensors_restores_and_loads_weights(tmp_path: Path) -> None:
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.z = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.complex128))
            self.register_buffer("mask", torch.randn(3, 3).relu().to_sparse())
            self.register_buffer("counts", torch.tensor([1, 2**40], dtype=torch.uint64))

    torch.manual_seed(0)
    model = Mixed()
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(model=model))
    for load in ("restore", "load_weights"):
        torch.manual_seed(1)
        other = Mixed()
        if load == "restore":
            manager.restore(ckpts.TrainState(model=other))
        else:
            ckpts.load_weights(tmp_path / "step-00000001", other)
        assert all(same(a, b) for a, b in zip(other.state_dict().values(),
                                              model.state_dict().values(), strict=True)), load


def test_a_failing_state_dict_at_save_names_the_object(tmp_path: Path) -> None:
    class Broken(Box):
        def state_dict(self) -> Any:
            return undefined_name  # type: ignore[name-defined]  # noqa: F821

    manager = ckpts.CheckpointManager(tmp_path)
    with pytest.raises(ckpts.UnserializableStateError, match=r"'broken' \(.*Broken\).*NameError") \
            as info:
        manager.save(1, ckpts.TrainState(broken=Broken()))
    assert isinstance(info.value.__cause__, NameError)
    assert manager.checkpoints() == []


def test_failing_state_dict_or_load_state_dict_at_restore_name_the_object(tmp_path: Path
                                                                          ) -> None:
    class Fragile(Box):
        def __init__(self, fail_in: str) -> None:
            super().__init__({"x": 1})
            self.fail_in = fail_in

        def state_dict(self) -> Any:
            if self.fail_in == "state_dict":
                raise NameError("name 'oops' is not defined")
            return self.state

        def load_state_dict(self, state: Any) -> None:
            if self.fail_in == "load_state_dict":
                raise NameError("name 'oops' is not defined")

    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(box=Fragile("")))
    for fail_in in ("state_dict", "load_state_dict"):
        with pytest.raises(ckpts.IncompatibleStateError, match=fail_in) as info:
            manager.restore(ckpts.TrainState(box=Fragile(fail_in)))
        assert "'box'" in str(info.value) and "Fragile" in str(info.value)
        assert isinstance(info.value.__cause__, NameError)


class Wide(torch.nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(count))


def test_a_long_key_listing_says_how_many_more(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(model=Wide(1)))
    with pytest.raises(ckpts.IncompatibleStateError) as info:
        manager.restore(ckpts.TrainState(model=Wide(26)))  # 50 keys missing from the checkpoint
    lines = str(info.value).splitlines()
    assert sum(line.startswith("  missing in checkpoint:") for line in lines) == 20
    assert "  … and 30 more" in lines
    assert len(info.value.missing) == 50


def test_the_module_mismatch_advice_fits_restore_and_load_weights(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(model=Wide(1)))
    with pytest.raises(ckpts.IncompatibleStateError) as restored:
        manager.restore(ckpts.TrainState(model=Wide(2)))
    assert "pass strict=False" not in str(restored.value)
    assert "ckpts.load_weights(checkpoint, model, strict=False)" in str(restored.value)
    with pytest.raises(ckpts.IncompatibleStateError) as loaded:
        ckpts.load_weights(tmp_path / "step-00000001", Wide(2))
    assert "pass strict=False to ckpts.load_weights" in str(loaded.value)
    ckpts.load_weights(tmp_path / "step-00000001", Wide(2), strict=False)


def test_a_hugging_face_model_records_its_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(model=model, optimizer=torch.optim.SGD(model.parameters())))
    objects = manifest(tmp_path)["objects"]
    recorded = objects["model"]["hf_config"]
    assert recorded["model_type"] == "gpt2" and recorded["n_embd"] == 8
    assert transformers.GPT2Config.from_dict(recorded).to_dict() == config.to_dict()
    assert "hf_config" not in objects["optimizer"]


def test_a_config_that_is_not_json_is_refused_by_name(tmp_path: Path) -> None:
    class Config:
        def to_dict(self) -> dict[str, Any]:
            return {"eps": float("nan")}

    model = TinyNet()
    model.config = Config()  # type: ignore[assignment]
    with pytest.raises(ckpts.UnserializableStateError, match=r"'model' \(TinyNet\).*config"):
        ckpts.CheckpointManager(tmp_path).save(1, ckpts.TrainState(model=model))


def damage(node: dict[str, Any], how: str) -> None:
    inner = node["__tensor__"]
    if how == "unknown kind":
        inner["kind"] = "sparse_xyz"
    elif how == "missing part":
        del inner["parts"]["values"]
    elif how == "size too small":
        inner["size"] = [1, 1]
    elif how == "size huge":
        inner["size"] = [2**70, 4]
    elif how == "size not ints":
        inner["size"] = ["3", 4]
    elif how == "coalesced not bool":
        inner["coalesced"] = "yes"
    elif how == "part is a number":
        inner["parts"]["indices"] = 7


@pytest.mark.parametrize("how", ["coalesced not bool", "missing part", "part is a number",
                                 "size huge", "size not ints", "size too small",
                                 "unknown kind"])
def test_a_damaged_composite_node_is_a_corrupt_checkpoint(tmp_path: Path, how: str) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(box=Box({"w": torch.randn(3, 4).to_sparse()})))
    change_index(tmp_path / "step-00000001", "box.index.json",  # its hash re-recorded
                 lambda index: damage(index["objects"]["box"]["tree"]["w"], how))
    with pytest.raises(ckpts.CorruptCheckpointError):
        manager.restore(ckpts.TrainState(box=Box()), step=1)


def test_a_damaged_quantized_or_complex_part_is_a_corrupt_checkpoint(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    state = {"q": composite_samples()["qint8"], "z": torch.ones(2, dtype=torch.complex128)}
    manager.save(1, ckpts.TrainState(box=Box(state)))

    def swap_parts(index: dict[str, Any]) -> None:
        tree = index["objects"]["box"]["tree"]
        tree["q"]["__tensor__"]["parts"]["int_repr"], tree["z"]["__tensor__"]["parts"]["real"] \
            = tree["z"]["__tensor__"]["parts"]["real"], tree["q"]["__tensor__"]["parts"]["int_repr"]

    change_index(tmp_path / "step-00000001", "box.index.json", swap_parts)  # hash re-recorded
    with pytest.raises(ckpts.CorruptCheckpointError, match="cannot be rebuilt"):
        manager.restore(ckpts.TrainState(box=Box()), step=1)


@pytest.mark.parametrize("axis", [-1, 2, 1])
def test_a_per_channel_axis_that_does_not_fit_is_a_corrupt_checkpoint(tmp_path: Path, axis: int
                                                                     ) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(box=Box({"q": composite_samples()["qint8_per_channel"]})))

    def misplace_axis(index: dict[str, Any]) -> None:
        index["objects"]["box"]["tree"]["q"]["__tensor__"]["axis"] = axis  # 3 channels on axis 0

    change_index(tmp_path / "step-00000001", "box.index.json", misplace_axis)  # hash re-recorded
    with pytest.raises(ckpts.CorruptCheckpointError, match="cannot be rebuilt"):
        manager.restore(ckpts.TrainState(box=Box()), step=1)


def test_load_state_rebuilds_composites_or_gives_meta_placeholders(tmp_path: Path) -> None:
    samples = composite_samples()
    state = {kind: samples[kind] for kind in ("complex128", "sparse_coo", "sparse_csr",
                                               "qint8", "qint8_per_channel")}
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(box=Box(state)))
    loaded = ckpts.load_state(tmp_path / "step-00000001", "box")
    assert all(same(loaded[kind], tensor) for kind, tensor in state.items())
    placeholders = ckpts.load_state(tmp_path / "step-00000001", "box", tensors=False)
    for kind, tensor in state.items():
        placeholder = placeholders[kind]
        assert placeholder.is_meta and placeholder.shape == tensor.shape, kind
        assert (placeholder.layout, placeholder.dtype) == (tensor.layout, tensor.dtype), kind


def test_a_manifest_whose_hf_config_is_not_an_object_is_corrupt(tmp_path: Path) -> None:
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, ckpts.TrainState(model=TinyNet()))
    path = tmp_path / "step-00000001" / "manifest.json"
    data = json.loads(path.read_text())
    data["objects"]["model"]["hf_config"] = {"n_embd": 8}
    path.write_text(json.dumps(data))
    manager.restore(ckpts.TrainState(model=TinyNet()), step=1)  # an object is fine
    data["objects"]["model"]["hf_config"] = ["n_embd", 8]
    path.write_text(json.dumps(data))
    with pytest.raises(ckpts.CorruptCheckpointError, match="hf_config"):
        manager.restore(ckpts.TrainState(model=TinyNet()), step=1)

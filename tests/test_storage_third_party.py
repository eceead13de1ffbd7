"""A backend written from ``ckpts.storage`` alone (dict_storage.py) works with ckpts.

The conformance suite (test_storage_conformance.py) runs every promise of the port on
DictStorage; these tests check what is particular to a third party's backend: it needs
nothing but ``ckpts.storage``'s public names, the protocol's defaults serve it, and the
manager takes it as it takes the shipped backends.
"""

from __future__ import annotations

import ast
import os
import uuid
from pathlib import Path

import torch

import ckpts
import ckpts.storage
from ckpts.storage import MANIFEST, Storage, checkpoint_name, open_storage
from dict_storage import DictStorage

BACKEND = Path(__file__).with_name("dict_storage.py")


def test_the_backend_imports_only_public_names_of_ckpts_storage() -> None:
    found = []
    for node in ast.walk(ast.parse(BACKEND.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckpts"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("ckpts") for alias in node.names)
    assert [module for module, _ in found] == ["ckpts.storage"]
    assert set(found[0][1]) <= set(ckpts.storage.__all__)


def test_open_storage_takes_the_backend_as_it_is() -> None:
    storage = DictStorage(f"dict-{uuid.uuid4().hex}/run")
    assert isinstance(storage, Storage)
    assert open_storage(storage) is storage


def test_the_default_export_copies_a_file_larger_than_its_chunk(tmp_path: Path) -> None:
    storage = DictStorage(f"dict-{uuid.uuid4().hex}/run")
    data = os.urandom(64 * 2**20 + 12_345)  # the default copies 64 MiB at a time
    staged = storage.stage(checkpoint_name(1))
    storage.write(staged, [("model.safetensors", [memoryview(data)])])
    storage.commit(staged, b"{}")
    try:
        storage.export(checkpoint_name(1), ["model.safetensors", MANIFEST], tmp_path / "copy")
        assert (tmp_path / "copy" / "model.safetensors").read_bytes() == data
        assert (tmp_path / "copy" / MANIFEST).read_bytes() == b"{}"
    finally:
        storage.destroy()


def test_a_manager_saves_and_restores_through_the_backend() -> None:
    storage = DictStorage(f"dict-{uuid.uuid4().hex}/run")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    try:
        with ckpts.CheckpointManager(storage, keep=[ckpts.KeepLast(1)]) as manager:
            manager.save(1, ckpts.TrainState(model=model))
            manager.save(2, ckpts.TrainState(model=model), metrics={"loss": 0.5})
        assert [listed.name for listed in storage.committed()] == [checkpoint_name(2)]
        with torch.no_grad():
            model.weight.zero_()
        assert ckpts.CheckpointManager(storage).restore(ckpts.TrainState(model=model)) == 2
        assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())
    finally:
        storage.destroy()


def test_docs_storage_md_shows_the_backend_as_it_is() -> None:
    page = (Path(__file__).parent.parent / "docs" / "storage.md").read_text()
    shown = page.split("### A complete backend", 1)[1].split("```python\n", 1)[1]
    assert shown.split("```", 1)[0] == BACKEND.read_text()

"""Bad input gets a clear CheckpointError that names the path or key, and changes nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import ckpts
from conftest import TinyNet


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_restoring_into_a_model_with_a_missing_key_lists_it(tmp_path: Path, tiny_state) -> None:
    state, _, _ = tiny_state
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, state)

    class Bigger(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    model = Bigger()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckpts.IncompatibleStateError) as info:
        manager.restore(ckpts.TrainState(model=model,
                                         optimizer=torch.optim.AdamW(model.parameters())))
    message = str(info.value)
    assert "extra.weight" in message and "extra.bias" in message
    assert str(tmp_path) in message
    assert set(info.value.missing) >= {"extra.weight", "extra.bias"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_restoring_a_different_shape_lists_the_mismatch(tmp_path: Path, tiny_state) -> None:
    state, _, _ = tiny_state
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, state)
    model = TinyNet(width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckpts.IncompatibleStateError) as info:
        manager.restore(ckpts.TrainState(model=model,
                                         optimizer=torch.optim.AdamW(model.parameters())))
    assert "fc1.weight: checkpoint F32[8, 4], model F32[16, 4]" in str(info.value)
    assert ("fc1.weight", "F32[8, 4]", "F32[16, 4]") in info.value.mismatched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_restoring_with_other_object_names_lists_them(tmp_path: Path, tiny_state) -> None:
    state, model, _ = tiny_state
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, state)
    expected = r"missing: \[\], unexpected: \['optimizer'\]"
    with pytest.raises(ckpts.IncompatibleStateError, match=expected):
        manager.restore(ckpts.TrainState(model=model))


def test_optimizer_over_other_parameters_is_refused_before_loading(tmp_path: Path,
                                                                   tiny_state) -> None:
    state, _, _ = tiny_state
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(1, state)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(list(model.parameters())[:2])
    with pytest.raises(ckpts.IncompatibleStateError, match="parameter groups of sizes"):
        manager.restore(ckpts.TrainState(model=model, optimizer=optimizer))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class Holder:
    def __init__(self, value: object) -> None:
        self.value = value

    def state_dict(self) -> dict[str, object]:
        return {"config": {"schedule": [1, self.value]}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        raise AssertionError("not reached")


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", 3 + 4j, torch.float32])
def test_unserializable_value_is_refused_at_save_naming_its_key(tmp_path: Path,
                                                                value: object) -> None:
    manager = ckpts.CheckpointManager(tmp_path / "run")
    manager.save(1, ckpts.TrainState(model=torch.nn.Linear(1, 1)))
    before = tree_digest(tmp_path)
    with pytest.raises(ckpts.UnserializableStateError, match=r"'config\.schedule\.1'"):
        manager.save(2, ckpts.TrainState(holder=Holder(value)))
    assert tree_digest(tmp_path) == before
    assert [c.step for c in manager.checkpoints()] == [1]


def test_numpy_value_is_refused_with_a_fix(tmp_path: Path) -> None:
    import numpy as np

    with pytest.raises(ckpts.UnserializableStateError, match=r"int\(x\)"):
        ckpts.CheckpointManager(tmp_path).save(1, ckpts.TrainState(holder=Holder(np.int64(3))))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["plain_dir", "missing", "file"])
def test_a_path_that_is_not_a_checkpoint(tmp_path: Path, bad: str) -> None:
    path = tmp_path / bad
    if bad == "plain_dir":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif bad == "file":
        path.write_text("hello")
    before = tree_digest(tmp_path)
    with pytest.raises(ckpts.NotACheckpointError, match=str(path)):
        ckpts.verify(path)
    with pytest.raises(ckpts.NotACheckpointError, match=str(path)):
        ckpts.load_weights(path, TinyNet())
    assert tree_digest(tmp_path) == before


def test_restore_of_an_absent_step_names_the_available_ones(tmp_path: Path, tiny_state) -> None:
    state, _, _ = tiny_state
    manager = ckpts.CheckpointManager(tmp_path)
    manager.save(5, state)
    with pytest.raises(ckpts.NotACheckpointError, match=r"step 6.*\[5\]"):
        manager.restore(state, step=6)


def test_restore_of_an_empty_run_returns_none(tmp_path: Path, tiny_state) -> None:
    state, _, _ = tiny_state
    assert ckpts.CheckpointManager(tmp_path / "new").restore(state) is None
    assert ckpts.CheckpointManager(tmp_path / "new").latest() is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, s: m.save(-1, s), "step must be an int >= 0"),
        (lambda m, s: m.save(1.5, s), "step must be an int >= 0"),
        (lambda m, s: m.save(1, {"model": 1}), "needs a ckpts.TrainState"),
        (lambda m, s: m.save(1, s, metrics={"loss": "low"}), "metric 'loss'"),
        (lambda m, s: m.save(1, s, epoch=-2), "epoch must be"),
        (lambda m, s: m.restore(s, step=-3), "step must be"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, tiny_state, call, match: str) -> None:
    state, _, _ = tiny_state
    manager = ckpts.CheckpointManager(tmp_path)
    with pytest.raises(ckpts.InvalidArgumentError, match=match):
        call(manager, state)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: ckpts.TrainState(), "at least one object"),
        (lambda p: ckpts.TrainState(rng=torch.nn.Linear(1, 1)), "reserved"),
        (lambda p: ckpts.TrainState(model=3), "has no state_dict"),
        (lambda p: ckpts.KeepLast(0), r"n must be an int >= 1"),
        (lambda p: ckpts.CheckpointManager(p, keep=[3]), "not a retention policy"),
        (lambda p: ckpts.CheckpointManager(p, max_shard_size="lots"), "not a positive byte"),
    ],
)
def test_bad_configuration_is_refused(tmp_path: Path, make, match: str) -> None:
    with pytest.raises(ckpts.InvalidArgumentError, match=match):
        make(tmp_path)


def test_load_weights_checks_the_model(tmp_path: Path, tiny_state) -> None:
    state, _, _ = tiny_state
    checkpoint = ckpts.CheckpointManager(tmp_path).save(1, state)
    model = TinyNet(width=16)
    with pytest.raises(ckpts.IncompatibleStateError, match=r"fc1\.weight"):
        ckpts.load_weights(checkpoint, model)
    with pytest.raises(ckpts.NotACheckpointError, match="no module named 'encoder'"):
        ckpts.load_weights(checkpoint, TinyNet(), name="encoder")

"""CkptsCheckpointIO inside real Lightning fits: exact resume after SIGKILL, ModelCheckpoint's
policies on ckpts runs, Lightning's own .ckpt files, and values that cannot be stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckpts

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

from ckpts.integrations.lightning import CkptsCheckpointIO  # noqa: E402
from lightning_worker import TinyRegressor, data  # noqa: E402

pytestmark = [
    # Lightning's advice about this tiny CPU setup, and a deprecation inside Lightning itself
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches.*:UserWarning"),
]

WORKER = Path(__file__).with_name("lightning_worker.py")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_lightning.py"


def _worker(tmp_path: Path, ckpt_dir: str, log: str, *args: str
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path])}
    return subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / ckpt_dir), str(tmp_path / log),
         str(tmp_path / f"{log}.safetensors"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def _losses(path: Path) -> list[tuple[int, str]]:
    return [(int(step), loss) for step, loss in (line.split() for line in path.read_text()
                                                 .splitlines())]


def _trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    return pl.Trainer(
        accelerator="cpu", devices=1, deterministic=True, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=tmp_path, **kwargs,
    )


def test_fit_killed_mid_epoch_resumes_from_last_bit_exactly(tmp_path: Path) -> None:
    full = _worker(tmp_path, "full", "full.log")
    assert full.returncode == 0, full.stderr
    killed = _worker(tmp_path, "run", "killed.log", "--kill-at-step", "20")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # epochs of 8 steps: last.ckpt holds step 16, the kill came 4 steps into epoch 2
    assert [c.step for c in ckpts.CheckpointManager(tmp_path / "run/last.ckpt").checkpoints()] \
        == [16]
    resumed = _worker(tmp_path, "run", "resumed.log", "--resume")
    assert resumed.returncode == 0, resumed.stderr

    uninterrupted = _losses(tmp_path / "full.log")
    after_resume = _losses(tmp_path / "resumed.log")
    assert [s for s, _ in after_resume] == list(range(17, 33))
    assert after_resume == uninterrupted[16:]  # bit-exact (float.hex), dropout included
    final_full = load_file(tmp_path / "full.log.safetensors")
    final_resumed = load_file(tmp_path / "resumed.log.safetensors")
    assert final_full.keys() == final_resumed.keys()
    for key, value in final_full.items():
        assert torch.equal(value, final_resumed[key]), key
    best_full = Path((tmp_path / "full.log.safetensors.best").read_text()).name
    best_resumed = Path((tmp_path / "resumed.log.safetensors.best").read_text()).name
    assert best_full == best_resumed


def test_model_checkpoint_top_k_last_and_every_n_are_kept_as_lightning_decides(
        tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyRegressor()
    train, val = data()
    top_k = ModelCheckpoint(dirpath=tmp_path / "top", monitor="val_loss", save_top_k=2,
                            save_last=True)
    every_n = ModelCheckpoint(dirpath=tmp_path / "every", every_n_train_steps=12,
                              save_top_k=-1)
    trainer = _trainer(tmp_path, [top_k, every_n], max_epochs=5,
                       plugins=[CkptsCheckpointIO()])
    trainer.fit(model, train, val)

    on_disk = {p.name for p in (tmp_path / "top").iterdir()}
    assert on_disk == {Path(p).name for p in top_k.best_k_models} | {"last.ckpt"}
    assert len(on_disk) == 3  # 5 epochs saved, 2 removed through remove_checkpoint
    recorded = {}
    for name in on_disk - {"last.ckpt"}:
        (checkpoint,) = ckpts.CheckpointManager(tmp_path / "top" / name).checkpoints()
        recorded[str(tmp_path / "top" / name)] = checkpoint.metrics["val_loss"]
        assert recorded[str(tmp_path / "top" / name)] \
            == pytest.approx(float(top_k.best_k_models[str(tmp_path / "top" / name)]), rel=0)
    assert min(recorded, key=lambda p: recorded[p]) == top_k.best_model_path
    (last,) = ckpts.CheckpointManager(tmp_path / "top/last.ckpt").checkpoints()
    assert last.step == top_k._last_global_step_saved  # Lightning moves last with top-k saves
    assert sorted(p.name for p in (tmp_path / "every").iterdir()) \
        == ["epoch=1-step=12.ckpt", "epoch=2-step=24.ckpt", "epoch=4-step=36.ckpt"]


def test_async_saves_commit_the_same_checkpoints(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyRegressor()
    train, val = data()
    plugin = CkptsCheckpointIO(async_save=True)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True)
    trainer = _trainer(tmp_path, [every_epoch], max_epochs=3, plugins=[plugin])
    trainer.fit(model, train, val)

    assert plugin._in_flight is None  # teardown waited for the last save
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) \
        == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "epoch=2-step=24.ckpt", "last.ckpt"]
    (last,) = ckpts.CheckpointManager(tmp_path / "ckpt/last.ckpt").checkpoints()
    assert last.step == 24
    assert ckpts.verify(last.path) == []
    fresh = TinyRegressor()
    ckpts.load_weights(last, fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_load_checkpoint_round_trips_lightning_dict_and_reads_its_own_ckpt_files(
        tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyRegressor()
    train, val = data()
    trainer = _trainer(tmp_path, [], max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, train, val)
    trainer.save_checkpoint(tmp_path / "lightning.ckpt")  # Lightning's own torch.save file
    expected = torch.load(tmp_path / "lightning.ckpt", weights_only=True)
    plugin = CkptsCheckpointIO()
    plugin.save_checkpoint(expected, tmp_path / "ckpts.ckpt")

    for source in (tmp_path / "lightning.ckpt", tmp_path / "ckpts.ckpt"):
        loaded = plugin.load_checkpoint(source)
        assert loaded.keys() == expected.keys()
        assert loaded["hyper_parameters"] == dict(expected["hyper_parameters"])
        assert loaded["loops"] == expected["loops"]
        for key, value in expected["state_dict"].items():
            assert torch.equal(loaded["state_dict"][key], value), key
        state = loaded["optimizer_states"][0]["state"]
        for index, slots in expected["optimizer_states"][0]["state"].items():
            for slot, value in slots.items():
                assert torch.equal(state[index][slot], value), (index, slot)


def test_unstorable_state_value_is_named_by_key_and_nothing_is_committed(
        tmp_path: Path) -> None:
    plugin = CkptsCheckpointIO()
    checkpoint = {"state_dict": {"w": torch.zeros(2)}, "global_step": 3, "epoch": 0,
                  "hyper_parameters": {"width": 8, "activation": torch.nn.ReLU()}}
    with pytest.raises(ckpts.UnserializableStateError,
                       match=r"hyper_parameters\.activation") as raised:
        plugin.save_checkpoint(checkpoint, tmp_path / "bad.ckpt")
    assert "bad.ckpt" in str(raised.value)
    assert ckpts.CheckpointManager(tmp_path / "bad.ckpt").checkpoints() == []


def test_remove_checkpoint_takes_a_link_not_its_target(tmp_path: Path) -> None:
    plugin = CkptsCheckpointIO()
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 5},
                           tmp_path / "epoch=0-step=5.ckpt")
    (tmp_path / "last.ckpt").symlink_to("epoch=0-step=5.ckpt")
    assert plugin.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 5
    plugin.remove_checkpoint(tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()
    assert ckpts.CheckpointManager(tmp_path / "epoch=0-step=5.ckpt").latest() is not None
    plugin.remove_checkpoint(tmp_path / "epoch=0-step=5.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_lightning_example_runs_and_a_longer_second_run_resumes(tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLE), str(tmp_path / "run")]
    first = subprocess.run([*command, "2"], capture_output=True, text=True, check=True,
                           timeout=120)
    second = subprocess.run([*command, "3"], capture_output=True, text=True, check=True,
                            timeout=120)
    assert first.stdout.startswith("starting at step 0\n")
    assert second.stdout.startswith("starting at step 28\n")  # 2 epochs of 14 steps
    assert second.stdout.splitlines()[-1].startswith("best: epoch=")

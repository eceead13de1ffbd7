"""CkptsCheckpointIO inside real Lightning fits, under the Trainer of either package
(``pytorch_lightning`` and the unified ``lightning``): exact resume after SIGKILL (mid-epoch
with ckpts.ResumableLoader), ModelCheckpoint's policies on ckpts runs, ``ckpts best`` on its
folder, Lightning's own .ckpt files, and values that cannot be stored."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

import ckpts

pytest.importorskip("ckpts.integrations.lightning")  # needs one of the two packages
from ckpts.integrations.lightning import CkptsCheckpointIO
from lightning_worker import PACKAGES, data, fit, regressor_class

pytestmark = [
    # Lightning's advice about this tiny CPU setup, and a deprecation inside Lightning itself
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]

WORKER = Path(__file__).with_name("lightning_worker.py")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_lightning.py"
CKPTS = Path(sys.executable).parent / "ckpts"


@pytest.fixture(params=sorted(PACKAGES))
def package(request: pytest.FixtureRequest) -> str:
    """Each Lightning package installed: ``lightning`` (unified) and ``pytorch_lightning``."""
    pytest.importorskip(PACKAGES[request.param])
    return str(request.param)


def _pl(package: str) -> Any:
    """The module of ``package`` holding Trainer, callbacks and plugins."""
    return pytest.importorskip(PACKAGES[package])


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


def _trainer(package: str, tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    return _pl(package).Trainer(
        accelerator="cpu", devices=1, deterministic=True, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=tmp_path, **kwargs,
    )


def _assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]
                         ) -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key


# Every 5 steps last.ckpt (epochs of 8 steps: mid-epoch but at 40), at each epoch's end the
# 2 best by val_loss; the training loader wrapped in ckpts.ResumableLoader.
MID_EPOCH = ("--every-n-steps", "5", "--resumable")


def _fit_here(package: str, ckpt_dir: Path, loss_log: Path, **options: Any
              ) -> tuple[Any, Any]:
    """The worker's fit (``MID_EPOCH``), in this process, on one thread as in the worker;
    returns the module and the ModelCheckpoint keeping the 2 best."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(package, str(ckpt_dir), str(loss_log), every_n_steps=5, resumable=True,
                   **options)
    finally:
        torch.set_num_threads(threads)


class FullRun(NamedTuple):
    package: str
    folder: Path  # full/ (the ModelCheckpoint dirpath) and full.log (the losses)
    weights: dict[str, torch.Tensor]  # at the end
    best_model_path: str  # ModelCheckpoint's best by val_loss


@pytest.fixture(scope="module", params=sorted(PACKAGES))
def full_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> FullRun:
    """An uninterrupted 4-epoch fit (``MID_EPOCH``) of each package, in this process."""
    pytest.importorskip(PACKAGES[request.param])
    folder = tmp_path_factory.mktemp(f"full-{request.param}")
    model, best = _fit_here(request.param, folder / "full", folder / "full.log")
    return FullRun(str(request.param), folder, dict(model.state_dict()), best.best_model_path)


# resuming a copy of a run: only ModelCheckpoint's bookkeeping notices the new dirpath
@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
def test_fit_killed_after_a_mid_epoch_checkpoint_resumes_bit_exactly_with_resumable_loader(
        full_run: FullRun, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    package = full_run.package
    killed = _worker(tmp_path, "run", "killed.log", "--package", package, *MID_EPOCH,
                     "--kill-at-step", "22")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # last.ckpt holds step 20: 4 batches into the third epoch (steps 17 to 24)
    assert [c.step for c in ckpts.CheckpointManager(tmp_path / "run/last.ckpt").checkpoints()] \
        == [20]
    shutil.copytree(tmp_path / "run", tmp_path / "copy")

    with caplog.at_level(logging.WARNING, logger="ckpts"):  # resumed in this process
        model, best = _fit_here(package, tmp_path / "run", tmp_path / "resumed.log",
                                resume="last")
    uninterrupted = _losses(full_run.folder / "full.log")
    after_resume = _losses(tmp_path / "resumed.log")
    assert [s for s, _ in after_resume] == list(range(21, 33))
    assert after_resume == uninterrupted[20:]  # bit-exact (float.hex), dropout, shuffling
    _assert_same_weights(full_run.weights, model.state_dict())
    assert Path(best.best_model_path).name == Path(full_run.best_model_path).name
    assert "ResumableLoader" not in killed.stderr + caplog.text  # no mid-epoch warning

    # the killed run resumed from its end-of-epoch checkpoint instead
    model, _ = _fit_here(package, tmp_path / "copy", tmp_path / "end.log",
                         resume=str(tmp_path / "copy/epoch=1-step=16.ckpt"))
    assert _losses(tmp_path / "end.log") == uninterrupted[16:]
    _assert_same_weights(full_run.weights, model.state_dict())


def test_ckpts_best_ranks_the_ckpt_runs_of_a_model_checkpoint_folder(
        full_run: FullRun) -> None:
    found = subprocess.run([CKPTS, "best", str(full_run.folder / "full"), "--metric",
                            "val_loss"], capture_output=True, text=True, timeout=60)

    assert found.returncode == 0, found.stderr
    assert len(list((full_run.folder / "full").glob("epoch=*.ckpt"))) == 2  # and last.ckpt
    (best,) = ckpts.CheckpointManager(full_run.best_model_path).checkpoints()
    assert found.stdout == f"{best.path}\n"  # the step folder inside the best .ckpt
    # the printed path is what ckpt_path= and load_weights take
    loaded = CkptsCheckpointIO().load_checkpoint(found.stdout.strip())
    assert loaded["global_step"] == best.step
    module = regressor_class(full_run.package)()
    ckpts.load_weights(found.stdout.strip(), module)
    _assert_same_weights(loaded["state_dict"], module.state_dict())


def test_fit_killed_mid_epoch_resumes_from_last_end_of_epoch_checkpoint_bit_exactly(
        tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
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
    _assert_same_weights(load_file(tmp_path / "full.log.safetensors"),
                         load_file(tmp_path / "resumed.log.safetensors"))
    best_full = Path((tmp_path / "full.log.safetensors.best").read_text()).name
    best_resumed = Path((tmp_path / "resumed.log.safetensors.best").read_text()).name
    assert best_full == best_resumed


def _mid_epoch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ckpts" and "middle of an epoch" in r.getMessage()]


def test_mid_epoch_checkpoints_of_a_plain_dataloader_log_one_warning(
        package: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pl = _pl(package)
    pl.seed_everything(0, verbose=False)
    every_3 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                           save_top_k=-1)
    trainer = _trainer(package, tmp_path, [every_3], max_epochs=2,
                       plugins=[CkptsCheckpointIO()])
    with caplog.at_level(logging.WARNING, logger="ckpts"):
        trainer.fit(regressor_class(package)(), *data())

    assert len(list((tmp_path / "ckpt").iterdir())) == 5  # steps 3, 6, 9, 12, 15: mid-epoch
    (warning,) = _mid_epoch_warnings(caplog)
    assert "epoch=0-step=3.ckpt" in warning
    assert "ckpts.ResumableLoader(DataLoader(...))" in warning


def test_resumable_loader_and_end_of_epoch_checkpoints_log_no_mid_epoch_warning(
        package: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pl = _pl(package)
    pl.seed_everything(0, verbose=False)
    train, val = data()
    with caplog.at_level(logging.WARNING, logger="ckpts"):
        every_3 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "resumable",
                                               every_n_train_steps=3, save_top_k=-1)
        _trainer(package, tmp_path, [every_3], max_epochs=2, plugins=[CkptsCheckpointIO()]
                 ).fit(regressor_class(package)(), ckpts.ResumableLoader(train), val)
        # a plain loader: saves at each epoch's end, and every 8 steps (each epoch's last)
        each_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "epochs", save_top_k=-1)
        every_8 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "steps",
                                               every_n_train_steps=8, save_top_k=-1)
        trainer = _trainer(package, tmp_path, [each_epoch, every_8], max_epochs=2,
                           plugins=[CkptsCheckpointIO()])
        trainer.fit(regressor_class(package)(), train, val)
        trainer.save_checkpoint(tmp_path / "after.ckpt")

    assert len(list((tmp_path / "resumable").iterdir())) == 5
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) \
        == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt"]
    assert len(list((tmp_path / "epochs").iterdir())) == 2
    assert (tmp_path / "after.ckpt").is_dir()
    assert _mid_epoch_warnings(caplog) == []


def test_model_checkpoint_top_k_last_and_every_n_are_kept_as_lightning_decides(
        package: str, tmp_path: Path) -> None:
    pl = _pl(package)
    pl.seed_everything(0, verbose=False)
    model = regressor_class(package)()
    train, val = data()
    top_k = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "top", monitor="val_loss",
                                         save_top_k=2, save_last=True)
    every_n = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "every", every_n_train_steps=12,
                                           save_top_k=-1)
    trainer = _trainer(package, tmp_path, [top_k, every_n], max_epochs=5,
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


def test_async_saves_commit_the_same_checkpoints(package: str, tmp_path: Path) -> None:
    pl = _pl(package)
    pl.seed_everything(0, verbose=False)
    model = regressor_class(package)()
    train, val = data()
    plugin = CkptsCheckpointIO(async_save=True)
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1,
                                               save_last=True)
    trainer = _trainer(package, tmp_path, [every_epoch], max_epochs=3, plugins=[plugin])
    trainer.fit(model, train, val)

    assert plugin._in_flight is None  # teardown waited for the last save
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) \
        == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "epoch=2-step=24.ckpt", "last.ckpt"]
    (last,) = ckpts.CheckpointManager(tmp_path / "ckpt/last.ckpt").checkpoints()
    assert last.step == 24
    assert ckpts.verify(last.path) == []
    fresh = regressor_class(package)()
    ckpts.load_weights(last, fresh)
    _assert_same_weights(model.state_dict(), fresh.state_dict())


def test_lightning_async_checkpoint_io_can_wrap_the_plugin(package: str, tmp_path: Path
                                                           ) -> None:
    pl = _pl(package)
    pl.seed_everything(0, verbose=False)
    model = regressor_class(package)()
    wrapped = pl.plugins.AsyncCheckpointIO(CkptsCheckpointIO())
    top_1 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=1,
                                         monitor="val_loss", save_last=True)
    trainer = _trainer(package, tmp_path, [top_1], max_epochs=4, plugins=[wrapped])
    trainer.fit(model, *data())  # saves on Lightning's thread, removals on this one

    assert trainer.strategy.checkpoint_io is wrapped
    on_disk = {p.name for p in (tmp_path / "ckpt").iterdir()}
    # a removal can overtake a save still queued in Lightning's thread, which then leaves
    # its .ckpt behind (as it does Lightning's own files), but never a broken one
    assert {Path(top_1.best_model_path).name, "last.ckpt"} <= on_disk
    for name in on_disk:
        (checkpoint,) = ckpts.CheckpointManager(tmp_path / "ckpt" / name).checkpoints()
        assert ckpts.verify(checkpoint.path) == []
    (last,) = ckpts.CheckpointManager(tmp_path / "ckpt/last.ckpt").checkpoints()
    assert last.step == 32
    (best,) = ckpts.CheckpointManager(top_1.best_model_path).checkpoints()
    assert best.metrics["val_loss"] == pytest.approx(float(top_1.best_model_score), rel=0)


ONE_PACKAGE_AT_A_TIME = """
import importlib, sys

def only(package, absent):
    # None in sys.modules: importing these (and what is under them) fails, as if not installed
    sys.modules.update({name: None for name in list(sys.modules) + absent
                        if name.split(".")[0] in absent})
    sys.modules.pop("ckpts.integrations.lightning", None)
    plugin = importlib.import_module("ckpts.integrations.lightning").CkptsCheckpointIO()
    trainer = importlib.import_module(package).Trainer(plugins=[plugin], accelerator="cpu",
                                                       logger=False)
    assert trainer.strategy.checkpoint_io is plugin
    print(package, [base.__module__ for base in type(plugin).__mro__
                    if base.__name__ == "CheckpointIO"])

only("pytorch_lightning", ["lightning"])
for name in [name for name, module in sys.modules.items() if module is None]:
    del sys.modules[name]
only("lightning.pytorch", ["lightning_fabric", "pytorch_lightning"])
"""


def test_plugin_works_with_only_one_of_the_lightning_packages_installed(tmp_path: Path) -> None:
    for package in PACKAGES.values():
        pytest.importorskip(package)
    done = subprocess.run([sys.executable, "-c", ONE_PACKAGE_AT_A_TIME], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "pytorch_lightning ['lightning_fabric.plugins.io.checkpoint_io']",
        "lightning.pytorch ['lightning.fabric.plugins.io.checkpoint_io']",
    ]


def test_load_checkpoint_round_trips_lightning_dict_and_reads_its_own_ckpt_files(
        package: str, tmp_path: Path) -> None:
    _pl(package).seed_everything(0, verbose=False)
    model = regressor_class(package)()
    train, val = data()
    trainer = _trainer(package, tmp_path, [], max_epochs=1, enable_checkpointing=False)
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
        _assert_same_weights(expected["state_dict"], loaded["state_dict"])
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
    assert "ResumableLoader" not in first.stderr + second.stderr  # mid-epoch saves resume

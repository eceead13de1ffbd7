"""Importing real Hugging Face Trainer folders, Lightning .ckpt files and torch.save files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ckpts
from ckpts.cli import app

pytestmark = [
    # notices of Trainer and Lightning about this tiny CPU setup, not ours
    pytest.mark.filterwarnings("ignore:.*`use_cpu`.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*torch.utils._pytree.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches.*:UserWarning"),
]


class Marker:
    """An object whose unpickling would run code: creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def trainer_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Trainer output folder: tiny GPT-2, 4 steps, a save and an eval every 2."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    output = tmp_path_factory.mktemp("hf") / "out"
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1,
                                     n_head=2)
    tokens = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        logging_steps=1, use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args,
                                   train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    return output


def test_trainer_output_folder_becomes_one_run_with_a_step_per_checkpoint(
        tmp_path: Path, trainer_output: Path) -> None:
    progress: list[tuple[int, int]] = []
    imported = ckpts.import_checkpoints(trainer_output, tmp_path / "run",
                                        on_progress=lambda *p: progress.append(p))
    assert [c.step for c in imported] == [2, 4]
    assert progress == [(1, 2), (2, 2)]
    assert [c.step for c in ckpts.CheckpointManager(tmp_path / "run").checkpoints()] == [2, 4]
    for checkpoint in imported:
        source = trainer_output / f"checkpoint-{checkpoint.step}"
        history = json.loads((source / "trainer_state.json").read_text())["log_history"]
        (evaluation,) = [e for e in history if "eval_loss" in e and e["step"] == checkpoint.step]
        assert checkpoint.metrics["eval_loss"] == evaluation["eval_loss"]
        assert ckpts.verify(checkpoint.path) == []

        weights = load_file(source / "model.safetensors")
        model = ckpts.load_state(checkpoint, "model")
        assert model.keys() == weights.keys()
        for key, value in weights.items():
            assert torch.equal(model[key], value), key
        optimizer = torch.load(source / "optimizer.pt", weights_only=True)
        saved = ckpts.load_state(checkpoint, "optimizer")
        assert saved["param_groups"] == optimizer["param_groups"]
        for index, slots in optimizer["state"].items():
            for slot, value in slots.items():
                assert torch.equal(saved["state"][index][slot], value)
        scheduler = torch.load(source / "scheduler.pt", weights_only=True)
        assert ckpts.load_state(checkpoint, "scheduler") == scheduler
        assert ckpts.load_state(checkpoint, "trainer_state")["global_step"] == checkpoint.step
        assert ckpts.load_state(checkpoint, "config")["n_embd"] == 16


def test_imported_rng_state_is_the_trainers_and_restores(tmp_path: Path,
                                                         trainer_output: Path) -> None:
    source = trainer_output / "checkpoint-2"
    (checkpoint,) = ckpts.import_checkpoints(source, tmp_path / "run")
    # the reference, read the way Trainer reads it: a file this test made itself
    hf_rng = torch.load(source / "rng_state.pth", weights_only=False)
    rng = ckpts.load_state(checkpoint, "rng")
    assert torch.equal(rng["torch"], hf_rng["cpu"])
    assert rng["python"] == hf_rng["python"]
    state = ckpts.TrainState(model=_Plain(), optimizer=_Plain(), scheduler=_Plain(),
                             trainer_state=_Plain(), config=_Plain())
    ckpts.CheckpointManager(tmp_path / "run").restore(state)
    assert torch.equal(torch.get_rng_state(), hf_rng["cpu"])


class _Plain:
    def __init__(self) -> None:
        self.value: Any = None

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        self.value = state


def test_lightning_ckpt_file_imports_with_equal_weights(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from ckpts.integrations.lightning import CkptsCheckpointIO
    from lightning_worker import TinyRegressor, data

    pl.seed_everything(0, verbose=False)
    model = TinyRegressor()
    train, val = data()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train, val)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    source = torch.load(tmp_path / "model.ckpt", weights_only=True)

    (checkpoint,) = ckpts.import_checkpoints(tmp_path / "model.ckpt", tmp_path / "run")
    assert (checkpoint.step, checkpoint.epoch) == (source["global_step"], source["epoch"]) == (8, 1)
    fresh = TinyRegressor()
    ckpts.load_weights(checkpoint, fresh)
    for key, value in source["state_dict"].items():
        assert torch.equal(fresh.state_dict()[key], value), key
    loaded = CkptsCheckpointIO().load_checkpoint(tmp_path / "run")  # resumable by the plugin
    assert loaded["loops"] == source["loops"]


def test_plain_torch_save_files_import_as_model_and_named_objects(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 12,
                "best_loss": 0.5}, tmp_path / "train.pt")

    (weights,) = ckpts.import_checkpoints(tmp_path / "weights.pt", tmp_path / "a", step=3)
    assert weights.step == 3
    fresh = torch.nn.Linear(3, 2)
    ckpts.load_weights(weights, fresh)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)

    (train,) = ckpts.import_checkpoints(tmp_path / "train.pt", tmp_path / "b")
    assert train.step == 12
    assert ckpts.load_state(train, "extra") == {"step": 12, "best_loss": 0.5}
    restored = ckpts.load_state(train, "optimizer")
    assert torch.equal(restored["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_a_pickle_of_objects_is_refused_unread_naming_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": Marker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ckpts.UnserializableStateError,
                       match=r"evil\.pt.*weights_only=True.*trust the file") as raised:
        ckpts.import_checkpoints(tmp_path / "evil.pt", tmp_path / "run")
    assert isinstance(raised.value, ckpts.CheckpointError)
    assert not marker.exists()  # nothing less safe was tried
    assert not (tmp_path / "run").exists() or ckpts.CheckpointManager(
        tmp_path / "run").checkpoints() == []


def test_a_corrupt_file_late_in_a_folder_leaves_nothing_imported(
        tmp_path: Path, trainer_output: Path) -> None:
    source = tmp_path / "out"
    shutil.copytree(trainer_output, source)
    optimizer = source / "checkpoint-4/optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:200])
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"checkpoint-4/optimizer\.pt"):
        ckpts.import_checkpoints(source, tmp_path / "run")
    assert ckpts.CheckpointManager(tmp_path / "run").checkpoints() == []  # step 2 taken back
    assert [p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")] == []


def test_garbage_and_unknown_sources_are_named(tmp_path: Path) -> None:
    (tmp_path / "noise.bin").write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ckpts.CorruptCheckpointError, match=r"noise\.bin"):
        ckpts.import_checkpoints(tmp_path / "noise.bin", tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpts.NotACheckpointError, match=r"empty is neither"):
        ckpts.import_checkpoints(tmp_path / "empty", tmp_path / "run")


def test_steps_the_run_already_holds_are_refused_before_writing(
        tmp_path: Path, trainer_output: Path) -> None:
    ckpts.import_checkpoints(trainer_output / "checkpoint-4", tmp_path / "run")
    with pytest.raises(ckpts.InvalidArgumentError, match=r"new run directory"):
        ckpts.import_checkpoints(trainer_output, tmp_path / "run")
    assert [c.step for c in ckpts.CheckpointManager(tmp_path / "run").checkpoints()] == [4]


def test_cli_import_lists_what_it_imported_and_reports_refusals(
        tmp_path: Path, trainer_output: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["import", str(trainer_output), str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "imported 2 checkpoint(s)" in result.output
    assert "step-00000004" in result.output and "eval_loss=" in result.output
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    result = runner.invoke(app, ["import", str(tmp_path / "bad.pt"), str(tmp_path / "other")])
    assert result.exit_code == 2
    assert "error:" in result.output and "bad.pt" in result.output

"""Importing real Hugging Face Trainer folders, Lightning .ckpt files and torch.save files."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ckpts
from ckpts.cli import app
from test_cli import ckpts_session

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


def train_like_run_clm(output: Path, **settings: Any) -> dict[str, torch.Tensor]:
    """Leave a real Trainer output folder as transformers' run_clm.py does: a tiny GPT-2
    trained (a save and an eval every 2 steps), then ``save_model()`` and ``save_state()``
    at the top. Returns the model's final weights."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1,
                                     n_head=2)
    tokens = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(**{
        "output_dir": str(output), "per_device_train_batch_size": 4, "max_steps": 4,
        "learning_rate": 1e-3, "eval_strategy": "steps", "eval_steps": 2,
        "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "use_cpu": True,
        "report_to": "none", "disable_tqdm": True, "seed": 0, **settings})
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args,
                                   train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Trainer output folder of 4 steps (checkpoint-2, checkpoint-4, the final model at
    the top) and the trained model's final weights."""
    output = tmp_path_factory.mktemp("hf") / "out"
    return output, train_like_run_clm(output)


@pytest.fixture(scope="module")
def trainer_output(trainer_run: tuple[Path, dict[str, torch.Tensor]]) -> Path:
    return trainer_run[0]


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
        assert model.keys() == weights.keys() | {"lm_head.weight"}  # the tied copy, see below
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
    assert "step-00000004  checkpoint-4  eval_loss=" in result.output
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    result = runner.invoke(app, ["import", str(tmp_path / "bad.pt"), str(tmp_path / "other")])
    assert result.exit_code == 2
    assert "error:" in result.output and "bad.pt" in result.output


# A learning rate so high that the eval loss rises after the first evaluation: with
# save_strategy="best" only step 2 is saved, and the final model (step 4) is a step of its own.
BEST_ONLY = {"save_strategy": "best", "metric_for_best_model": "loss", "learning_rate": 1.0,
             "lr_scheduler_type": "constant"}


def test_trainer_folder_imports_each_checkpoint_and_the_final_model_only_at_a_step_of_its_own(
        tmp_path: Path, trainer_output: Path) -> None:
    best_only = tmp_path / "best-only"
    train_like_run_clm(best_only, **BEST_ONLY)
    assert sorted(p.name for p in best_only.glob("checkpoint-*")) == ["checkpoint-2"]
    unsaved = tmp_path / "unsaved"  # trainer.save_state() not called: no step known
    shutil.copytree(best_only, unsaved)
    (unsaved / "trainer_state.json").unlink()
    unsaved_copy = tmp_path / "unsaved-copy"  # no step known, the same weights as checkpoint-4
    shutil.copytree(trainer_output, unsaved_copy)
    (unsaved_copy / "trainer_state.json").unlink()

    results = ckpts_session(
        ["import", trainer_output, tmp_path / "a"], ["import", best_only, tmp_path / "b"],
        ["import", unsaved, tmp_path / "c"], ["import", unsaved, tmp_path / "d", "--step", "7"],
        ["import", unsaved_copy, tmp_path / "e"],
        ["import", trainer_output / "checkpoint-2", tmp_path / "f", "--step", "3"])
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    as_run_clm_leaves_it, own_step, unknown, given, same, single = (r.stdout for r in results)

    assert "imported 2 checkpoint(s)" in as_run_clm_leaves_it
    assert re.search(r"\n +2  step-00000002  checkpoint-2  eval_loss=", as_run_clm_leaves_it)
    assert re.search(r"skipped the model at the top of \S+/out \(trainer.save_model\(\)\): its "
                     r"step, 4 \(global_step in the trainer_state.json beside it\), is "
                     r"checkpoint-4's, imported from there", as_run_clm_leaves_it)
    assert "imported 2 checkpoint(s)" in own_step and "skipped" not in own_step
    assert re.search(r"\n +4  step-00000004  top \(final model\)  eval_loss=", own_step)
    assert "imported 1 checkpoint(s)" in unknown
    assert re.search(r"skipped the model at the top of \S+/unsaved \(trainer.save_model\(\)\): "
                     r"its step is unknown .* pass its step \(--step N", unknown)
    assert re.search(r"\n +7  step-00000007  top \(final model\)", given)
    assert re.search(r"skipped the model at the top of \S+/unsaved-copy .*: it has the same "
                     r"weight files as checkpoint-4, imported from there", same)
    assert re.search(r"\n +3  step-00000003  checkpoint-2  eval_loss=", single)  # as before
    steps = {run: [c.step for c in ckpts.CheckpointManager(tmp_path / run).checkpoints()]
             for run in "abcdef"}
    assert steps == {"a": [2, 4], "b": [2, 4], "c": [2], "d": [2, 7], "e": [2, 4], "f": [3]}
    final = ckpts.CheckpointManager(tmp_path / "b").latest()
    assert final is not None
    assert ckpts.load_state(final, "trainer_state") == json.loads(
        (best_only / "trainer_state.json").read_text())
    assert final.metrics["eval_loss"] > ckpts.CheckpointManager(tmp_path / "b").checkpoints()[
        0].metrics["eval_loss"]  # why step 4 was not saved

    checkpoints_only = tmp_path / "checkpoints-only"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(trainer_output / name, checkpoints_only / name)
    with pytest.raises(ckpts.InvalidArgumentError, match=r"step=3 sets the step of a single"):
        ckpts.import_checkpoints(checkpoints_only, tmp_path / "g", step=3)


def test_a_final_model_that_load_best_model_at_end_chose_is_not_imported_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    output = tmp_path / "out"
    final = train_like_run_clm(output, load_best_model_at_end=True, **BEST_ONLY)
    best = load_file(output / "checkpoint-2" / "model.safetensors")
    caplog.set_level(logging.INFO, logger="ckpts")

    imported = ckpts.import_checkpoints(output, tmp_path / "run")

    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 4
    if all(torch.equal(final[key], value) for key, value in best.items()):
        # transformers 5: Trainer loaded step 2's weights back before save_model()
        assert [c.step for c in imported] == [2]
        (skipped,) = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        assert "it has the same weight files as checkpoint-2, imported from there" in skipped
    else:  # transformers 4 records no best_model_checkpoint for save_strategy="best"
        assert [c.step for c in imported] == [2, 4]


def test_an_imported_trainer_checkpoint_loads_strictly_into_a_fresh_model_tied(
        tmp_path: Path, trainer_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    transformers = pytest.importorskip("transformers")
    output, trained = trainer_run
    assert "lm_head.weight" not in load_file(output / "checkpoint-4" / "model.safetensors")
    final = ckpts.import_checkpoints(output, tmp_path / "run")[-1]
    assert final.step == 4

    fresh = transformers.GPT2LMHeadModel(
        transformers.GPT2Config.from_json_file(output / "config.json"))
    ckpts.load_weights(final, fresh)  # strict

    weights = fresh.state_dict()
    assert weights.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(weights[key], value), key
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still one tensor
    shown = CliRunner().invoke(app, ["show", str(final.path), "--json"])
    assert shown.exit_code == 0, shown.output
    model = json.loads(shown.output)["objects"]["model"]
    assert model["aliases"] == {"lm_head.weight": "transformer.wte.weight"}



def test_an_imported_trainer_checkpoint_exports_to_a_hugging_face_folder(
        tmp_path: Path, trainer_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The folder's config.json is recorded with the model, so ``export --format hf``
    needs no --config, and ``report`` suggests it."""
    transformers = pytest.importorskip("transformers")
    output, trained = trainer_run
    final = ckpts.import_checkpoints(output, tmp_path / "run")[-1]
    exported = CliRunner().invoke(app, ["export", str(final.path), str(tmp_path / "hf"),
                                        "--format", "hf"])
    assert exported.exit_code == 0, exported.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for key, value in trained.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    reported = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "-o",
                                        str(tmp_path / "report.html")])
    assert reported.exit_code == 0, reported.output
    assert "--format hf" in (tmp_path / "report.html").read_text()

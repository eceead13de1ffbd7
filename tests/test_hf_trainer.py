"""CkptsCallback in real Hugging Face Trainer runs (tiny GPT-2 from a config, CPU, no network)."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import ckpts
from ckpts.integrations.transformers import CkptsCallback
from hf_worker import make_trainer, tiny_gpt2, training_args

# transformers 4.x warns while rotating the checkpoints of Trainer's own run (best-model test)
pytestmark = pytest.mark.filterwarnings("ignore:mtime may not be reliable:UserWarning")

WORKER = str(Path(__file__).with_name("hf_worker.py"))
TOTAL_STEPS = 16  # 8 steps an epoch, a save every 4


def run_worker(run: Path, loss_log: Path, *flags: str) -> None:
    subprocess.run([sys.executable, WORKER, str(run), str(loss_log), *flags], check=True,
                   capture_output=True, text=True, timeout=120)


def run_and_kill(run: Path, loss_log: Path, after_saves: int, *flags: str) -> int:
    """Start the worker, SIGKILL it once ``after_saves`` checkpoints are committed.
    Returns the newest committed step at the kill."""
    with subprocess.Popen([sys.executable, WORKER, str(run), str(loss_log), *flags],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        deadline = time.monotonic() + 120
        while len(committed_steps(run)) < after_saves:
            assert process.poll() is None, "the worker ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return max(committed_steps(run))


def committed_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run.glob("step-*/manifest.json"))


def losses(loss_log: Path) -> dict[int, str]:
    """step -> loss; a step logged again after a resume keeps its last value."""
    found = {}
    for line in loss_log.read_text().splitlines():
        step, loss = line.split()
        if step != "start":
            found[int(step)] = loss
    return found


def starts(loss_log: Path) -> list[int]:
    """The step each run of the worker started training at."""
    return [int(line.split()[1]) for line in loss_log.read_text().splitlines()
            if line.startswith("start ")]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    model = tiny_gpt2()
    latest = ckpts.CheckpointManager(run).latest()
    assert latest is not None and latest.step == TOTAL_STEPS
    ckpts.load_weights(latest, model)
    return model.state_dict()


def refuse_unpickling(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("something unpickled during a resume")


def pickle_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    root = tmp_path_factory.mktemp("reference")
    run_worker(root / "run", root / "losses.txt")
    return root / "run", losses(root / "losses.txt")


def test_sigkilled_trainer_run_resumes_to_the_same_losses_and_weights(
        tmp_path: Path, reference: tuple[Path, dict[int, str]]) -> None:
    reference_run, reference_losses = reference
    assert sorted(reference_losses) == list(range(1, TOTAL_STEPS + 1))
    run, loss_log = tmp_path / "run", tmp_path / "losses.txt"

    # killed once right after the save that ends epoch 1 (step 8), once mid-epoch
    # (step 12) with async saves, then run to the end
    first_kill = run_and_kill(run, loss_log, 2)
    second_kill = run_and_kill(run, loss_log, 3, "--async")
    run_worker(run, loss_log)

    assert (first_kill, second_kill) == (8, 12)
    assert starts(loss_log) == [0, 8, 12]
    assert losses(loss_log) == reference_losses
    expected = final_weights(reference_run)
    actual = final_weights(run)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert not pickle_files(tmp_path)
    assert not (run / ".hf-resume").exists()


def test_resume_path_skips_damaged_newest_checkpoints_and_training_replaces_them(
        tmp_path: Path, reference: tuple[Path, dict[int, str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert CkptsCallback(tmp_path / "fresh").resume_path() is None
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference[0]), str(run)], check=True)
    for step in (TOTAL_STEPS - 4, TOTAL_STEPS):
        damaged = run / f"step-{step:08d}" / "optimizer.safetensors"
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 0xFF
        damaged.write_bytes(bytes(data))

    callback = CkptsCallback(run)
    view = callback.resume_path()

    assert view is not None
    intact = TOTAL_STEPS - 8
    assert f'"global_step": {intact},' in (Path(view) / "trainer_state.json").read_text()
    assert (Path(view) / "model.safetensors").samefile(
        run / f"step-{intact:08d}" / "model.safetensors")
    # training goes on from there, unpickling nothing; its new steps replace the damaged ones
    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, refuse_unpickling)
    make_trainer(training_args(run), [callback]).train(resume_from_checkpoint=view)
    assert committed_steps(run) == [4, 8, 12, 16]
    assert ckpts.verify(run) == []


def trained(tmp_path: Path, callbacks: list[Any], trainer_options: dict[str, Any] | None = None,
            **overrides: Any) -> Any:
    """An in-process Trainer run that overfits 8 samples, so eval loss rises after the first
    evaluation (eval data follow the training pattern only half the time)."""
    settings: dict[str, Any] = {
        "num_train_epochs": 8, "learning_rate": 2e-2, "eval_steps": 2, "save_steps": 2,
        "warmup_steps": 0, "load_best_model_at_end": True, "metric_for_best_model": "loss",
        "save_total_limit": 2, "logging_steps": 2,
    }
    settings.update(overrides)
    trainer = make_trainer(training_args(tmp_path, **settings), callbacks, train_size=8,
                           eval_repeat_share=0.5, **(trainer_options or {}))
    trainer.train()
    return trainer


def test_best_model_and_save_total_limit_match_trainers_own(tmp_path: Path) -> None:
    native = trained(tmp_path / "native", [])
    callback = CkptsCallback(tmp_path / "ckpts")
    ours = trained(tmp_path / "ckpts", [callback])

    best_step = int(native.state.best_model_checkpoint.rsplit("-", 1)[1])
    # the best is not among the newest two, so only the best-protection keeps it
    assert best_step < native.state.global_step - 2
    best = callback.manager.best("eval_loss")
    assert best is not None and best.step == best_step
    assert ours.state.best_model_checkpoint == str(best.path)
    assert ours.state.best_metric == native.state.best_metric
    # save_total_limit=2: the best and the newest survive, as with Trainer's rotation
    native_steps = sorted(int(p.name.rsplit("-", 1)[1])
                          for p in (tmp_path / "native").glob("checkpoint-*"))
    assert [c.step for c in callback.manager.checkpoints()] == native_steps
    # load_best_model_at_end put the same weights in both models
    native_weights, our_weights = native.model.state_dict(), ours.model.state_dict()
    assert all(torch.equal(native_weights[k], our_weights[k]) for k in native_weights)
    assert not pickle_files(tmp_path / "ckpts")
    assert list((tmp_path / "native").glob("checkpoint-*/optimizer.pt"))  # Trainer's own way


def test_eval_metrics_and_train_log_go_on_the_checkpoint(tmp_path: Path) -> None:
    callback = CkptsCallback(tmp_path / "run")
    trainer = trained(tmp_path / "run", [callback], num_train_epochs=1, save_total_limit=None,
                      load_best_model_at_end=False, eval_strategy="epoch", logging_steps=1)
    steps = [c.step for c in callback.manager.checkpoints()]
    assert steps == [2]
    metrics = callback.manager.checkpoints()[0].metrics
    # the step's training log at save time, the epoch-end evaluation attached after it
    assert {"loss", "learning_rate", "grad_norm", "eval_loss"} <= metrics.keys()
    later = trainer.evaluate(metric_key_prefix="later")
    assert callback.manager.checkpoints()[0].metrics["later_loss"] == later["later_loss"]


def test_save_only_model_saves_weights_and_refuses_an_inexact_resume(tmp_path: Path) -> None:
    callback = CkptsCallback(tmp_path / "run")
    trained(tmp_path / "run", [callback], num_train_epochs=1, save_total_limit=None,
            load_best_model_at_end=False, save_only_model=True)
    manifest = json.loads((tmp_path / "run" / "step-00000002" / "manifest.json").read_text())
    assert sorted(manifest["objects"]) == ["model", "rng", "trainer_state"]

    resumed = CkptsCallback(tmp_path / "run")
    trainer = make_trainer(training_args(tmp_path / "run", num_train_epochs=2), [resumed],
                           train_size=8)
    with pytest.raises(ckpts.IncompatibleStateError, match="save_only_model"):
        trainer.train(resume_from_checkpoint=resumed.resume_path())


def test_a_trainer_state_value_that_cannot_be_stored_is_named(tmp_path: Path) -> None:
    callback = CkptsCallback(tmp_path / "run")
    with pytest.raises(ckpts.UnserializableStateError, match=r"log_history\.\d+\.eval_tags"):
        trained(tmp_path / "run", [callback], num_train_epochs=1,
                trainer_options={"compute_metrics": lambda prediction: {"tags": {"a", "b"}}})
    assert committed_steps(tmp_path / "run") == []


def test_save_strategy_best_is_refused_when_trainer_is_built(tmp_path: Path) -> None:
    args = training_args(tmp_path, save_strategy="best", metric_for_best_model="loss")
    with pytest.raises(ckpts.InvalidArgumentError, match="save_strategy='best'"):
        make_trainer(args, [CkptsCallback(tmp_path / "run")])


def test_a_fresh_start_over_existing_checkpoints_is_refused(
        tmp_path: Path, reference: tuple[Path, dict[int, str]]) -> None:
    trainer = make_trainer(training_args(tmp_path), [CkptsCallback(reference[0])])
    with pytest.raises(ckpts.InvalidArgumentError, match="resume_from_checkpoint"):
        trainer.train()


@pytest.mark.parametrize("resume_step", [8, 12], ids=["epoch-end", "mid-epoch"])
def test_resume_logs_the_generators_it_restored_not_trainers_missing_rng_file_note(
        tmp_path: Path, reference: tuple[Path, dict[int, str]], resume_step: int,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    for step in committed_steps(run):
        if step > resume_step:
            shutil.rmtree(run / f"step-{step:08d}")
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    caplog.set_level(logging.INFO, logger="transformers")
    caplog.set_level(logging.INFO, logger="ckpts")

    callback = CkptsCallback(run)
    trainer = make_trainer(training_args(run), [callback])
    trainer.train(resume_from_checkpoint=callback.resume_path())

    def messages(logger: str) -> str:
        return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(logger))

    assert "Running training" in messages("transformers")  # Trainer's INFO notes are caught
    assert "Didn't find an RNG file" not in messages("transformers")
    assert (f"restored the python, numpy, torch CPU random generators saved in "
            f"{run / f'step-{resume_step:08d}'}") in messages("ckpts")
    assert committed_steps(run)[-1] == TOTAL_STEPS
    # the filter went with the resume: Trainer's note passes again, and is caught
    assert not logging.getLogger("transformers.trainer").filters
    trainer._load_rng_state(str(tmp_path))
    assert "Didn't find an RNG file" in messages("transformers")

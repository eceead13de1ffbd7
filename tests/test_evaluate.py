"""Post-hoc evaluation over a run's checkpoints: weights only, recorded, resumable.

The function form is ``CheckpointManager.evaluate(fn, ...)``; the CLI form runs a real
script in a real subprocess per checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ckpts
from ckpts._run import history as _history
from ckpts.cli import app

STEPS = [10, 20, 30, 40]


def make_run(run: Path) -> dict[int, float]:
    """A run whose model's weight sum changes at each step; returns each step's sum."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    sums = {}
    with ckpts.CheckpointManager(run) as manager:
        for step in STEPS:
            model(torch.randn(4, 3)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            manager.save(step, ckpts.TrainState(model=model, optimizer=optimizer),
                         metrics={"train_loss": 1.0 / step})
            sums[step] = model.weight.sum().item()
    return sums


def weight_sum(model: torch.nn.Module) -> dict[str, float]:
    return {"weight_sum": model.weight.sum().item()}  # type: ignore[operator]


def test_evaluate_loads_each_checkpoints_weights_and_records_the_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sums = make_run(run)
    for path in run.glob("step-*/optimizer*.safetensors"):  # weights only: never read
        path.write_bytes(b"\0" * path.stat().st_size)
    manager = ckpts.CheckpointManager(run)
    results = manager.evaluate(weight_sum, metrics=["weight_sum"], model=torch.nn.Linear(3, 2))
    assert results == {step: {"weight_sum": sums[step]} for step in STEPS}
    for checkpoint in manager.checkpoints():
        assert checkpoint.metrics == {"train_loss": 1.0 / checkpoint.step,
                                      "weight_sum": sums[checkpoint.step]}


def test_evaluate_resumes_skipping_checkpoints_already_evaluated(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    manager = ckpts.CheckpointManager(run)
    visited: list[int] = []

    def flaky(checkpoint: ckpts.Checkpoint) -> dict[str, float]:
        if checkpoint.step == 30 and 30 not in visited:
            visited.append(30)
            raise RuntimeError("evaluation job preempted")
        visited.append(checkpoint.step)
        return {"score": float(checkpoint.step)}

    with pytest.raises(RuntimeError, match="preempted"):
        manager.evaluate(flaky, metrics=["score"])
    assert [c.metrics.get("score") for c in manager.checkpoints()] == [10.0, 20.0, None, None]
    seen: list[tuple[int, bool]] = []
    results = manager.evaluate(flaky, metrics=["score"],
                       progress=lambda c, m, done, total: seen.append((c.step, m is None)))
    assert sorted(results) == [30, 40]
    assert visited == [10, 20, 30, 30, 40]
    assert seen == [(10, True), (20, True), (30, False), (40, False)]
    assert manager.evaluate(flaky, metrics=["score"]) == {}


def test_evaluate_chosen_steps_and_refuses_unknown_ones_or_missing_metrics(
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    manager = ckpts.CheckpointManager(run)
    done = manager.evaluate(lambda c: {"score": 1.0}, metrics=["score"], steps=[40, 20])
    assert sorted(done) == [20, 40]
    with pytest.raises(ckpts.NotACheckpointError, match=r"steps \[25\]"):
        manager.evaluate(lambda c: {"score": 1.0}, metrics=["score"], steps=[25])
    with pytest.raises(ckpts.InvalidArgumentError, match="lacks \\['accuracy'\\]"):
        manager.evaluate(lambda c: {"score": 1.0}, metrics=["accuracy"])
    assert all("accuracy" not in c.metrics for c in manager.checkpoints())
    with pytest.raises(ckpts.InvalidArgumentError, match="metrics must name"):
        manager.evaluate(lambda c: {"score": 1.0}, metrics=[])


SCRIPT = """
import json, sys
from pathlib import Path
import ckpts
checkpoint = Path(sys.argv[1])
if checkpoint.name.endswith("30") and Path(sys.argv[0]).with_name("fail").exists():
    sys.exit("cannot evaluate " + checkpoint.name)
step = json.loads((checkpoint / "manifest.json").read_text())["step"]
print("evaluating", checkpoint)
print(json.dumps({"val_acc": step / 100}))
"""


def test_evaluate_command_runs_a_script_per_checkpoint_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    script = tmp_path / "eval.py"
    script.write_text(SCRIPT)
    (tmp_path / "fail").touch()
    runner = CliRunner()
    failed = runner.invoke(app, ["evaluate", str(run), str(script), "--metric", "val_acc"])
    assert failed.exit_code == 2
    assert "failed on step 30" in failed.output and "Traceback" not in failed.output
    (tmp_path / "fail").unlink()
    done = runner.invoke(app, ["evaluate", str(run), str(script), "--metric", "val_acc"])
    assert done.exit_code == 0, done.output
    assert "step 10: already evaluated, skipped" in done.output
    assert "step 30: val_acc 0.3" in done.output
    assert done.output.rstrip().endswith(f"evaluated 2 checkpoint(s) of {run}")
    assert [c.metrics["val_acc"] for c in ckpts.CheckpointManager(run).checkpoints()] == [
        0.1, 0.2, 0.3, 0.4]


def test_evaluate_command_refuses_a_script_that_prints_no_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    script = tmp_path / "eval.py"
    script.write_text("print('accuracy is great')\n")
    done = CliRunner().invoke(app, ["evaluate", str(run), str(script), "--metric", "val_acc"])
    assert done.exit_code == 2
    assert "its last stdout line must be a JSON object" in done.output


def test_saves_and_added_metrics_are_kept_in_the_history_after_deletion(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    with ckpts.CheckpointManager(tmp_path, keep=[ckpts.KeepLast(1)]) as manager:
        manager.save(1, ckpts.TrainState(model=model), metrics={"val_loss": 2.0})
        manager.add_metrics(1, {"val_acc": 0.5})
        manager.save(2, ckpts.TrainState(model=model), metrics={"val_loss": 1.0})
    assert [c.step for c in manager.checkpoints()] == [2]  # step 1 was deleted
    assert _history.read(tmp_path) == {1: {"val_loss": 2.0, "val_acc": 0.5},
                                       2: {"val_loss": 1.0}}

"""The `ckpts demo` command and its worker, run as real processes and killed with SIGKILL."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

import ckpts
from ckpts.cli.demo import _show_best, run_demo
from ckpts.cli.demo_training import (
    BEST_KEPT,
    EVAL_EVERY,
    SAVE_EVERY,
    STEPS,
    Saved,
    batches_per_epoch,
    parse_event,
    plan_kill,
)

MARKER = ".ckpts-demo"  # the file that lets `ckpts demo` replace a directory


def ckpts_script() -> str:
    script = Path(sys.executable).parent / "ckpts"
    found = str(script) if script.is_file() else shutil.which("ckpts")
    assert found, "the ckpts console script is not installed: pip install -e ."
    return found


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps piped output at 80 columns otherwise
    return subprocess.run([ckpts_script(), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def saved_events(output: list[str]) -> list[Saved]:
    """The checkpoints a worker reported writing, from its stdout lines."""
    return [e for e in map(parse_event, output) if isinstance(e, Saved)]


def best_and_latest(written: list[Saved]) -> set[int]:
    """What KeepBest(BEST_KEPT, "val_loss") + KeepLast(1) keep of everything ever written:
    the BEST_KEPT lowest val_loss (ties: the earlier step), and the newest."""
    ranked = sorted(written, key=lambda s: (s.val_loss, s.step))
    return {s.step for s in ranked[:BEST_KEPT]} | {max(s.step for s in written)}


def steps_on_disk(run_dir: Path) -> set[int]:
    return {c.step for c in ckpts.CheckpointManager(run_dir).checkpoints()}


def test_demo_resumes_bit_exact_keeps_the_best_and_finds_an_earlier_best_checkpoint(
    tmp_path: Path,
) -> None:
    # In-process (the workers are still real processes), so the workers' outputs,
    # every checkpoint written included, can be checked against what is on disk.
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / MARKER).write_text("")
    (run_dir / "stale.txt").write_text("left by an earlier demo")
    shown = io.StringIO()

    result = run_demo(run_dir, console=Console(file=shown, width=200))

    out = shown.getvalue()
    assert result.bit_exact, out
    assert "bit-exact: yes" in out
    assert re.search(r"train losses after the resume: (\d+)/\1 steps", out)
    assert not (run_dir / "stale.txt").exists()
    killed_after = int(re.search(r"SIGKILL after step (\d+)", out)[1])  # type: ignore[index]
    resumed_from = int(re.search(r"from the checkpoint of step (\d+)", out)[1])  # type: ignore[index]
    assert 0 < resumed_from < killed_after
    assert (resumed_from, killed_after) == (result.runs.resumed.start, plan_kill(STEPS).kill_step)
    assert f"The run resumed from step {resumed_from} after the SIGKILL." in out

    # Retention: of all the checkpoints the reference run ever wrote, exactly the 3
    # best by val_loss and the latest are left.
    written = saved_events(result.runs.reference.output)
    assert [s.step for s in written] == sorted({s.step for s in written})  # each once, in order
    assert written[-1].step == STEPS
    assert all(s.step % EVAL_EVERY == 0 for s in written[:-1])
    assert {SAVE_EVERY * i for i in range(1, STEPS // SAVE_EVERY + 1)} <= {s.step for s in written}
    kept = best_and_latest(written)
    assert len(written) > len(kept) + 1  # retention did delete some
    assert steps_on_disk(run_dir / "reference") == kept
    # The interrupted run wrote the same checkpoints, with the same metrics: its
    # killed worker up to the kill, the resumed one after (retention recomputed from
    # disk, OnImprovement comparing with what is on disk).
    interrupted = [*saved_events(result.runs.killed.output),
                   *saved_events(result.runs.resumed.output)]
    assert interrupted == written
    # Its kept set is the same: the checkpoint it restored from is protected only
    # until the resumed process commits a newer one.
    assert steps_on_disk(run_dir) == kept
    assert f"kept {len(kept)} of the {len(written)} checkpoints written" in out

    # The summary shows the run's `ckpts ls` table, as `ckpts ls` prints it.
    listed = run_cli("ls", str(run_dir), timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() in out
    step_dirs = sorted(p for p in run_dir.iterdir() if p.name.startswith("step-"))
    assert all((p / "manifest.json").is_file() for p in step_dirs)
    checkpoints = ckpts.CheckpointManager(run_dir).checkpoints()
    assert [c.path for c in checkpoints] == step_dirs
    reference = ckpts.CheckpointManager(run_dir / "reference").latest()
    assert reference is not None and reference.step == checkpoints[-1].step == STEPS

    best = min(checkpoints, key=lambda c: c.metrics["val_loss"])
    assert best.step == min(written, key=lambda s: s.val_loss).step
    reported = re.search(r"best checkpoint: step (\d+) \(val_loss ([\d.]+)\); "
                         r"last: step (\d+) \(val_loss ([\d.]+)\)", out)
    assert reported, out
    assert int(reported[1]) == best.step
    assert int(reported[3]) == checkpoints[-1].step
    assert best.metrics["val_loss"] < checkpoints[-1].metrics["val_loss"]  # overfitting
    assert float(reported[2]) < float(reported[4])
    assert re.search(rf"^ *{best.step} .* best\(val_loss\)$", listed.stdout, re.M)
    # the closing hint uses public names only
    assert f"ckpts export {best.path} demo-model.safetensors --format safetensors" in out
    assert "ckpts.cli.demo_training" not in out


def test_kill_plan_interrupts_after_an_every_save_and_before_the_next_evaluation() -> None:
    for steps in (90, STEPS, 1000):
        plan = plan_kill(steps)
        per_epoch = batches_per_epoch()
        # Every(steps=SAVE_EVERY) writes checkpoint_step whatever val_loss does, ...
        assert plan.checkpoint_step % SAVE_EVERY == 0
        assert plan.checkpoint_step >= steps // 2 and plan.checkpoint_step % per_epoch != 0
        # ... and no save can come after it before the kill (saves only at evaluations).
        assert plan.checkpoint_step < plan.kill_step < plan.checkpoint_step + EVAL_EVERY
        assert plan.kill_step < steps and plan.kill_step % per_epoch != 0


def test_worker_killed_with_sigkill_resumes_from_its_newest_checkpoint(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ckpts.cli.demo_training", str(tmp_path), "--steps", "90"]
    killed_losses: dict[int, str] = {}
    killed_output: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as worker:
        assert worker.stdout is not None
        for line in worker.stdout:
            killed_output.append(line)
            match = re.match(r"step (\d+) train_loss (\S+)$", line)
            if match:
                killed_losses[int(match[1])] = match[2]
                if int(match[1]) == 37:  # after the save of step 30, before the eval of 45
                    os.kill(worker.pid, signal.SIGKILL)
    assert worker.returncode == -signal.SIGKILL
    before = saved_events(killed_output)
    assert before and before[-1].step == 30  # Every(steps=30) saved it
    # KeepLast(1) keeps the newest, so the next worker finds it.
    assert steps_on_disk(tmp_path) == best_and_latest(before)
    assert ckpts.CheckpointManager(tmp_path).latest().step == 30  # type: ignore[union-attr]

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)

    lines = resumed.stdout.splitlines()
    assert lines[0] == "resumed from step 30"
    assert lines[1].startswith("step 31 ")
    resumed_losses = dict(re.findall(r"^step (\d+) train_loss (\S+)$", resumed.stdout, re.M))
    redone = [s for s in killed_losses if s > 30]
    assert redone
    assert all(resumed_losses[str(s)] == killed_losses[s] for s in redone)
    written = [*before, *saved_events(lines)]
    assert [s.step for s in written][-1] == 90
    # The best 3 by val_loss and the latest, as an uninterrupted run keeps: step 30,
    # restored from, was protected only until a newer checkpoint was committed.
    assert steps_on_disk(tmp_path) == best_and_latest(written)


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")

    result = run_cli("demo", str(tmp_path), timeout=60)

    assert result.returncode == 2
    assert "not made by `ckpts demo`" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / MARKER).exists()


def test_demo_refuses_too_few_steps_before_touching_the_directory(tmp_path: Path) -> None:
    (tmp_path / MARKER).write_text("")
    (tmp_path / "earlier.txt").write_text("")

    result = run_cli("demo", str(tmp_path), "--steps", "10", timeout=60)

    assert result.returncode == 2
    assert "steps=10 is too short" in result.stderr
    assert (tmp_path / "earlier.txt").exists()


def test_closing_hint_lines_are_whole_when_the_output_is_not_a_terminal() -> None:
    run = Path("/a/run/folder/whose/path/is/long/enough/to/pass/eighty/columns/demo-run")
    best = ckpts.Checkpoint(step=225, path=run / "step-00000225", metrics={"val_loss": 1.5})
    last = ckpts.Checkpoint(step=360, path=run / "step-00000360", metrics={"val_loss": 1.9})
    shown = io.StringIO()
    _show_best(Console(file=shown), best=best, last=last, sample="the cat", train_sentences=9)
    out = shown.getvalue()  # a file, not a terminal: rich's default of 80 columns
    hint = f"ckpts export {best.path} demo-model.safetensors --format safetensors"
    assert len(hint) > 80 and f"\n{hint}\n" in out
    assert f'\nbest = ckpts.CheckpointManager("{run}").best("val_loss")\n' in out

"""The `ckpts demo` command and its worker, run as real processes and killed with SIGKILL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import ckpts

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


def test_demo_resumes_bit_exact_and_finds_an_earlier_best_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / MARKER).write_text("")
    (run_dir / "stale.txt").write_text("left by an earlier demo")

    result = run_cli("demo", str(run_dir))

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "bit-exact: yes" in out
    assert re.search(r"train losses after the resume: (\d+)/\1 steps", out)
    assert not (run_dir / "stale.txt").exists()
    killed_after = int(re.search(r"SIGKILL after step (\d+)", out)[1])  # type: ignore[index]
    resumed_from = int(re.search(r"from the checkpoint of step (\d+)", out)[1])  # type: ignore[index]
    assert 0 < resumed_from < killed_after

    step_dirs = sorted(p for p in run_dir.iterdir() if p.name.startswith("step-"))
    assert step_dirs
    assert all((p / "manifest.json").is_file() for p in step_dirs)
    checkpoints = ckpts.CheckpointManager(run_dir).checkpoints()
    assert [c.path for c in checkpoints] == step_dirs
    assert resumed_from in [c.step for c in checkpoints]
    reference = ckpts.CheckpointManager(run_dir / "reference").latest()
    assert reference is not None and reference.step == checkpoints[-1].step

    best = min(checkpoints, key=lambda c: c.metrics["val_loss"])
    reported = re.search(r"best checkpoint: step (\d+) \(val_loss ([\d.]+)\); "
                         r"last: step (\d+) \(val_loss ([\d.]+)\)", out)
    assert reported, out
    assert int(reported[1]) == best.step
    assert int(reported[3]) == checkpoints[-1].step
    assert best.metrics["val_loss"] < checkpoints[-1].metrics["val_loss"]
    assert float(reported[2]) < float(reported[4])
    assert f'ckpts.load_weights("{best.path}", model)' in out


def test_worker_killed_with_sigkill_resumes_from_its_newest_checkpoint(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ckpts._demo", str(tmp_path), "--steps", "90"]
    killed_losses: dict[int, str] = {}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as worker:
        assert worker.stdout is not None
        for line in worker.stdout:
            match = re.match(r"step (\d+) train_loss (\S+)$", line)
            if match:
                killed_losses[int(match[1])] = match[2]
                if int(match[1]) == 35:  # after the save of step 30, before that of 60
                    os.kill(worker.pid, signal.SIGKILL)
    assert worker.returncode == -signal.SIGKILL
    assert [c.step for c in ckpts.CheckpointManager(tmp_path).checkpoints()] == [30]

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)

    lines = resumed.stdout.splitlines()
    assert lines[0] == "resumed from step 30"
    assert lines[1].startswith("step 31 ")
    resumed_losses = dict(re.findall(r"^step (\d+) train_loss (\S+)$", resumed.stdout, re.M))
    redone = [s for s in killed_losses if s > 30]
    assert redone
    assert all(resumed_losses[str(s)] == killed_losses[s] for s in redone)
    assert [c.step for c in ckpts.CheckpointManager(tmp_path).checkpoints()] == [30, 60, 90]


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

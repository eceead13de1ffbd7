"""Odd files in a run, as a run downloaded from elsewhere or a careless operator leaves
them: a FIFO or a folder where a file should be, the run's own lock and history files as
symbolic links out of the run, a folder named with non-ASCII digits. Every command and
reader answers fast with a clear error (or skips what is not a checkpoint), and nothing
outside the run is ever written."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpts

CKPTS = str(Path(sys.executable).parent / "ckpts")
HANG = 60  # seconds: far more than any answer takes, far less than forever


@pytest.fixture
def run(tmp_path: Path) -> Path:
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        for step in (1, 2):
            manager.save(step, ckpts.TrainState(model=torch.nn.Linear(3, 2)),
                         metrics={"loss": 1.0 / step})
    return tmp_path / "run"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTS, *map(str, args)], capture_output=True, text=True, timeout=HANG)


def listed_steps(run: Path) -> list[int]:
    """The steps ``ckpts ls RUN`` prints (it must succeed)."""
    done = cli("ls", run)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    return [int(row[0]) for row in rows if row and row[0].isdigit()]


def load_weights_in_a_process(path: Path) -> subprocess.CompletedProcess[str]:
    code = ("import sys, torch, ckpts\n"
            "try:\n"
            "    ckpts.load_weights(sys.argv[1], torch.nn.Linear(3, 2))\n"
            "except ckpts.CheckpointError as e:\n"
            "    print(type(e).__name__, e)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=HANG)


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("odd", ["fifo", "folder"])
def test_a_manifest_that_is_a_fifo_or_a_folder_gets_a_clear_error_not_a_hang(
        run: Path, odd: str) -> None:
    manifest = run / "step-00000002" / "manifest.json"
    if odd == "fifo":
        replace_with_fifo(manifest)
    else:
        manifest.unlink()
        manifest.mkdir()
    assert listed_steps(run) == [1]
    for command in ("show", "verify"):
        done = cli(command, run / "step-00000002")
        assert done.returncode != 0 and "Traceback" not in done.stderr, (command, done)
        assert "step-00000002" in done.stdout + done.stderr, (command, done)
    loaded = load_weights_in_a_process(run / "step-00000002")
    assert loaded.returncode == 0 and "Error" in loaded.stdout, loaded
    assert "Traceback" not in loaded.stderr


def test_a_tensor_file_that_is_a_fifo_is_damage_not_a_hang(run: Path) -> None:
    replace_with_fifo(run / "step-00000002" / "model.safetensors")
    problems = ckpts.verify(run / "step-00000002")
    assert problems and any("model.safetensors" in problem for problem in problems)
    loaded = load_weights_in_a_process(run / "step-00000002")
    assert loaded.stdout.startswith(("CorruptCheckpointError", "NotACheckpointError")), loaded
    model = torch.nn.Linear(3, 2)  # restore falls back to the intact step 1
    with ckpts.CheckpointManager(run) as manager:
        assert manager.restore(ckpts.TrainState(model=model)) == 1


@pytest.mark.parametrize("lock", [".ckpts.lock", ".ckpts-updates.lock"])
def test_a_lock_file_that_links_out_of_the_run_is_never_written_through(
        run: Path, tmp_path: Path, lock: str) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("precious")
    (run / lock).unlink(missing_ok=True)
    (run / lock).symlink_to(outside)
    manager = ckpts.CheckpointManager(run)
    if lock == ".ckpts.lock":
        write = functools.partial(manager.save, 3, ckpts.TrainState(model=torch.nn.Linear(3, 2)))
    else:
        write = functools.partial(manager.add_metrics, 1, {"eval": 1.0})
    with pytest.raises(ckpts.CheckpointError, match=lock.replace(".", r"\.")) as info:
        write()
    assert "symbolic link" in str(info.value) and "remove it" in str(info.value)
    assert outside.read_text() == "precious"
    assert [c.step for c in manager.checkpoints()] == [1, 2]


def test_a_history_that_links_out_of_the_run_is_never_written_through_nor_read(
        run: Path, tmp_path: Path) -> None:
    outside = tmp_path / "precious.jsonl"
    outside.write_text('{"step": 99, "metrics": {"loss": 0.0}}\n')
    (run / ".ckpts-history.jsonl").unlink()
    (run / ".ckpts-history.jsonl").symlink_to(outside)
    with ckpts.CheckpointManager(run) as manager:
        manager.save(3, ckpts.TrainState(model=torch.nn.Linear(3, 2)), metrics={"loss": 0.1})
        manager.add_metrics(1, {"eval": 1.0})
        assert manager.checkpoints()[0].metrics == {"loss": 1.0, "eval": 1.0}
    assert outside.read_text() == '{"step": 99, "metrics": {"loss": 0.0}}\n'
    curves = cli("history", run) if "history" in cli("--help").stdout else None
    if curves is not None:
        assert "99" not in curves.stdout


def test_a_folder_named_with_non_ascii_digits_is_not_a_checkpoint(run: Path) -> None:
    (run / "step-00000001").rename(run / "step-\u0661")  # ARABIC-INDIC DIGIT ONE
    assert [c.step for c in ckpts.CheckpointManager(run).checkpoints()] == [2]
    assert listed_steps(run) == [2]

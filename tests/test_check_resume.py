"""``ckpts check-resume``: real training commands, run whole and SIGKILLed then resumed.

The two loops are nanoGPT-shaped (``resume_loop_pitfall.py``, ``resume_loop_fixed.py``);
each run of them takes about 2 s, mostly importing torch. The commands that never
save or crash are torch-free and take milliseconds. ``CKPTS_LONG=1`` adds a check of
a command that saves fewer checkpoints than the kill point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckpts
from ckpts.testing._resume_check import ResumeCheckError

TESTS = Path(__file__).parent
CKPTS = str(Path(sys.executable).parent / "ckpts")
PITFALL = str(TESTS / "resume_loop_pitfall.py")
FIXED = str(TESTS / "resume_loop_fixed.py")
NEVER_SAVES = str(TESTS / "resume_loop_never_saves.py")
CRASHES = str(TESTS / "resume_loop_crashes.py")
LONG = os.environ.get("CKPTS_LONG") == "1"


def check_resume_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTS, "check-resume", *args], capture_output=True, text=True,
                          timeout=240)


def test_the_prefetch_pitfall_is_reported_with_the_rng_and_the_repeated_save(
    tmp_path: Path,
) -> None:
    result = check_resume_cli("--workdir", str(tmp_path / "work"), "--",
                              sys.executable, PITFALL, "{run}")

    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("not exact: at step 24, the run killed after step ")
    assert lines[0].endswith("differs from the uninterrupted run in model, optimizer, rng")
    assert any(line.split()[0] == "model/head.weight" for line in lines[2:])
    assert any(line.split()[0] == "rng/torch" for line in lines[2:])
    # the batch drawn before save() is lost: the first checkpoint after the resume
    # (the repeated save of the restored step) differs in the RNG alone
    assert "likely cause: RNG: at step " in result.stdout
    assert "the random generators differ while the weights are equal" \
        in result.stdout
    assert "a prefetch" in result.stdout
    assert "saved step(s)" in result.stdout and "again" in result.stdout
    assert "ckpts diff " in lines[-1]
    assert result.stderr == ""


def test_the_fixed_loop_resumes_bit_exact(tmp_path: Path) -> None:
    result = check_resume_cli("--workdir", str(tmp_path / "work"), "--",
                              sys.executable, FIXED, "{run}")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("bit-exact: at step 24, the run killed after step ")
    work = tmp_path / "work"
    killed_after = int(result.stdout.split("killed after step ")[1].split()[0])
    assert 12 <= killed_after < 24  # it was killed mid-run, then resumed to the end
    assert (work / "b-at-kill" / "manifest.json").is_file()
    assert (work / "b" / "step-00000024" / "manifest.json").is_file()
    # numpy and python random are never seeded nor used by the loop: ignored, and said so
    assert "note: ignored rng.python.1, rng/numpy.keys" in result.stdout


def test_a_command_that_never_saves_gets_exit_2_and_the_fix(tmp_path: Path) -> None:
    result = check_resume_cli("--", sys.executable, NEVER_SAVES, "{run}")

    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: the command ran to completion without committing a checkpoint in {run}")
    assert "pass {run} as the directory of its ckpts.CheckpointManager" in result.stderr
    assert "  training without checkpoints" in result.stderr  # its log's last lines
    assert "Traceback" not in result.stderr.split("its output ends with")[0]


def test_a_crashing_command_gets_exit_2_with_the_end_of_its_output(tmp_path: Path) -> None:
    result = check_resume_cli("--", sys.executable, CRASHES, "{run}")

    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: the uninterrupted run (A) failed with exit status 1; its output ends with (")
    assert "RuntimeError: the data file train.bin is missing" in result.stderr
    assert result.stdout == ""


def test_a_command_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path) -> None:
    work = tmp_path / "work"
    shell = f"{sys.executable} {NEVER_SAVES} {{run}} 60; echo never"

    with pytest.raises(ResumeCheckError, match=r"did not finish within 0.5 s") as caught:
        ckpts.testing.check_resume(["sh", "-c", shell], timeout=0.5, workdir=work)

    assert "training without checkpoints" in str(caught.value)
    pid = int((work / "run" / "pid").read_text())  # python, a child of the shell
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "zombie" in status.read_text()


def test_a_command_without_the_run_placeholder_is_refused() -> None:
    with pytest.raises(ckpts.InvalidArgumentError, match=r"has no \{run\}"):
        ckpts.testing.check_resume([sys.executable, FIXED, "runs/x"])
    with pytest.raises(ckpts.InvalidArgumentError, match="kill_after_saves must be"):
        ckpts.testing.check_resume([sys.executable, FIXED, "{run}"], kill_after_saves=0)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="set CKPTS_LONG=1: two more runs of a loop (~5 s)")
def test_a_command_with_fewer_saves_than_the_kill_point_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ResumeCheckError, match=r"finished after committing only 4 checkpoint"):
        ckpts.testing.check_resume([sys.executable, FIXED, "{run}"], kill_after_saves=5,
                           workdir=tmp_path / "work")

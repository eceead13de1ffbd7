"""The examples run as written (and a second run resumes instead of starting over)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_train_resume_example_runs_and_resumes(tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLES / "train_resume.py"), str(tmp_path / "run")]
    first = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    second = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    assert first.stdout.startswith("starting at step 0")
    assert second.stdout.startswith("starting at step 300")
    assert "best: step" in first.stdout
    assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1]


def test_hf_trainer_example_runs_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    command = [sys.executable, str(EXAMPLES / "train_hf.py"), str(tmp_path / "run")]
    first = subprocess.run(command, capture_output=True, text=True, check=True, timeout=180)
    second = subprocess.run(command, capture_output=True, text=True, check=True, timeout=180)
    assert "starting at step 0" in first.stdout
    assert "starting at step 24" in second.stdout
    assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1]
    assert first.stdout.splitlines()[-1].startswith("best: step")

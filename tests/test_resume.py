"""Bit-exact resume: SIGKILL mid-epoch, resume in a fresh process, end identical."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

import ckpts
from resume_worker import TinyTransformer

WORKER = str(Path(__file__).with_name("resume_worker.py"))
TOTAL = 40  # 12 batches an epoch: the run spans four epochs


def losses(lines: list[str]) -> dict[int, str]:
    return {int(w[1]): w[2] for w in (line.split() for line in lines) if w[0] == "loss"}


def run_to_end(run: Path) -> list[str]:
    done = subprocess.run([sys.executable, WORKER, str(run), str(TOTAL)], capture_output=True,
                          text=True, check=True, timeout=240)
    return done.stdout.splitlines()


def run_and_kill(run: Path, kill_after: int) -> list[str]:
    lines = []
    with subprocess.Popen([sys.executable, WORKER, str(run), str(TOTAL), str(kill_after)],
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.strip())
            if line.startswith(f"loss {kill_after + 1} "):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return lines


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    model = TinyTransformer()
    latest = ckpts.CheckpointManager(run).latest()
    assert latest is not None and latest.step == TOTAL
    ckpts.load_weights(latest, model)
    return model.state_dict()


def test_killed_and_resumed_run_matches_the_uninterrupted_one(tmp_path: Path) -> None:
    reference = run_to_end(tmp_path / "reference")
    kill_after = random.Random(7).randrange(14, 22)  # mid-epoch 2, between saves
    killed = run_and_kill(tmp_path / "run", kill_after)
    assert max(losses(killed)) < TOTAL

    resumed = run_to_end(tmp_path / "run")
    resumed_from = int(resumed[0].split()[1])
    assert resumed[0].startswith("resumed") and 0 < resumed_from <= kill_after + 1
    assert resumed_from % 12 != 0, "the resume should land mid-epoch"
    assert min(losses(resumed)) == resumed_from + 1
    expected = {s: v for s, v in losses(reference).items() if s > resumed_from}
    assert losses(resumed) == expected

    want, got = final_weights(tmp_path / "reference"), final_weights(tmp_path / "run")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key

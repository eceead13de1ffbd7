"""benchmarks/gpu.py: skips without CUDA, and its whole table runs on the CPU (dry run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_without_cuda_it_prints_a_skip_message_and_exits_0() -> None:
    done = run_bench(env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "no CUDA device:" in done.stdout
    assert "run on a GPU machine" in done.stdout
    assert "| operation |" not in done.stdout


def test_cpu_dry_run_measures_every_row_of_the_table(tmp_path: Path) -> None:
    done = run_bench("--cpu-dry-run", "--out", str(tmp_path / "out"),
                     "--dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    operations = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert operations == (
        ["async save, training thread blocked"] * 2 + ["sync save"] * 3
        + ["restore into live model + optimizer"] * 2
        + ["40 training steps, save every 10: overhead per save"] * 3
        + ["first async save (pinned allocation) against later ones"])
    for row in rows:  # every row measured on both sides, with a ratio
        assert "failed" not in row and "not measured" not in row, row
        assert row.split(" | ")[4].endswith("x"), row
    assert "CPU (dry run)" in done.stdout
    assert "Peak extra host memory, ckpts save:" in done.stdout
    assert "Peak extra host memory, ckpts restore:" in done.stdout
    written = sorted(p.suffix for p in (tmp_path / "out").iterdir())
    assert written == [".json", ".md"]
    assert list(tmp_path.glob("ckpts-gpu-bench-*")) == []  # its scratch is removed

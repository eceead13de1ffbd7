"""A rank of a 2-rank job (gloo on CPU) that dies between saves: the survivor's next
``save()`` and ``restore()`` raise a CheckpointError naming the run, the step and the
lost rank, within the collective timeout, and commit nothing.

This file is also the job's worker: ``python test_rank_failures.py RUN OUT`` with
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set runs one rank. Rank 1
saves step 1 with rank 0, then kills itself with SIGKILL; rank 0 then tries to save
step 2, to restore with the same manager, and to restore with a new one (whose first
collective creates ckpts' process group), and writes how each attempt ended to
``OUT/rank0.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import ckpts

TIMEOUT = 5.0  # CheckpointManager(collective_timeout=...), seconds


def attempt(action: Callable[[], object]) -> dict[str, Any]:
    """How ``action()`` ended: the exception's class, message and cause, and the time."""
    began = time.monotonic()
    try:
        action()
        outcome: dict[str, Any] = {"error": None}
    except Exception as e:
        outcome = {"error": type(e).__name__, "message": str(e),
                   "cause": type(e.__cause__).__name__ if e.__cause__ else None}
    return {**outcome, "seconds": time.monotonic() - began}


def worker(run: Path, out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2 * TIMEOUT))
    torch.manual_seed(0)
    state = ckpts.TrainState(model=torch.nn.Linear(4, 2))
    manager = ckpts.CheckpointManager(run, collective_timeout=TIMEOUT)
    manager.save(1, state)
    if rank == 1:
        (out / "rank1-dying").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    while not (out / "rank1-dying").exists():
        time.sleep(0.05)
    time.sleep(0.5)  # rank 1 is gone before rank 0's next collective
    report = {"save": attempt(lambda: manager.save(2, state)),
              "restore": attempt(lambda: manager.restore(state)),
              "restore_new_manager": attempt(lambda: ckpts.CheckpointManager(
                  run, collective_timeout=TIMEOUT).restore(state))}
    (out / "rank0.json").write_text(json.dumps(report))
    os._exit(0)  # the other rank is gone: no close(), no destroy_process_group()


def run_job(run: Path, out: Path) -> list[subprocess.CompletedProcess[str]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, __file__, str(run), str(out)],
        env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    ended = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=180)
            ended.append(subprocess.CompletedProcess(process.args, process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return ended


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The run, and how rank 0's attempts ended after rank 1 died (the module doc)."""
    base = tmp_path_factory.mktemp("rank-dies")
    run, out = base / "run", base / "out"
    out.mkdir()
    rank0, rank1 = run_job(run, out)
    assert (rank0.returncode, rank1.returncode) == (0, -signal.SIGKILL), rank0.stdout
    return run, json.loads((out / "rank0.json").read_text())


def test_rank_dying_between_saves_makes_save_and_restore_raise_a_write_error(
        job: tuple[Path, dict[str, Any]]) -> None:
    run, report = job
    for what, ended in report.items():
        assert ended["error"] == "WriteError", (what, ended)  # not gloo's bare RuntimeError
        assert ended["cause"] in ("RuntimeError", "DistBackendError", "DistStoreError"), ended
        gone = "another rank of the 2-rank job saving and restoring it is gone"
        assert gone in ended["message"], (what, ended)
        assert f"collective_timeout={TIMEOUT:g}s" in ended["message"], (what, ended)
        assert ended["seconds"] < TIMEOUT + 3, (what, ended)
    assert report["save"]["seconds"] < TIMEOUT / 2  # a closed connection: seen at once
    assert [c.step for c in ckpts.CheckpointManager(run).checkpoints()] == [1]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".ckpts")) == [
        "step-00000001"]


def test_the_error_of_a_lost_rank_names_the_run(job: tuple[Path, dict[str, Any]]) -> None:
    run, report = job
    for what in ("save", "restore", "restore_new_manager"):
        assert report[what]["message"].startswith(f"{run}: another rank of the 2-rank job"), \
            report


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))

"""Saves and restores from every rank of real torch.distributed jobs (gloo on CPU).

Each job is one process per rank running tests/dist_worker.py; starting torch costs
seconds per process on a 2-core machine, so a few module-scoped jobs do several things
each and the tests check what they recorded (full tensors as safetensors, JSON reports):

- ``sharded_runs``: a 1-rank job saves run w1; a 2-rank job restores w1 (1->2), saves
  w2 and restores it (2->2); a 4-rank job restores w2 (2->4) and a copy of w2 with one
  byte flipped in rank 1's shard file, saves w4 and restores it (4->4).
- ``two_rank_job``: restores w4 (4->2); async saves; save triggers; saves to and
  restores from the moto S3 server; then saves in which rank 1's write raises, rank 0's
  commit raises, and rank 1 dies (last: the job ends there).
- ``one_rank_job``: restores w4 (4->1) and w2 (2->1) in a 1-rank job.

The test process itself (no torch.distributed) restores w4 and the S3 run (4->1 and
2->1), and runs ``load_weights`` and ``ckpts verify`` on sharded checkpoints.
``CKPTS_LONG=1`` adds a 2-rank job whose rank 1 stalls mid-save past the collective
timeout (the test waits the timeout out).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ckpts
from ckpts.cli import app
from dist_worker import Progress, plain_model

WORKER = Path(__file__).with_name("dist_worker.py")
COLLECTIVE_TIMEOUT = 15.0  # seconds, for the job whose rank fails or dies
LONG = os.environ.get("CKPTS_LONG") == "1"
JOB_TIMEOUT = 240.0  # a job that runs longer hangs: the test fails instead of CI


@dataclass
class Rank:
    """How one rank's process ended."""

    returncode: int
    output: str


def launch(world: int, scenarios: dict[str, dict[str, Any]], log: Path) -> list[Rank]:
    """Run the worker's ``scenarios`` (in order) on ``world`` ranks; every rank's ending.
    Each rank's output is also kept in ``log.rankN.txt``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, str(WORKER), ",".join(scenarios), json.dumps(scenarios)],
        env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    deadline = time.monotonic() + JOB_TIMEOUT
    ranks = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            ranks.append(Rank(process.returncode, output))
            log.with_name(f"{log.name}.rank{len(ranks) - 1}.txt").write_text(output)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return ranks


def check_ranks(ranks: list[Rank], *, returncodes: list[int] | None = None) -> None:
    wanted = returncodes or [0] * len(ranks)
    assert [rank.returncode for rank in ranks] == wanted, \
        "\n".join(f"--- rank {n}:\n{rank.output[-4000:]}" for n, rank in enumerate(ranks))


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs saved by FSDP2 on 1, 2 and 4 ranks, and what each job restored (module doc)."""
    base = tmp_path_factory.mktemp("sharded")
    out = base / "out"
    out.mkdir()
    check_ranks(launch(1, {"reshard": {"out": str(out), "save": [str(base / "w1"), 2]}},
                       out / "log-w1"))
    check_ranks(launch(2, {"reshard": {"out": str(out), "restore": [["w1-w2", str(base / "w1")]],
                                       "save": [str(base / "w2"), 2]}}, out / "log-w2"))
    shutil.copytree(base / "w2", base / "w2-corrupt")
    flip_a_byte(base / "w2-corrupt" / "step-00000002" / "model-rank00001.safetensors")
    check_ranks(launch(4, {"reshard": {
        "out": str(out), "save": [str(base / "w4"), 2],
        "restore": [["w2-w4", str(base / "w2")], ["w2-w4-corrupt", str(base / "w2-corrupt")]]}},
        out / "log-w4"))
    return base


@pytest.fixture(scope="module")
def one_rank_job(sharded_runs: Path) -> Path:
    """A 1-rank job's restores of the runs saved on 4 and 2 ranks."""
    out = sharded_runs / "out"
    check_ranks(launch(1, {"reshard": {"out": str(out), "restore": [
        ["w4-w1", str(sharded_runs / "w4")], ["w2-w1", str(sharded_runs / "w2")]]}},
        out / "log-w1-restores"))
    return out


@dataclass
class TwoRankJob:
    out: Path
    runs: Path
    ranks: list[Rank]
    s3_url: str
    s3_options: dict[str, Any]


@pytest.fixture(scope="module")
def two_rank_job(sharded_runs: Path, s3_server: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> TwoRankJob:
    """The 2-rank job of the module docstring; its last scenario ends with rank 1 dead."""
    import fsspec

    runs = tmp_path_factory.mktemp("two-ranks")
    out = sharded_runs / "out"
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    fsspec.filesystem("s3", **options, skip_instance_cache=True).call_s3(
        "create_bucket", Bucket=bucket)
    url = f"s3://{bucket}/run"
    ranks = launch(2, {
        "reshard": {"out": str(out), "restore": [["w4-w2", str(sharded_runs / "w4")]]},
        "async": {"out": str(out), "run": str(runs / "async")},
        "triggers": {"out": str(out), "run": str(runs / "triggers")},
        "s3": {"out": str(out), "url": url, "storage_options": options},
        "failures": {"out": str(out), "run": str(runs / "failures"),
                     "timeout": COLLECTIVE_TIMEOUT},
    }, out / "log-two-ranks")
    return TwoRankJob(out, runs, ranks, url, options)


def flip_a_byte(file: Path) -> None:
    """Flip the last byte of a file (tensor data, past the safetensors header)."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                        what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{what}: {key}"


def assert_restored(out: Path, label: str, world: int, expected: str, step: int) -> None:
    """Every rank of ``label`` restored ``step`` and holds the full state in ``expected``."""
    want = load_file(out / f"{expected}.rank0.safetensors")
    progress = json.loads((out / f"{expected}.rank0.json").read_text())
    assert len(want) == 20  # 5 parameters, and AdamW's step, exp_avg and exp_avg_sq of each
    for rank in range(world):
        report = json.loads((out / f"{label}.rank{rank}.json").read_text())
        assert report["restored"] == step, (label, rank)
        assert report["progress"] == progress, (label, rank)
        assert_same_tensors(load_file(out / f"{label}.rank{rank}.safetensors"), want,
                            f"{label} rank {rank}")
        if "listed" in report:
            assert report["listed"] == {"epoch": progress["epoch"],
                                        "metrics": {"loss": pytest.approx(progress["losses"][-1],
                                                                          abs=1e-6)}}


def plain_state() -> tuple[ckpts.TrainState, torch.nn.Module, torch.optim.Optimizer, Progress]:
    """The worker's network in this process, unsharded, with its AdamW and progress."""
    torch.manual_seed(99)
    model = plain_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    progress = Progress()
    return (ckpts.TrainState(model=model, optimizer=optimizer, progress=progress),
            model, optimizer, progress)


def plain_full_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                       ) -> dict[str, torch.Tensor]:
    found = {f"model/{key}": value for key, value in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            found[f"optimizer/{index}/{key}"] = torch.as_tensor(value)
    return found


@pytest.mark.parametrize(("label", "world", "saved_by"), [
    ("w1-w2", 2, "w1"), ("w2-w2", 2, "w2"), ("w2-w4", 4, "w2"), ("w4-w4", 4, "w4")])
def test_fsdp_restore_equals_saved_state_across_world_sizes(
        sharded_runs: Path, label: str, world: int, saved_by: str) -> None:
    assert_restored(sharded_runs / "out", label, world, f"expected-{saved_by}-2", 2)


def test_fsdp_restore_from_four_ranks_on_two(two_rank_job: TwoRankJob) -> None:
    assert_restored(two_rank_job.out, "w4-w2", 2, "expected-w4-2", 2)


@pytest.mark.parametrize(("label", "saved_by"), [("w4-w1", "w4"), ("w2-w1", "w2")])
def test_fsdp_restore_on_a_one_rank_job(one_rank_job: Path, label: str, saved_by: str) -> None:
    assert_restored(one_rank_job, label, 1, f"expected-{saved_by}-2", 2)


def test_plain_process_restores_a_checkpoint_saved_on_four_ranks(sharded_runs: Path) -> None:
    state, model, optimizer, progress = plain_state()
    with ckpts.CheckpointManager(sharded_runs / "w4") as manager:
        assert manager.restore(state) == 2
    assert_same_tensors(plain_full_tensors(model, optimizer),
                        load_file(sharded_runs / "out" / "expected-w4-2.rank0.safetensors"),
                        "4 ranks -> plain process")
    assert progress.state_dict() == json.loads(
        (sharded_runs / "out" / "expected-w4-2.rank0.json").read_text())


def test_load_weights_fills_a_plain_module_from_a_sharded_checkpoint(sharded_runs: Path) -> None:
    model = plain_model()
    ckpts.load_weights(sharded_runs / "w4" / "step-00000002", model)
    want = load_file(sharded_runs / "out" / "expected-w4-2.rank0.safetensors")
    assert_same_tensors({f"model/{key}": value for key, value in model.state_dict().items()},
                        {key: value for key, value in want.items() if key.startswith("model/")},
                        "load_weights")


def test_verify_passes_on_sharded_checkpoints_and_reports_a_flipped_byte(
        sharded_runs: Path) -> None:
    for run in ("w1", "w2", "w4"):
        intact = CliRunner().invoke(app, ["verify", str(sharded_runs / run)])
        assert intact.exit_code == 0, intact.output
        assert "2 checkpoint(s) verified, 0 with problems" in intact.stdout, intact.output
    damaged = CliRunner().invoke(app, ["verify", str(sharded_runs / "w2-corrupt")])
    assert damaged.exit_code == 1, damaged.output
    lines = damaged.stdout.splitlines()
    assert [line for line in lines if line.startswith("step-")] == [
        "step-00000001  OK", "step-00000002  FAILED"], damaged.output
    assert "model-rank00001.safetensors" in "".join(lines)


def test_flipped_byte_in_one_rank_shard_makes_every_rank_fall_back(sharded_runs: Path) -> None:
    # the 4-rank job restored the copy of w2 whose newest step has a flipped byte
    assert_restored(sharded_runs / "out", "w2-w4-corrupt", 4, "expected-w2-1", 1)
    log = (sharded_runs / "out" / "log-w4.rank0.txt").read_text()
    skipped = [line for line in log.splitlines() if "skipping corrupt checkpoint" in line]
    assert len(skipped) == 1 and "w2-corrupt/step-00000002" in skipped[0], log
    assert "CorruptCheckpointError" in skipped[0] and "model-rank00001" in skipped[0], skipped
    assert "FrameSummary" not in skipped[0], skipped  # each rank's error, not DCP's wrapping


def failures_reports(job: TwoRankJob) -> list[dict[str, Any]]:
    return [json.loads((job.out / f"failures.rank{rank}.json").read_text()) for rank in (0, 1)]


def committed_steps(run: Path) -> list[int]:
    return [checkpoint.step for checkpoint in ckpts.CheckpointManager(run).checkpoints()]


def test_rank_raising_mid_save_commits_nothing_and_every_rank_raises(
        two_rank_job: TwoRankJob) -> None:
    reports = failures_reports(two_rank_job)
    injected = {"2": "rank 1: OSError: [Errno 5] Input/output error (injected on this rank)",
                "3": "[Errno 28] No space left on device (injected on this rank)"}
    for rank, report in enumerate(reports):
        assert report["1"]["outcome"] == "saved", (rank, report)
        for step, cause in injected.items():  # rank 1's write, then rank 0's commit, failed
            assert report[step]["outcome"] == "WriteError", (rank, step, report)
            assert report[step]["checkpoint_error"], (rank, step, report)
            assert cause in report[step]["message"], (rank, step, report)
            assert "FrameSummary" not in report[step]["message"]  # not DCP's wrapping of it
            # reported through the collectives, not found by the timeout
            assert report[step]["seconds"] < COLLECTIVE_TIMEOUT / 3, (rank, step, report)
        assert report["4"]["outcome"] == "saved", (rank, report)
    run = two_rank_job.runs / "failures"
    assert committed_steps(run) == [1, 4]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".ckpts")) == [
        "step-00000001", "step-00000004"]


def test_rank_dying_mid_save_makes_the_survivor_raise_within_the_timeout(
        two_rank_job: TwoRankJob) -> None:
    check_ranks(two_rank_job.ranks, returncodes=[0, 17])  # rank 1 ended itself in write()
    survivor, dead = failures_reports(two_rank_job)
    assert "5" not in dead  # it died before reporting
    assert survivor["5"]["checkpoint_error"], survivor
    assert survivor["5"]["seconds"] < COLLECTIVE_TIMEOUT + 10, survivor
    assert committed_steps(two_rank_job.runs / "failures") == [1, 4]


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="set CKPTS_LONG=1: waits out a collective timeout")
def test_rank_stalled_mid_save_makes_the_other_raise_after_the_timeout(tmp_path: Path) -> None:
    timeout = 5.0
    ranks = launch(2, {"failures": {"out": str(tmp_path), "run": str(tmp_path / "run"),
                                    "timeout": timeout, "hang": True}}, tmp_path / "log")
    check_ranks(ranks)
    waiting, stalled = [json.loads((tmp_path / f"hang.rank{rank}.json").read_text())
                        for rank in (0, 1)]
    assert waiting["1"]["outcome"] == stalled["1"]["outcome"] == "saved"
    assert waiting["2"]["checkpoint_error"], waiting
    assert timeout - 1 < waiting["2"]["seconds"] < 2 * timeout, waiting  # not 3 x timeout
    assert stalled["2"]["checkpoint_error"], stalled
    assert committed_steps(tmp_path / "run") == [1]


def test_async_saves_on_two_ranks_hold_the_state_as_of_each_save(
        two_rank_job: TwoRankJob) -> None:
    for step in (1, 2, 3):
        assert_restored(two_rank_job.out, f"async-{step}", 2, f"async-expected-{step}", step)


def test_triggers_make_every_rank_save_on_the_same_steps(two_rank_job: TwoRankJob) -> None:
    reports = [json.loads((two_rank_job.out / f"triggers.rank{rank}.json").read_text())
               for rank in (0, 1)]
    assert reports[0] == reports[1]
    assert reports[0]["every"] == [2, 4, 6]
    # rank 0's own losses improve at steps 1, 2, 4 and 6 (rank 1's at 1, 3, 5 and 6)
    assert reports[0]["improvement"] == [1, 2, 4, 6]
    for label in ("every", "improvement"):
        assert committed_steps(two_rank_job.runs / "triggers" / label) == reports[0][label]


def test_fsdp_save_and_restore_on_s3(two_rank_job: TwoRankJob) -> None:
    assert_restored(two_rank_job.out, "s3-restored", 2, "s3-expected-2", 2)
    state, model, optimizer, progress = plain_state()  # and 2 -> 1, in this process
    with ckpts.CheckpointManager(two_rank_job.s3_url,
                                 storage_options=two_rank_job.s3_options) as manager:
        assert manager.restore(state) == 2
    assert_same_tensors(plain_full_tensors(model, optimizer),
                        load_file(two_rank_job.out / "s3-expected-2.rank0.safetensors"),
                        "S3: 2 ranks -> plain process")
    assert progress.state_dict() == json.loads(
        (two_rank_job.out / "s3-expected-2.rank0.json").read_text())

"""The memory tier in a job of 2 ranks: a SIGKILLed DDP job restarts from host memory.

``memory_ranks_worker.py`` is one rank of a 2-rank DDP job (gloo on CPU) that snapshots
its state into host memory every step (``memory=Every(steps=1)``) and writes a durable
checkpoint every 5 steps (``save=Every(steps=5)``), up to step 12. The test starts both
ranks itself, in a new process group of their own, with ``CKPTS_MEMORY_DIR`` set to a
folder of the test's own (never the real ``/dev/shm``), and ends them with ``os.killpg``
and SIGKILL. An uninterrupted job is the reference: every loss a restarted job reports,
and its final parameters and optimizer state, must equal the reference's bit for bit.

About 35 s on 2 idle cores (9 job launches of 2 ranks each, most of it startup).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpts
from memory_ranks_worker import MAX_STEP, SAVE_EVERY, WORLD_SIZE

WORKER = str(Path(__file__).with_name("memory_ranks_worker.py"))
DEADLINE = 90.0  # seconds any one wait may take before the test fails
KILL_AT = 7  # not a multiple of SAVE_EVERY: memory holds a newer step than the run
DURABLE = KILL_AT // SAVE_EVERY * SAVE_EVERY  # the run's newest checkpoint at the kill
SKIP_WARNING = "not intact on every rank"

pytestmark = [
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="process groups, SIGKILL and a tmpfs-like folder"),
]


@dataclass
class Rank:
    """What one rank of one life printed (see memory_ranks_worker.py)."""

    start: int | None = None
    source: str | None = None
    losses: dict[int, str] = field(default_factory=dict)
    holding: int | None = None
    final: str | None = None
    closed: bool = False
    log: str = ""


@dataclass
class Job:
    """Where a job keeps its run, its host memory and what its ranks print."""

    out: Path

    @property
    def run(self) -> Path:
        return self.out / "run"

    @property
    def memory(self) -> Path:
        return self.out / "shm"

    def printed(self, life: int, rank: int) -> Rank:
        found = Rank()
        path = self.out / f"life{life}-rank{rank}.out"
        # a line counts once its newline is written: a kill may cut the last one short
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        for words in (line.split() for line in lines):
            if words[0] == "start":
                found.start, found.source = int(words[1]), words[2]
            elif words[0] == "returned":
                found.losses[int(words[1])] = words[2]
            elif words[0] == "holding":
                found.holding = int(words[1])
            elif words[0] == "final":
                found.final = words[1]
            elif words[0] == "closed":
                found.closed = True
        errors = self.out / f"life{life}-rank{rank}.err"
        found.log = errors.read_text() if errors.exists() else ""
        return found

    def ranks(self, life: int) -> list[Rank]:
        return [self.printed(life, rank) for rank in range(WORLD_SIZE)]

    def committed(self) -> list[int]:
        return sorted(int(path.parent.name.split("-")[1])
                      for path in self.run.glob("step-*/manifest.json"))

    def area(self, rank: int) -> Path:
        """This rank's memory area: $CKPTS_MEMORY_DIR/ckpts-<uid>/<run>-<hash>/rank-0000R."""
        found = list(self.memory.glob(f"ckpts-*/*/rank-{rank:05d}"))
        assert len(found) == 1, (rank, found)
        return found[0]

    def sealed_steps(self, rank: int) -> dict[int, Path]:
        """The hashed snapshots in a rank's area: step -> slot folder."""
        steps = {}
        for manifest in self.area(rank).glob("slot-*/manifest.json"):
            # renamed into place whole, but the slot may be cleared meanwhile
            with suppress(FileNotFoundError):
                steps[json.loads(manifest.read_text())["step"]] = manifest.parent
        return steps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kill_group(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL the job's whole process group, and wait until every process is gone."""
    group = processes[0].pid
    with suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    for process in processes:
        process.wait(timeout=DEADLINE)
    with pytest.raises(ProcessLookupError):  # nothing of the group is left
        os.killpg(group, 0)


def in_group(group: int) -> dict[str, Any]:
    """Popen's arguments that put the child in process group ``group`` (0: a new group
    that the child leads)."""
    if sys.version_info >= (3, 11):
        return {"process_group": group}
    return {"preexec_fn": lambda: os.setpgid(0, group)}


@contextmanager
def started(job: Job, life: int, *, hold_at: int = 0, step_sleep: float = 0.0
            ) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Both ranks of a life of ``job``, in a process group of their own (rank 0 leads
    it; not a session of its own, which rank 1 could not join); killed on the way out if
    still running."""
    job.memory.mkdir(exist_ok=True)
    env = {**os.environ, "WORLD_SIZE": str(WORLD_SIZE), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "CKPTS_MEMORY_DIR": str(job.memory),
           "OMP_NUM_THREADS": "1"}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(WORLD_SIZE):
            group = processes[0].pid if processes else 0
            with open(job.out / f"life{life}-rank{rank}.out", "wb") as out, \
                    open(job.out / f"life{life}-rank{rank}.err", "wb") as err:
                processes.append(subprocess.Popen(
                    [sys.executable, WORKER, str(job.run), str(hold_at), str(step_sleep)],
                    env={**env, "RANK": str(rank)}, stdout=out, stderr=err,
                    **in_group(group)))
        yield processes
    finally:
        if processes and any(process.poll() is None for process in processes):
            kill_group(processes)


def describe(job: Job, life: int) -> str:
    return "\n".join(f"--- rank {rank}:\n{(job.out / f'life{life}-rank{rank}.out').read_text()}"
                     f"{(job.out / f'life{life}-rank{rank}.err').read_text()[-3000:]}"
                     for rank in range(WORLD_SIZE))


def wait_until(what: str, ready: Callable[[], bool], processes: list[subprocess.Popen[bytes]],
               job: Job, life: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while not ready():
        assert all(process.poll() is None for process in processes), (
            f"life {life} ended before {what}:\n{describe(job, life)}")
        assert time.monotonic() < deadline, f"life {life}: no {what} in {DEADLINE} s"
        time.sleep(0.01)


def finish(job: Job, life: int) -> list[Rank]:
    """Run a life to its end (step MAX_STEP and close()); what each rank printed."""
    with started(job, life) as processes:
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(timeout=DEADLINE))
            except subprocess.TimeoutExpired:
                codes.append(None)
    assert codes == [0] * WORLD_SIZE, f"life {life} ended with {codes}:\n{describe(job, life)}"
    ranks = job.ranks(life)
    for rank in ranks:
        assert rank.closed and max(rank.losses, default=rank.start) == MAX_STEP, \
            describe(job, life)
        assert "keeper pid" not in rank.log, "a job of many ranks started a keeper"
    return ranks


def kill_at(job: Job, life: int, step: int, *, hold: bool) -> None:
    """Run a life until both ranks returned ``step`` and the run holds the durable
    checkpoint due at or before it, then SIGKILL the job's process group. With ``hold``,
    the ranks stop training after ``step`` and the kill waits until both ranks'
    snapshots of ``step`` are hashed."""
    durable = step // SAVE_EVERY * SAVE_EVERY
    with started(job, life, hold_at=step if hold else 0,
                 step_sleep=0.0 if hold else 0.2) as processes:
        wait_until(f"save({step}) returned on every rank",
                   lambda: all(step in rank.losses for rank in job.ranks(life)),
                   processes, job, life)
        wait_until(f"the durable checkpoint of step {durable}",
                   lambda: durable in job.committed(), processes, job, life)
        if hold:
            wait_until(f"every rank holding at {step}",
                       lambda: all(rank.holding == step for rank in job.ranks(life)),
                       processes, job, life)
            wait_until(f"the snapshots of step {step} hashed",
                       lambda: all(step in job.sealed_steps(rank) for rank in range(WORLD_SIZE)),
                       processes, job, life)
        kill_group(processes)
    assert all(rank.final is None for rank in job.ranks(life)), "the job ended before the kill"


def assert_matches(reference: Job, life: int, ranks: list[Rank], *, complete: bool = True
                   ) -> None:
    """Every loss of the life follows on from its start without a gap and equals the
    reference's bit for bit, and so does the final state (``complete``: it finished)."""
    expected = reference.ranks(1)
    for number, (rank, want) in enumerate(zip(ranks, expected, strict=True)):
        assert rank.start is not None
        last = MAX_STEP if complete else max(rank.losses, default=rank.start)
        assert sorted(rank.losses) == list(range(rank.start + 1, last + 1)), rank.losses
        differing = {step: (loss, want.losses[step]) for step, loss in rank.losses.items()
                     if loss != want.losses[step]}
        assert not differing, f"life {life}, rank {number}: losses differ at {differing}"
        if complete:
            assert rank.final == want.final, f"life {life}, rank {number}: final state differs"


def assert_finished_run(job: Job) -> None:
    """The run verifies and holds nothing but committed checkpoints (and ckpts' own
    files), close() made the last step durable, and host memory is freed."""
    assert ckpts.verify(job.run) == []
    assert job.committed()[-1] == MAX_STEP
    assert sorted(entry.name for entry in job.run.iterdir()
                  if not entry.name.startswith(".ckpts")) == [
        f"step-{step:08d}" for step in job.committed()]
    assert list(job.memory.glob("ckpts-*/*")) == [], "close() left the memory area behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """An uninterrupted job with its own run and memory folder."""
    job = Job(tmp_path_factory.mktemp("memory-reference"))
    ranks = finish(job, 1)
    assert [(rank.start, rank.source) for rank in ranks] == [(0, "run")] * WORLD_SIZE
    assert ranks[0].final == ranks[1].final, "the DDP replicas differ"
    assert ranks[0].losses != ranks[1].losses, "the ranks should see different data"
    assert_finished_run(job)
    return job


def test_killed_job_restarts_from_host_memory_bit_exact(tmp_path: Path, reference: Job
                                                        ) -> None:
    """A 2-rank job SIGKILLed (its whole process group) after save(7) returned on both
    ranks, with the run's newest checkpoint at step 5, restarts on the same host from the
    snapshots in host memory: both ranks start at the same step, at least 7, logged as
    "restored step N from host memory"; no step is lost or repeated, every later loss and
    the final state equal an uninterrupted job's, and close() makes the last step durable
    and frees the memory."""
    job = Job(tmp_path)
    kill_at(job, 1, KILL_AT, hold=False)
    killed = job.ranks(1)
    assert_matches(reference, 1, killed, complete=False)
    run_newest = job.committed()[-1]
    held = min(max(rank.losses) for rank in killed)  # save() returned on both ranks

    ranks = finish(job, 2)
    starts = {(rank.start, rank.source) for rank in ranks}
    assert len(starts) == 1, f"the ranks restored different steps: {starts}"
    (start, source), = starts
    assert source == "memory", describe(job, 2)
    assert KILL_AT <= held <= start, (start, held)
    assert start > run_newest, f"memory held no step newer than the run's {run_newest}"
    for rank in ranks:
        assert f"restored step {start} from host memory" in rank.log
        assert SKIP_WARNING not in rank.log
    assert_matches(reference, 2, ranks)
    assert_finished_run(job)


def test_one_ranks_lost_memory_makes_every_rank_restore_from_the_run(
        tmp_path: Path, reference: Job) -> None:
    """When one rank's host memory is gone (its area removed, as after that host
    rebooted) the restart does not mix steps: every rank falls back to the run's newest
    checkpoint (step 5, not the step 7 in rank 0's memory), then trains on exactly as an
    uninterrupted job does. The memory tier works again after the fallback: killed after
    save() of the last step returned (before close()), the job restarts from that step
    in memory, and close() makes it durable although no step was trained since."""
    job = Job(tmp_path)
    kill_at(job, 1, KILL_AT, hold=True)
    assert job.committed() == [DURABLE]
    assert KILL_AT in job.sealed_steps(0)  # rank 0 could restore step 7 alone
    lost = job.area(1)
    shutil.rmtree(lost)
    assert not lost.exists()

    kill_at(job, 2, MAX_STEP, hold=True)
    ranks = job.ranks(2)
    assert [(rank.start, rank.source) for rank in ranks] == [(DURABLE, "run")] * WORLD_SIZE, \
        describe(job, 2)
    for rank in ranks:
        assert "from host memory" not in rank.log
    assert_matches(reference, 2, ranks, complete=False)
    assert max(job.committed()) < MAX_STEP  # the last step is in memory only

    ranks = finish(job, 3)
    assert [(rank.start, rank.source) for rank in ranks] == [(MAX_STEP, "memory")] * WORLD_SIZE, \
        describe(job, 3)
    assert all(rank.losses == {} for rank in ranks)
    assert_matches(reference, 3, ranks)
    assert_finished_run(job)


def test_damaged_snapshot_on_one_rank_is_skipped_on_every_rank(
        tmp_path: Path, reference: Job) -> None:
    """A snapshot that fails its hashes on one rank (a byte of a tensor of rank 1's step 7
    flipped) is not restored on any rank: every rank logs a warning that skips it, naming
    the tensor, and restores the next newest step that every rank holds intact, step 6,
    from memory (still newer than the run's step 5). The job then trains exactly as an
    uninterrupted job does, to the end."""
    job = Job(tmp_path)
    kill_at(job, 1, KILL_AT, hold=True)
    assert job.committed() == [DURABLE]
    slot = job.sealed_steps(1)[KILL_AT]
    manifest = json.loads((slot / "manifest.json").read_text())
    key, info = next((key, info) for key, info in manifest["objects"]["model"]["tensors"].items()
                     if info["offsets"][1] > info["offsets"][0])
    with open(slot / info["file"], "r+b") as file:
        file.seek(info["offsets"][0])
        byte = file.read(1)[0]
        file.seek(info["offsets"][0])
        file.write(bytes([byte ^ 0xFF]))

    ranks = finish(job, 2)
    assert [(rank.start, rank.source) for rank in ranks] == [(KILL_AT - 1, "memory")] \
        * WORLD_SIZE, describe(job, 2)
    for number, rank in enumerate(ranks):
        assert f"memory snapshot of step {KILL_AT}, {SKIP_WARNING}" in rank.log, \
            (number, rank.log[-3000:])
        assert key in rank.log, f"the warning should name the damaged tensor {key!r}"
    assert_matches(reference, 2, ranks)
    assert_finished_run(job)

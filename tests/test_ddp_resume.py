"""DDP exact resume: SIGKILL every rank of a 2-rank job mid-run, resume, end bit-exact.

``ddp_worker.py`` runs under ``python -m torch.distributed.run --nproc_per_node 2``
(gloo, CPU): DDP with dropout, ``DistributedSampler(shuffle=True)`` inside a
``ResumableLoader``, AdamW with a warmup + cosine LambdaLR, a ``CheckpointManager`` on
every rank saving every 3 steps, 7 steps an epoch. The reference job runs uninterrupted
and without ckpts' manager (so saving must not perturb the training either). Then a job
on a fresh run is SIGKILLed, launcher and both ranks at once, at a seeded random instant
(a random step after its first new checkpoint, plus a random fraction of a step) or
while the ranks write a checkpoint (as soon as its staging folder appears), restarted
(it restores the newest checkpoint), killed again, and left to finish. Checked:

- after each kill, every listed checkpoint verifies, and each manifest has
  ``world_size`` 2 and the per-rank objects ``rng.rank0/1`` and ``loader.rank0/1``;
- each restart resumed from the newest listed checkpoint;
- every loss each rank logged, in every life, equals the reference's for that step
  (exact float), and the steps after each resume follow on without a gap;
- the final parameters and optimizer state of both ranks equal the reference's bit
  for bit;
- the last life cleaned up the checkpoints the kills interrupted.

Each kill is described in ``OUT/kills.jsonl`` (step, instant, what it interrupted).

CI runs one job with sync saves (a kill at a random instant, then one in a save) and one
with async saves (one kill in a save): 6 job launches, about 30 s on 2 idle cores.
``CKPTS_LONG=1`` adds 8 seeds per mode with 1 to 3 kills each (about 6 minutes)::

    CKPTS_LONG=1 .venv/bin/pytest -q -m slow tests/test_ddp_resume.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import safetensors.torch
import torch

import ckpts
from ddp_worker import SAVE_EVERY, TOTAL_STEPS, WORLD_SIZE

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
LONG = os.environ.get("CKPTS_LONG") == "1"
STEP_SLEEP = 0.1  # seconds a rank sleeps after each step of a job that will be killed
LONG_SEEDS = range(100, 108)
DEADLINE = 120.0  # seconds any one wait may take before the test fails
PER_RANK_OBJECTS = {f"{name}.rank{rank}" for name in ("rng", "loader")
                    for rank in range(WORLD_SIZE)}

pytestmark = [
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="finds the ranks to kill in /proc"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (torchrun starts each rank in a
    session of its own, so the launcher's process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_job(launcher: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and every rank at once, and wait until all are gone."""
    pids = process_tree(launcher.pid)
    for pid in pids:
        with suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout=DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while any(is_running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes {pids} outlived SIGKILL"
        time.sleep(0.05)


@contextmanager
def job(out: Path, life: int, mode: str, step_sleep: float) -> Iterator[subprocess.Popen[bytes]]:
    """A 2-rank torchrun job of ddp_worker.py; killed on the way out if still running."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(WORLD_SIZE), "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), WORKER, str(out), str(life), mode, str(step_sleep)]
    with open(out / f"launcher-life{life}.txt", "wb") as output:
        launcher = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            yield launcher
        finally:
            if launcher.poll() is None:
                kill_job(launcher)


def finish(out: Path, life: int, mode: str, step_sleep: float) -> None:
    with job(out, life, mode, step_sleep) as launcher:
        try:
            code = launcher.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            code = None
    assert code == 0, (f"life {life} of {out} ended with {code}:\n"
                       + (out / f"launcher-life{life}.txt").read_text()[-4000:])


def logged(out: Path, life: int, rank: int) -> tuple[int | None, dict[int, str]]:
    """The step a life resumed from and the loss it logged at each step (so far)."""
    path = out / f"losses-life{life}-rank{rank}.txt"
    # a line is complete once its newline is written; a kill may cut the last one short
    lines = [line.split() for line in path.read_text().split("\n")[:-1]] if path.exists() else []
    if not lines:
        return None, {}
    assert lines[0][0] == "resumed", (path, lines[0])
    return int(lines[0][1]), {int(step): loss for step, loss in lines[1:]}


def committed_steps(run: Path) -> list[int]:
    return sorted(int(path.parent.name.split("-")[1]) for path in run.glob("step-*/manifest.json"))


def wait_until(what: str, ready: Callable[[], bool], launcher: subprocess.Popen[bytes], out: Path,
               life: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while not ready():
        assert launcher.poll() is None, (
            f"life {life} ended ({launcher.returncode}) before {what}:\n"
            + (out / f"launcher-life{life}.txt").read_text()[-4000:])
        assert time.monotonic() < deadline, f"life {life}: no {what} in {DEADLINE} s"
        time.sleep(0.01)


def kill_mid_run(out: Path, life: int, mode: str, chooser: random.Random,
                 resumed_from: int, last_target: int, *, in_save: bool) -> None:
    """Run a life and SIGKILL it once it has committed a checkpoint of its own.

    The kill comes at a random step up to ``last_target``, a random fraction of a step
    after that step's loss was logged; or, ``in_save``, at a random save step as soon as
    that save's staging folder appears (while the ranks write). What the kill hit is
    appended to ``out/kills.jsonl``, for a look after a failure.
    """
    first_save = (resumed_from // SAVE_EVERY + 1) * SAVE_EVERY
    saves = range(first_save + SAVE_EVERY, last_target + 1, SAVE_EVERY)
    in_save = in_save and len(saves) > 0
    target = chooser.choice(saves) if in_save else chooser.randint(first_save + 1, last_target)
    delay = 0.0 if in_save else chooser.uniform(0.0, STEP_SLEEP)
    run = out / "run"
    with job(out, life, mode, STEP_SLEEP) as launcher:
        wait_until(f"a checkpoint after step {resumed_from}",
                   lambda: any(s > resumed_from for s in committed_steps(run)), launcher, out,
                   life)
        if in_save:  # the save starts after this step's loss and a step's sleep: watch
            wait_until(f"step {target - 1}", lambda: target - 1 in logged(out, life, 0)[1],
                       launcher, out, life)
            staging = f".tmp-step-{target:08d}"
            deadline = time.monotonic() + DEADLINE
            while not (any(name.startswith(staging) for name in os.listdir(run))
                       or target in committed_steps(run) or launcher.poll() is not None):
                assert time.monotonic() < deadline, f"life {life}: no save of step {target}"
                time.sleep(0.001)  # a save takes tens of milliseconds
        else:
            wait_until(f"step {target}", lambda: target in logged(out, life, 0)[1],
                       launcher, out, life)
            time.sleep(delay)
        assert launcher.poll() is None, f"life {life} finished before the kill"
        kill_job(launcher)
    assert not list(out.glob("final-rank*")), "the job finished before the kill"
    with open(out / "kills.jsonl", "a") as record:
        record.write(json.dumps({
            "life": life, "mode": mode, "target": target, "in_save": in_save, "delay": delay,
            "last_logged": max(logged(out, life, 0)[1]), "listed": committed_steps(run),
            "interrupted": leftovers(run)}) + "\n")


def check_listed_checkpoints(run: Path) -> list[int]:
    """Every listed checkpoint verifies and records 2 ranks with their own RNG and loader
    state; returns the listed steps."""
    listed = [checkpoint.step for checkpoint in ckpts.CheckpointManager(run).checkpoints()]
    assert listed, f"no checkpoint listed in {run} after the kill"
    problems = ckpts.verify(run)
    assert not problems, "\n".join(problems)
    for step in listed:
        manifest = json.loads((run / f"step-{step:08d}" / "manifest.json").read_text())
        assert manifest["world_size"] == WORLD_SIZE, (step, manifest["world_size"])
        assert sorted(manifest["per_rank"]) == ["loader", "rng"], (step, manifest["per_rank"])
        assert set(manifest["objects"]) >= PER_RANK_OBJECTS, (step, sorted(manifest["objects"]))
    return listed


def leftovers(run: Path) -> list[str]:
    """Entries of ``run`` other than committed checkpoints and ckpts' own ``.ckpts*`` files
    (a killed save leaves a staged folder, with files of both ranks, for the next to clean)."""
    return sorted(entry.name for entry in run.iterdir()
                  if not (entry.name.startswith(".ckpts") and entry.is_file())
                  and not (entry.name.startswith("step-") and (entry / "manifest.json").is_file()))


def bitwise_differences(expected: Path, actual: Path) -> list[str]:
    want, got = safetensors.torch.load_file(expected), safetensors.torch.load_file(actual)
    if want.keys() != got.keys():
        return [f"keys differ: {sorted(want.keys() ^ got.keys())}"]
    return [key for key in sorted(want) if want[key].dtype != got[key].dtype
            or want[key].shape != got[key].shape
            or not torch.equal(want[key].reshape(-1).view(torch.uint8),
                               got[key].reshape(-1).view(torch.uint8))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted job that does not checkpoint at all."""
    out = tmp_path_factory.mktemp("ddp-reference")
    finish(out, 1, "none", 0.0)
    assert bitwise_differences(out / "final-rank0.safetensors",
                               out / "final-rank1.safetensors") == [], "DDP replicas differ"
    return out


def interrupted_job_matches_reference(out: Path, reference: Path, mode: str, seed: int,
                                      kills_in_save: Sequence[bool]) -> None:
    """Kill a job once per entry of ``kills_in_save`` (True: during a save), let it
    finish, and compare it with the reference (see the module docstring)."""
    chooser = random.Random(seed)
    resumed_from = [0]  # the newest listed checkpoint at each life's start
    for number, in_save in enumerate(kills_in_save):
        remaining = len(kills_in_save) - number - 1  # later kills need room after this one
        last_target = TOTAL_STEPS - 3 - remaining * 2 * SAVE_EVERY
        if resumed_from[-1] + SAVE_EVERY + 1 > last_target:
            break
        kill_mid_run(out, len(resumed_from), mode, chooser, resumed_from[-1], last_target,
                     in_save=in_save)
        resumed_from.append(check_listed_checkpoints(out / "run")[-1])
    life = len(resumed_from)
    finish(out, life, mode, 0.0)
    check_listed_checkpoints(out / "run")
    assert leftovers(out / "run") == [], "the killed saves were not cleaned up"

    for rank in range(WORLD_SIZE):
        _, expected = logged(reference, 1, rank)
        assert sorted(expected) == list(range(1, TOTAL_STEPS + 1))
        for number in range(1, life + 1):
            resumed, losses = logged(out, number, rank)
            where = f"seed {seed}, life {number}, rank {rank}"
            assert resumed == resumed_from[number - 1], (where, resumed, resumed_from)
            assert sorted(losses) == list(range(resumed + 1, resumed + 1 + len(losses))), where
            differing = {step: (loss, expected[step]) for step, loss in losses.items()
                         if loss != expected[step]}
            assert not differing, f"{where}: losses differ from the reference at {differing}"
        assert max(losses) == TOTAL_STEPS, f"seed {seed}, rank {rank}: the last life stopped early"
        differences = bitwise_differences(reference / f"final-rank{rank}.safetensors",
                                          out / f"final-rank{rank}.safetensors")
        assert not differences, f"seed {seed}, rank {rank}: final tensors differ: {differences}"


def test_ddp_job_killed_twice_with_sync_saves_resumes_bit_exact(
        tmp_path: Path, reference: Path) -> None:
    interrupted_job_matches_reference(tmp_path, reference, "sync", 0, [False, True])


def test_ddp_job_killed_with_async_saves_resumes_bit_exact(
        tmp_path: Path, reference: Path) -> None:
    interrupted_job_matches_reference(tmp_path, reference, "async", 1, [True])


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long mode: set CKPTS_LONG=1")
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ddp_job_killed_at_many_instants_resumes_bit_exact(
        tmp_path: Path, reference: Path, mode: str) -> None:
    for seed in LONG_SEEDS if mode == "sync" else [s + len(LONG_SEEDS) for s in LONG_SEEDS]:
        out = tmp_path / f"seed-{seed}"
        out.mkdir()
        chooser = random.Random(seed)
        kills = [chooser.random() < 0.5 for _ in range(chooser.randint(1, 3))]
        interrupted_job_matches_reference(out, reference, mode, seed, kills)

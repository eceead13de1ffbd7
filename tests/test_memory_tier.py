"""The memory tier (``memory=``): snapshots in host shared memory, a keeper, exact resume.

Most tests run ``memory_worker.py`` (a training loop saving to memory every step and to
the run every 5 steps) as a real process in a session of its own, SIGKILL its whole
process group at seeded random instants, and check what a user relies on:

- within seconds the run holds a committed checkpoint at least as new as the last step
  whose ``save()`` returned (the keeper persisted it, on a local disk and on S3), and the
  keeper has exited;
- the restarted worker resumes from host memory at that step, and every later loss equals
  the uninterrupted reference's bit for bit (dropout included: the RNG comes back too);
- without the memory snapshots it resumes from the run, as exactly;
- torn and damaged snapshots are never restored; two runs never see each other's;
- ``close()`` makes the newest snapshot durable and frees the memory area; a tmpfs too
  small and bad arguments fail before anything is written.

Every test has its own memory folder (``CKPTS_MEMORY_DIR`` under tmp_path: never the real
/dev/shm), and stray workers and keepers of a failed test are killed at its teardown.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpts
from ckpts.storage._shm import MEMORY_DIR_ENV, run_folder
from conftest import run_contents
from memory_worker import KEEP, SAVE_EVERY, build, reference, train_step
from s3_server import S3Bucket

WORKER = str(Path(__file__).with_name("memory_worker.py"))
SEED = 1234
MAX_STEP = 40
PACE = 0.05  # seconds a worker to be killed sleeps after each step: kills land between
# saves too, and a test stalled on a busy host still kills it well before its last step
KEPT_WITHIN = 30.0  # seconds from a kill until the run holds its state and the keeper exited
START_TIMEOUT = 120.0  # seconds a worker may take to start (torch's import on a busy host)
KILLS = 2  # kills of one run in the random-instant test (each life costs a few seconds)
KEEPER = "ckpts._run.keeper"
MANIFEST, PENDING = "manifest.json", "pending.json"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds the keeper processes in /proc")


# ---- helpers -------------------------------------------------------------------------


@pytest.fixture
def memory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's CKPTS_MEMORY_DIR (set here and in every worker's environment); any
    keeper still running with it at the end is killed."""
    folder = tmp_path / "shm"
    folder.mkdir()
    monkeypatch.setenv(MEMORY_DIR_ENV, str(folder))
    yield folder
    for pid in keepers(folder):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def keepers(folder: Path) -> list[int]:
    """Live keeper processes (``python -m ckpts._run.keeper``) whose CKPTS_MEMORY_DIR is
    ``folder``: this test's, never another's."""
    wanted = f"{MEMORY_DIR_ENV}={folder}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # exited while we looked
            continue
        if KEEPER.encode() in command and wanted in environ and state != "Z":
            found.append(int(entry.name))
    return found


class Worker:
    """``memory_worker.py`` in a session of its own (so that killing its process group
    spares its keeper, as a scheduler's kill of a job would); its stdout lines are
    collected, its stderr (and its keeper's) goes to ``log``."""

    def __init__(self, run: str | Path, max_step: int, seed: int, memory_dir: Path, log: Path,
                 *, options: dict[str, Any] | None = None, pace: float = PACE,
                 hold: bool = False) -> None:
        command = [sys.executable, WORKER, str(run), str(max_step), str(seed),
                   "--pace", str(pace)]
        if options is not None:
            command += ["--options", json.dumps(options)]
        if hold:
            command.append("--hold")
        self.log = log
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        environment = {**os.environ, MEMORY_DIR_ENV: str(memory_dir), "OMP_NUM_THREADS": "1"}
        with open(log, "ab") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr,
                                            text=True, start_new_session=True, env=environment)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.strip())
                self._changed.notify_all()
        self.process.stdout.close()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def describe(self) -> str:
        return f"stdout: {self.lines}\nstderr:\n{self.log.read_text()}"

    def wait_for(self, done: Callable[[list[str]], bool], timeout: float, what: str) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.ended or done(self.lines), timeout)
            if not done(self.lines):
                pytest.fail(f"the worker never printed {what}:\n{self.describe()}")

    def started(self) -> tuple[int, str]:
        """The step it restored and where from (``memory``, ``run``, ``none``)."""
        self.wait_for(lambda lines: bool(lines), START_TIMEOUT, "its start")
        kind, step, source = self.lines[0].split()
        assert kind == "start", self.describe()
        return int(step), source

    def returned(self) -> dict[int, str]:
        """Each step whose save() returned, and its loss (``float.hex()``)."""
        found = {}
        for line in list(self.lines):
            if line.startswith("returned "):
                _, step, loss = line.split()
                found[int(step)] = loss
        return found

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (not its keeper: a session of its own)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.process.returncode == -signal.SIGKILL, self.describe()

    def finish(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for the worker to end by itself, after close()."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the worker did not finish:\n{self.describe()}")
        self._reader.join(timeout=30)
        assert self.process.returncode == 0, self.describe()
        assert self.lines[-1] == "closed", self.describe()

    def stop(self) -> None:
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers a test starts (append them): any still running at its end is killed."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def kill_at_random(worker: Worker, rng: random.Random, low: int, high: int) -> None:
    """SIGKILL ``worker`` once it has returned from ``low`` to ``high`` (seeded) more
    saves than it restored, plus a random fraction of a step."""
    start, _ = worker.started()
    count = rng.randint(low, high)
    worker.wait_for(lambda lines: sum(line.startswith("returned ") for line in lines) >= count,
                    START_TIMEOUT, f"{count} returned steps after step {start}")
    time.sleep(rng.uniform(0.0, PACE))
    worker.kill()


def committed(run: str | Path, options: dict[str, Any] | None = None) -> list[int]:
    """The steps of the run's committed checkpoints, ascending."""
    manager = ckpts.CheckpointManager(run, storage_options=options)
    return [c.step for c in manager.checkpoints()]


def wait_until_kept(run: str | Path, memory_dir: Path, at_least: int, log: Path,
                    options: dict[str, Any] | None = None) -> int:
    """Within KEPT_WITHIN seconds of a kill: the run holds a checkpoint of a step
    >= ``at_least`` and no keeper of this test runs any more. Returns the run's newest."""
    deadline = time.monotonic() + KEPT_WITHIN
    while True:
        steps = committed(run, options)
        running = keepers(memory_dir)
        if steps and steps[-1] >= at_least and not running:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{KEPT_WITHIN} s after the kill the run holds steps {steps} (the "
                        f"last save() that returned was step {at_least}), keepers still "
                        f"running: {running}\n{log.read_text()}")
        time.sleep(0.1)
    text = log.read_text()
    assert "ckpts keeper:" in text, f"the keeper said nothing:\n{text}"
    newest = steps[-1]
    if newest % SAVE_EVERY:  # not a durable save's step: only the keeper can have written it
        assert f"persisted step {newest} from host memory" in text, text
    return newest


def check_life(worker: Worker, losses: dict[int, str]) -> int:
    """Every loss the worker printed is the reference's, and its steps follow on from
    the one it started at without a gap. Returns its last returned step (or its start)."""
    start, _ = worker.started()
    returned = worker.returned()
    assert sorted(returned) == list(range(start + 1, start + 1 + len(returned))), returned
    wrong = {step: (loss, losses[step]) for step, loss in returned.items()
             if loss != losses[step]}
    assert not wrong, f"losses differ from the uninterrupted run's (got, expected): {wrong}"
    return max(returned, default=start)


def area_of(run: Path, memory_dir: Path) -> Path:
    """The memory area of rank 0 of a local run, under ``memory_dir``."""
    name = run_folder(ckpts.storage.open_storage(run).location).name
    return memory_dir / f"ckpts-{os.getuid()}" / name / "rank-00000"


def snapshots_in(area: Path) -> dict[int, Path]:
    """step -> slot folder of each snapshot in the area that has a marker."""
    found = {}
    for slot in sorted(area.glob("slot-*")):
        for marker in (MANIFEST, PENDING):
            if (slot / marker).is_file():
                found[json.loads((slot / marker).read_text())["step"]] = slot
                break
    return found


@dataclass(frozen=True)
class DeadTrainer:
    """A run whose trainer saved steps 1..7 (durable: step 5) and died without close(),
    with its keeper (killed first, so nothing was persisted): its snapshots of steps 6 and
    7, hashed, stay in host memory."""

    run: Path
    area: Path
    snapshots: dict[int, Path]  # step -> slot folder


@pytest.fixture(scope="module")
def dead_trainer_template(tmp_path_factory: pytest.TempPathFactory) -> DeadTrainer:
    """A real dead trainer, made once for the tests that copy it (dead_trainer)."""
    base = tmp_path_factory.mktemp("dead-trainer")
    memory_dir, run = base / "shm", base / "run"
    memory_dir.mkdir()
    worker = Worker(run, 7, SEED, memory_dir, base / "dead.log", pace=0.0, hold=True)
    try:
        worker.wait_for(lambda lines: "holding" in lines, START_TIMEOUT, "holding")
        area = area_of(run, memory_dir)
        deadline = time.monotonic() + KEPT_WITHIN
        while max(snapshots_in(area), default=None) != 7 or list(area.glob(f"*/{PENDING}")):
            assert time.monotonic() < deadline, f"never sealed: {list(area.rglob('*'))}"
            time.sleep(0.05)
        running = keepers(memory_dir)
        assert len(running) == 1, running
        os.kill(running[0], signal.SIGKILL)
        deadline = time.monotonic() + KEPT_WITHIN
        while keepers(memory_dir):
            assert time.monotonic() < deadline, "the keeper outlived SIGKILL"
            time.sleep(0.05)
        worker.kill()
    finally:
        worker.stop()
        for pid in keepers(memory_dir):
            os.kill(pid, signal.SIGKILL)
    snapshots = snapshots_in(area)
    assert {6, 7} <= set(snapshots), snapshots
    assert committed(run) == [5]
    return DeadTrainer(run, area, snapshots)


@pytest.fixture
def dead_trainer(dead_trainer_template: DeadTrainer, tmp_path: Path,
                 memory_dir: Path) -> DeadTrainer:
    """This test's own copy of the dead trainer's run and memory area (the area moved to
    the name of the run's new place)."""
    template = dead_trainer_template
    run = tmp_path / "run"
    shutil.copytree(template.run, run)
    area = area_of(run, memory_dir)
    for folder in (area.parent.parent, area.parent):
        folder.mkdir(mode=0o700)
    shutil.copytree(template.area, area)
    return DeadTrainer(run, area, {step: area / slot.name
                                   for step, slot in template.snapshots.items()})


def manager_of(run: str | Path, **options: Any) -> ckpts.CheckpointManager:
    """A manager as the worker makes it."""
    return ckpts.CheckpointManager(run, save=ckpts.Every(steps=SAVE_EVERY),
                                   memory=ckpts.Every(steps=1), keep=[ckpts.KeepLast(KEEP)],
                                   **options)


@dataclass(frozen=True)
class Restored:
    """What restore() returned, and the state it loaded into a fresh model and optimizer."""

    step: int | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rng: torch.Tensor  # the global RNG state right after restore()

    def assert_state_of(self, expected: dict[str, torch.Tensor]) -> None:
        """The tensors and the RNG are those of a reference step, bit for bit."""
        found = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for index, slots in self.optimizer.state_dict()["state"].items():
            found |= {f"optimizer.{index}.{k}": v for k, v in slots.items()
                      if isinstance(v, torch.Tensor)}
        found["rng"] = self.rng
        assert found.keys() == expected.keys()
        unequal = [key for key in found if not torch.equal(found[key], expected[key])]
        assert not unequal, f"differ from the reference: {unequal}"


def restore_fresh(run: Path, caplog: pytest.LogCaptureFixture, *, step: int | None = None,
                  then: Callable[[], None] = lambda: None) -> Restored:
    """A restarted trainer's restore(), into a fresh model and optimizer, then ``then()``,
    then close(). The test's own global RNG is left alone."""
    caplog.clear()
    with torch.random.fork_rng(), caplog.at_level(logging.INFO, logger="ckpts"):
        model, optimizer = build(0)
        with manager_of(run) as manager:
            restored = Restored(
                manager.restore(ckpts.TrainState(model=model, optimizer=optimizer), step=step),
                model, optimizer, torch.get_rng_state())
            then()
    return restored


@dataclass(frozen=True)
class Reference:
    losses: dict[int, str]
    tensors: dict[int, dict[str, torch.Tensor]]


_REFERENCES: dict[tuple[int, int], Reference] = {}


def reference_of(seed: int, steps: int = MAX_STEP) -> Reference:
    """The uninterrupted run's losses and states (computed once per seed)."""
    if (seed, steps) not in _REFERENCES:
        _REFERENCES[seed, steps] = Reference(*reference(seed, steps))
    return _REFERENCES[seed, steps]


# ---- SIGKILL and resume ---------------------------------------------------------------


def test_sigkill_at_random_instants_resumes_exactly_from_host_memory(
        tmp_path: Path, memory_dir: Path, workers: list[Worker]) -> None:
    """A trainer SIGKILLed (its whole process group) at seeded random instants, twice (the
    second time after resuming from host memory), loses nothing that save() returned:
    each time, within 30 s, its keeper has written a committed checkpoint at least as new
    as the last step whose save() returned, and exited; the restart resumes from host
    memory at exactly that step; and every loss of every life, up to the end, equals the
    uninterrupted run's bit for bit."""
    run = tmp_path / "run"
    losses = reference_of(SEED).losses
    rng = random.Random("memory tier: random kills")
    last = 0
    for life in range(KILLS):
        log = tmp_path / f"life-{life}.log"
        worker = Worker(run, MAX_STEP, SEED, memory_dir, log, hold=True)
        workers.append(worker)
        start, source = worker.started()
        assert start == last, worker.describe()
        assert source == ("memory" if life else "none"), worker.describe()
        kill_at_random(worker, rng, 3, 9)
        last = check_life(worker, losses)
        newest = wait_until_kept(run, memory_dir, last, log)
        assert ckpts.verify(run) == []
        last = newest  # the next life must resume here (it may be one step past a return)
    worker = Worker(run, MAX_STEP, SEED, memory_dir, tmp_path / "final.log", pace=0.0)
    workers.append(worker)
    worker.finish()
    start, source = worker.started()
    assert (start, source) == (last, "memory"), worker.describe()
    assert f"restored step {last} from host memory" in worker.log.read_text()
    assert check_life(worker, losses) == MAX_STEP
    assert committed(run)[-1] == MAX_STEP
    assert not run_folder(ckpts.storage.open_storage(run).location).exists()


def test_sigkill_on_s3_keeper_takes_over_the_lease(
        tmp_path: Path, memory_dir: Path, workers: list[Worker], s3_bucket: S3Bucket) -> None:
    """On S3, a SIGKILLed trainer's keeper takes over its lease at once (no 60 s wait for it
    to lapse): within 30 s the run holds a committed checkpoint at least as new as the last
    step whose save() returned; the restart resumes from host memory there and ends with
    the uninterrupted run's losses, bit for bit."""
    url, options = s3_bucket.url("run"), s3_bucket.storage_options
    losses = reference_of(SEED).losses
    log = tmp_path / "killed.log"
    worker = Worker(url, MAX_STEP, SEED, memory_dir, log, options=options, hold=True)
    workers.append(worker)
    kill_at_random(worker, random.Random("memory tier: s3 kill"), 6, 14)
    last = check_life(worker, losses)
    newest = wait_until_kept(url, memory_dir, last, log, options)
    assert ckpts.verify(url, storage_options=options) == []
    worker = Worker(url, MAX_STEP, SEED, memory_dir, tmp_path / "final.log", options=options,
                    pace=0.0)
    workers.append(worker)
    worker.finish()
    assert worker.started() == (newest, "memory"), worker.describe()
    assert check_life(worker, losses) == MAX_STEP
    assert committed(url, options)[-1] == MAX_STEP


def test_host_memory_wiped_resumes_exactly_from_the_run(
        tmp_path: Path, memory_dir: Path, workers: list[Worker]) -> None:
    """When host memory is gone after a crash (a reboot, another node), the restart resumes
    from the checkpoint the keeper persisted into the run, as exactly: same step, then the
    uninterrupted run's losses bit for bit."""
    run = tmp_path / "run"
    losses = reference_of(SEED).losses
    log = tmp_path / "killed.log"
    worker = Worker(run, MAX_STEP, SEED, memory_dir, log, hold=True)
    workers.append(worker)
    kill_at_random(worker, random.Random("memory tier: wiped"), 6, 14)
    last = check_life(worker, losses)
    newest = wait_until_kept(run, memory_dir, last, log)
    assert area_of(run, memory_dir).is_dir()  # the keeper left the snapshots for a restart
    shutil.rmtree(memory_dir / f"ckpts-{os.getuid()}")
    worker = Worker(run, MAX_STEP, SEED, memory_dir, tmp_path / "final.log", pace=0.0)
    workers.append(worker)
    worker.finish()
    assert worker.started() == (newest, "run"), worker.describe()
    assert "from host memory" not in worker.log.read_text()
    assert check_life(worker, losses) == MAX_STEP


def test_two_runs_on_one_host_never_mix_their_snapshots(
        tmp_path: Path, memory_dir: Path, workers: list[Worker]) -> None:
    """Two trainers of two runs (same folder name, different places) on one host, with
    different models, are SIGKILLed at once: each run gets its own newest state, and each
    restart resumes from host memory with its own run's state: its losses are its own
    reference's, bit for bit, never the other's."""
    seeds = {"a": 11, "b": 12}
    runs = {name: tmp_path / name / "run" for name in seeds}
    references = {name: reference_of(seed).losses for name, seed in seeds.items()}
    assert references["a"][1] != references["b"][1]  # a mix-up would show
    rng = random.Random("memory tier: two runs")
    # held at the end rather than closed: one may start (and finish) long before the other
    killed = {name: Worker(runs[name], MAX_STEP, seed, memory_dir, tmp_path / f"{name}.log",
                           hold=True) for name, seed in seeds.items()}
    workers.extend(killed.values())
    for worker in killed.values():
        worker.wait_for(lambda lines: sum(line.startswith("returned ") for line in lines) >= 5,
                        START_TIMEOUT, "5 returned steps")
        time.sleep(rng.uniform(0.0, 3 * PACE))
        worker.kill()
    newest = {}
    for name, worker in killed.items():
        last = check_life(worker, references[name])
        newest[name] = wait_until_kept(runs[name], memory_dir, last, worker.log)
    areas = {name: area_of(run, memory_dir) for name, run in runs.items()}
    assert areas["a"] != areas["b"] and all(area.is_dir() for area in areas.values())
    restarted = {name: Worker(runs[name], MAX_STEP, seed, memory_dir,
                              tmp_path / f"{name}-final.log", pace=0.0)
                 for name, seed in seeds.items()}
    workers.extend(restarted.values())
    for name, worker in restarted.items():
        worker.finish()
        assert worker.started() == (newest[name], "memory"), worker.describe()
        assert check_life(worker, references[name]) == MAX_STEP


# ---- snapshots that must not be restored -----------------------------------------------


def flip_last_byte(slot: Path) -> None:
    """Change one bit of the last tensor of the slot's model file, after its hashing."""
    assert (slot / MANIFEST).is_file()
    damaged = slot / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x01
    damaged.write_bytes(bytes(data))


def test_torn_snapshot_is_never_restored(dead_trainer: DeadTrainer,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot whose copy was cut short (its slot has no marker: SIGKILL during the
    copy) is never restored: restore() takes the older intact snapshot in host memory,
    with exactly that step's state (model, optimizer, RNG)."""
    for marker in (MANIFEST, PENDING):
        (dead_trainer.snapshots[7] / marker).unlink(missing_ok=True)
    restored = restore_fresh(dead_trainer.run, caplog)
    assert restored.step == 6, caplog.text
    assert "restored step 6 from host memory" in caplog.text
    restored.assert_state_of(reference_of(SEED).tensors[6])


def test_damaged_snapshot_is_skipped_for_the_older_one(dead_trainer: DeadTrainer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot whose bytes changed after it was hashed is skipped with a warning naming
    its slot, and restore() takes the newest intact state, the older snapshot (step 6,
    newer than the run's step 5), with exactly that step's state."""
    flip_last_byte(dead_trainer.snapshots[7])
    restored = restore_fresh(dead_trainer.run, caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(dead_trainer.snapshots[7]) in message for message in warnings), caplog.text
    assert restored.step == 6, caplog.text
    assert "restored step 6 from host memory" in caplog.text
    restored.assert_state_of(reference_of(SEED).tensors[6])


def test_damaged_snapshots_never_leak_into_the_state(dead_trainer: DeadTrainer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """When every snapshot in host memory is damaged and the run holds no checkpoint,
    restore() returns None (a fresh start), with a warning, and leaves the live model and
    optimizer exactly as they were built: no byte of a damaged snapshot gets in."""
    shutil.rmtree(dead_trainer.run / "step-00000005")
    assert committed(dead_trainer.run) == []
    for slot in dead_trainer.snapshots.values():
        flip_last_byte(slot)
    restored = restore_fresh(dead_trainer.run, caplog)
    assert restored.step is None, caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records), caplog.text
    with torch.random.fork_rng():
        fresh, _ = build(0)
    changed = [key for key, tensor in fresh.state_dict().items()
               if not torch.equal(restored.model.state_dict()[key], tensor)]
    assert not changed, f"bytes of a damaged snapshot were loaded into {changed}"
    assert restored.optimizer.state_dict()["state"] == {}


def test_restore_of_a_given_step_uses_the_run_and_drops_newer_snapshots(
        dead_trainer: DeadTrainer, caplog: pytest.LogCaptureFixture) -> None:
    """restore(step=k) loads step k from the run even though host memory holds newer
    steps, and drops those snapshots: the run's next state is k's, not memory's."""
    assert {6, 7} <= set(snapshots_in(dead_trainer.area))
    left: dict[int, Path] = {}
    restored = restore_fresh(dead_trainer.run, caplog, step=5,
                             then=lambda: left.update(snapshots_in(dead_trainer.area)))
    assert restored.step == 5, caplog.text
    assert "from host memory" not in caplog.text
    restored.assert_state_of(reference_of(SEED).tensors[5])
    assert left == {}, "the newer snapshots are still in host memory after restore(step=5)"
    assert committed(dead_trainer.run) == [5]


# ---- close(), room, arguments ---------------------------------------------------------


def test_close_makes_the_newest_snapshot_durable_and_frees_memory(
        tmp_path: Path, memory_dir: Path) -> None:
    """close() writes the newest snapshot into the run when no durable save took it (step 7
    with save=Every(steps=100)), with exactly step 7's state, removes the run's memory
    area and ends the keeper."""
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's setting: same kernels, same bits
    try:
        with torch.random.fork_rng():
            model, optimizer = build(SEED)
            state = ckpts.TrainState(model=model, optimizer=optimizer)
            manager = ckpts.CheckpointManager(run, save=ckpts.Every(steps=100),
                                              memory=ckpts.Every(steps=1))
            assert manager.restore(state) is None
            for step in range(1, 8):
                train_step(model, optimizer, step)
                assert manager.save(step, state) is None
            assert committed(run) == []
            assert area_of(run, memory_dir).is_dir()
            assert len(keepers(memory_dir)) == 1
            manager.close()
    finally:
        torch.set_num_threads(threads)
    assert committed(run) == [7]
    assert ckpts.verify(run) == []
    assert not run_folder(ckpts.storage.open_storage(run).location).exists()
    assert keepers(memory_dir) == []
    with torch.random.fork_rng():
        model, optimizer = build(0)
        with ckpts.CheckpointManager(run) as reader:
            restored = Restored(reader.restore(ckpts.TrainState(model=model, optimizer=optimizer)),
                                model, optimizer, torch.get_rng_state())
    assert restored.step == 7
    restored.assert_state_of(reference_of(SEED).tensors[7])


def test_too_small_memory_fails_before_training(small_disk: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """A tmpfs that cannot hold two snapshots of the state (48 MB for 2 x 40 MB) fails
    restore() and prepare() with InsufficientSpaceError saying what to change
    (CKPTS_MEMORY_DIR, --shm-size), never a SIGBUS later; nothing is written to the run
    and close() gives the memory back."""
    monkeypatch.setenv(MEMORY_DIR_ENV, str(small_disk))
    run = tmp_path / "run"
    model = torch.nn.Linear(2500, 4000)  # 40 MB of float32
    state = ckpts.TrainState(model=model)
    manager = ckpts.CheckpointManager(run, memory=ckpts.Every(steps=1))
    try:
        with pytest.raises(ckpts.InsufficientSpaceError) as raised:
            manager.restore(state)
        assert MEMORY_DIR_ENV in str(raised.value) and "--shm-size" in str(raised.value)
        with pytest.raises(ckpts.InsufficientSpaceError, match="--shm-size"):
            manager.prepare(state)
    finally:
        manager.close()
    assert not run.exists() or run_contents(run) == []
    assert keepers(small_disk) == []
    disk = os.statvfs(small_disk)
    assert disk.f_bfree * disk.f_frsize > 46 * 2**20, "close() left the memory allocated"
    model.weight.data.add_(1.0)  # the process goes on fine


def test_memory_needs_a_path_or_url_and_json_options(tmp_path: Path, memory_dir: Path) -> None:
    """memory= refuses a Storage object (the keeper must open the run itself) and storage
    options that are not plain JSON (they are sent to the keeper), at construction, with
    InvalidArgumentError, before anything is written."""
    run = tmp_path / "run"
    with pytest.raises(ckpts.InvalidArgumentError, match="path or URL"):
        ckpts.CheckpointManager(ckpts.storage.open_storage(run), memory=ckpts.Every(steps=1))
    with pytest.raises(ckpts.InvalidArgumentError, match="JSON"):
        ckpts.CheckpointManager("s3://bucket/run", memory=ckpts.Every(steps=1),
                                storage_options={"client_kwargs": {"config": object()}})
    assert not run.exists()
    assert list(memory_dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["symlink", "another user's"])
def test_unsafe_memory_folder_is_refused(tmp_path: Path, memory_dir: Path, kind: str) -> None:
    """A ckpts-<uid> folder that is a symbolic link or another user's (a shared /dev/shm is
    writable by all) is refused with a CheckpointError naming it; nothing is written to
    it, to where it points, or to the run."""
    parent = memory_dir / f"ckpts-{os.getuid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if kind == "symlink":
        parent.symlink_to(elsewhere)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        parent.mkdir(mode=0o700)
        os.chown(parent, os.getuid() + 4242, -1)
    run = tmp_path / "run"
    with torch.random.fork_rng():
        model, optimizer = build(SEED)
    manager = manager_of(run)
    with pytest.raises(ckpts.CheckpointError, match=re.escape(str(parent))):
        manager.restore(ckpts.TrainState(model=model, optimizer=optimizer))
    manager.close()
    assert list(elsewhere.iterdir()) == []
    assert parent.is_symlink() or list(parent.iterdir()) == []
    assert not run.exists() or run_contents(run) == []
    assert keepers(memory_dir) == []


def test_ls_shows_the_snapshots_held_in_host_memory(dead_trainer: DeadTrainer) -> None:
    """`ckpts ls RUN` lists the run's checkpoints, then says which steps this host holds in
    memory for it (marked as memory, not in the run) and where: the place to look, or to
    free, after a crash. A run with no snapshots in memory gets no such line."""
    from typer.testing import CliRunner

    from ckpts.cli import app

    shown = CliRunner().invoke(app, ["ls", str(dead_trainer.run)])
    assert shown.exit_code == 0, shown.output
    assert "in host memory" in shown.output and "not in the run" in shown.output
    assert re.search(r"rank 0: 7, 6\b", shown.output), shown.output
    assert str(dead_trainer.area.parent) in shown.output.replace("\n", "")
    shutil.rmtree(dead_trainer.area)
    again = CliRunner().invoke(app, ["ls", str(dead_trainer.run)])
    assert again.exit_code == 0 and "in host memory" not in again.output, again.output


def test_the_trainer_never_waits_for_a_store_slower_than_save(
        tmp_path: Path, memory_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With a store slower than save= asks (every commit held back until the test lets it
    go), every save() returns while the durable save of step 2 is still being written:
    the trainer waits for no store. Step 4's durable save waits its turn, step 6's takes
    its place (with a warning naming both), and once the store is free close() leaves the
    run with steps 2 and 6, exactly as trained."""
    from ckpts.storage import LocalStorage

    release = threading.Event()
    commit = LocalStorage.commit

    def slow_commit(self: LocalStorage, staged: Any, manifest: bytes) -> None:
        assert release.wait(60), "the test never let the store go"
        commit(self, staged, manifest)

    monkeypatch.setattr(LocalStorage, "commit", slow_commit)
    model, optimizer = build(SEED)
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    run = tmp_path / "run"
    manager = ckpts.CheckpointManager(run, save=ckpts.Every(steps=2), memory=ckpts.Every(steps=1))
    caplog.set_level(logging.INFO, logger="ckpts")
    try:
        manager.restore(state)
        for step in range(1, 7):
            train_step(model, optimizer, step)
            manager.save(step, state)
        assert committed(run) == [], "a save() waited for the store"
        expected = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    finally:
        release.set()
        manager.close()
    assert committed(run) == [2, 6]
    assert "durable save of step 4 is skipped" in caplog.text and "step 6's" in caplog.text
    loaded, _ = build(SEED)
    ckpts.load_weights(run / "step-00000006", loaded)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in expected.items())

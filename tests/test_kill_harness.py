"""SIGKILL at random instants: no committed checkpoint is lost, every listed one is intact.

Each trial runs ``kill_worker.py`` (a training loop that saves every step, sync
or async) and kills it with SIGKILL after a seeded random delay; one trial in three
then starts it again on the same run (it restores, goes on saving) and kills it
once more.
Then, in this process:

- every listed checkpoint verifies, and each step the worker printed as
  committed that ``KeepLast(3)`` still keeps is listed (the newest always);
- ``restore()`` returns the newest listed step, with that step's exact state
  (recomputed here by replaying the training from scratch);
- after one more save by a fresh manager, the run holds only ``step-*``
  checkpoints with a manifest (and the small ``.ckpts`` lock file): no ``.tmp-``,
  ``.trash-`` or ``.replaced-`` leftover of the killed saves.

CI runs 6 trials per mode. ``CKPTS_LONG=1`` adds 100 more per mode and writes a
summary to ``tests/.kill-harness-summary.json``::

    CKPTS_LONG=1 .venv/bin/pytest -q -m slow tests/test_kill_harness.py
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

import ckpts
from kill_worker import KEEP, build, mark, train_step

WORKER = str(Path(__file__).with_name("kill_worker.py"))
SUMMARY = Path(__file__).with_name(".kill-harness-summary.json")
LONG = os.environ.get("CKPTS_LONG") == "1"
CI_SEEDS = range(6)
LONG_SEEDS = range(1000, 1100)
MIN_DELAY, MAX_DELAY = 0.05, 1.2  # seconds between the worker's "ready" and the SIGKILL
READY_TIMEOUT = 120.0
PARALLEL_WORKERS = 2
SMALL_METADATA = 4096
# the metrics history grows by one short line a save (a trial makes at most a few hundred)
METADATA_LIMITS = {".ckpts-history.jsonl": 256 * 1024}
STEP_DIR = re.compile(r"^step-\d{8}$")
INTERRUPTED = (".tmp-", ".trash-", ".replaced-")


@dataclass
class Trial:
    """What one trial observed (recorded before its assertions, for the long-mode summary)."""

    mode: str
    seed: int
    kills: int = 0
    committed_printed: int = 0
    newest_printed: int | None = None
    listed_after_kill: list[int] = field(default_factory=list)
    checkpoints_verified: int = 0
    problems: list[str] = field(default_factory=list)
    interrupted_saves_found: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    passed: bool = False


@dataclass
class Killed:
    """One worker life: the step it restored, the steps it printed as committed."""

    ready_step: int
    committed: list[int]


def start_and_kill(run: Path, mode: str, seed: int, delay: float, log: Path, *,
                   worker: str = WORKER) -> Killed:
    """Start the worker (``kill_worker.py`` or one that speaks alike), SIGKILL it
    ``delay`` seconds after it printed ``ready``."""
    lines: list[str] = []
    ready = threading.Event()
    with open(log, "ab") as stderr, subprocess.Popen(
        [sys.executable, worker, str(run), mode, str(seed)],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
    ) as process:
        assert process.stdout is not None
        stdout = process.stdout

        def read() -> None:
            for line in stdout:
                lines.append(line.strip())
                if line.startswith("ready"):
                    ready.set()
            ready.set()  # EOF: the worker died on its own; the return code says how

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        ready.wait(READY_TIMEOUT)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        reader.join(timeout=60)
    assert process.returncode == -signal.SIGKILL, (
        f"the worker exited with {process.returncode} before the kill:\n{log.read_text()}"
    )
    assert lines and lines[0].startswith("ready "), lines
    committed = [int(line.split()[1]) for line in lines if line.startswith("committed ")]
    return Killed(ready_step=int(lines[0].split()[1]), committed=committed)


def replayed_state(seed: int, step: int) -> dict[str, torch.Tensor]:
    """The worker's model and optimizer tensors after ``step`` uninterrupted steps."""
    _, model, optimizer, progress = build(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's setting: same kernels, same bits
    try:
        for s in range(1, step + 1):
            train_step(model, optimizer, s)
    finally:
        torch.set_num_threads(threads)
    mark(model, progress, step)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, slots in optimizer.state_dict()["state"].items():
        tensors |= {f"optimizer.{index}.{k}": v for k, v in slots.items()}
    return tensors


def leftovers(run: Path) -> list[str]:
    """Entries of ``run`` other than committed checkpoints (holding exactly their manifest's
    files) and small ``.ckpts*`` metadata files."""
    found = []
    for entry in sorted(run.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and STEP_DIR.match(entry.name) \
                and (entry / "manifest.json").is_file():
            recorded = set(json.loads((entry / "manifest.json").read_text())["files"])
            extra = {p.name for p in entry.iterdir()} - recorded - {"manifest.json"}
            found += [f"{entry.name}/{name}" for name in sorted(extra)]
        elif not (entry.is_file() and entry.name.startswith(".ckpts")
                  and entry.stat().st_size < METADATA_LIMITS.get(entry.name, SMALL_METADATA)):
            found.append(entry.name)
    return found


def kill_lives(run: Path, mode: str, seed: int) -> list[Killed]:
    """Kill the worker once, or (one trial in three) restart it and kill it again."""
    rng = random.Random(f"{mode}-{seed}")
    lives = 2 if seed % 3 == 2 else 1
    return [start_and_kill(run, mode, seed, rng.uniform(MIN_DELAY, MAX_DELAY),
                           run.with_name(f"worker-{life}.stderr")) for life in range(lives)]


def check_run(run: Path, seed: int, lives: list[Killed], trial: Trial) -> None:
    """Check a killed run; fills ``trial`` as it goes."""
    printed: list[int] = []
    durable = 0  # the newest step known to be committed: printed, or restored by a worker
    for killed in lives:
        # a restarted worker resumes from the newest checkpoint, never before a durable one
        assert killed.ready_step >= durable
        assert all(s > killed.ready_step for s in killed.committed)
        printed += killed.committed
        durable = max([durable, killed.ready_step, *killed.committed])
    trial.kills = len(lives)
    trial.committed_printed = len(printed)
    trial.newest_printed = max(printed, default=None)
    on_disk = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
    trial.interrupted_saves_found = [n for n in on_disk if n.startswith(INTERRUPTED)]

    listed = [c.step for c in ckpts.CheckpointManager(run).checkpoints()]
    trial.listed_after_kill = listed
    if any(STEP_DIR.match(name) for name in on_disk):
        trial.problems = ckpts.verify(run)
        trial.checkpoints_verified += len(listed)
    assert trial.problems == []
    assert all(c.metrics["step_value"] == c.step
               for c in ckpts.CheckpointManager(run).checkpoints())
    if durable == 0:
        assert listed in ([], [1]), "only step 1 can be committed before anything is durable"
    else:
        assert durable in listed, f"step {durable} was durable, then lost: listed {listed}"
        # at most one save was past its durable point when the kill came
        assert listed[-1] in (durable, durable + 1), listed
        kept = range(max(1, listed[-1] - KEEP + 1), listed[-1] + 1)
        assert set(kept) <= set(listed), f"retention lost a kept step: {listed}"
        assert set(listed) <= set(range(1, listed[-1] + 1)), listed

    state, model, optimizer, progress = build(seed)
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(KEEP)]) as manager:
        restored = manager.restore(state)
        assert restored == (listed[-1] if listed else None)
        if restored is not None:
            assert progress.step == restored
            assert progress.recent == tuple(range(max(1, restored - 2), restored + 1))
            assert int(model.step_count) == restored
            expected = replayed_state(seed, restored)
            got = {f"model.{k}": v for k, v in model.state_dict().items()}
            for index, slots in optimizer.state_dict()["state"].items():
                got |= {f"optimizer.{index}.{k}": v for k, v in slots.items()}
            assert got.keys() == expected.keys()
            mismatched = [k for k in expected if not torch.equal(got[k], expected[k])]
            assert not mismatched, f"step {restored} restored wrong values for {mismatched}"
        following = (restored or 0) + 1
        manager.save(following, state, metrics={"step_value": float(following)})
    after = [c.step for c in ckpts.CheckpointManager(run).checkpoints()]
    assert after == list(range(max(1, following - KEEP + 1), following + 1))
    assert ckpts.verify(run) == []
    trial.checkpoints_verified += len(after)
    trial.leftovers = leftovers(run)
    assert trial.leftovers == []
    trial.passed = True


class KillScheduler:
    """Runs the trials' worker lives on threads, a few tests ahead of the test checking them.

    Starting a worker costs ~4 s of CPU (importing torch), so two run at a time on
    this 2-core machine while the main thread checks earlier trials. The kill
    delays stay as seeded; only the CPU contention differs from a serial run.
    """

    def __init__(self, order: list[tuple[str, int]], factory: pytest.TempPathFactory) -> None:
        self.order = order
        self.factory = factory
        self.pool = ThreadPoolExecutor(max_workers=PARALLEL_WORKERS)
        self.jobs: dict[tuple[str, int], Future[tuple[Path, list[Killed]]]] = {}

    def lives(self, mode: str, seed: int) -> tuple[Path, list[Killed]]:
        """The run directory and worker lives of one trial, once they are all killed."""
        key = (mode, seed)
        self._submit(key)
        position = self.order.index(key) if key in self.order else len(self.order)
        for ahead in self.order[position + 1 : position + 1 + PARALLEL_WORKERS]:
            self._submit(ahead)
        return self.jobs[key].result()

    def _submit(self, key: tuple[str, int]) -> None:
        if key not in self.jobs:
            run = self.factory.mktemp(f"kill-{key[0]}-{key[1]}") / "run"
            self.jobs[key] = self.pool.submit(lambda: (run, kill_lives(run, *key)))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def scheduler(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillScheduler]:
    """One scheduler for the module, ordered like the selected tests."""
    order = [(item.callspec.params["mode"], item.callspec.params["seed"])
             for item in request.session.items
             if isinstance(item, pytest.Function) and item.module is sys.modules[__name__]
             and hasattr(item, "callspec") and "seed" in item.callspec.params
             and (LONG or item.get_closest_marker("slow") is None)]
    kills = KillScheduler(order, tmp_path_factory)
    yield kills
    kills.close()


def trial(scheduler: KillScheduler, mode: str, seed: int) -> None:
    run, lives = scheduler.lives(mode, seed)
    observed = Trial(mode=mode, seed=seed)
    try:
        check_run(run, seed, lives, observed)
    finally:
        _RESULTS.append(observed)
    shutil.rmtree(run.parent)  # passed: free the disk (a failed trial's run stays)


_RESULTS: list[Trial] = []


@pytest.mark.parametrize("seed", CI_SEEDS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_a_random_instant_loses_no_committed_checkpoint(
    scheduler: KillScheduler, mode: str, seed: int
) -> None:
    trial(scheduler, mode, seed)


@pytest.fixture(scope="module")
def long_summary() -> Iterator[None]:
    """After the long trials, write what they observed (read by the docs)."""
    start = time.monotonic()
    first = len(_RESULTS)
    yield
    trials = _RESULTS[first:]
    if not trials:
        return
    summary = {
        "command": "CKPTS_LONG=1 .venv/bin/pytest -q -m slow tests/test_kill_harness.py",
        "trials": len(trials),
        "trials_by_mode": {m: sum(t.mode == m for t in trials) for m in ("sync", "async")},
        "kills": sum(t.kills for t in trials),
        "saves_printed_committed": sum(t.committed_printed for t in trials),
        "trials_whose_last_kill_hit_a_save": sum(bool(t.interrupted_saves_found)
                                                 for t in trials),
        "checkpoints_verified": sum(t.checkpoints_verified for t in trials),
        "verify_problems": sum(len(t.problems) for t in trials),
        "leftovers_found": sum(len(t.leftovers) for t in trials),
        "failed_trials": [f"{t.mode}-{t.seed}" for t in trials if not t.passed],
        "seconds": round(time.monotonic() - start, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ckpts": ckpts.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "per_trial": [asdict(t) for t in trials],
    }
    SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nkill harness: {json.dumps({k: v for k, v in summary.items() if k != 'per_trial'})}")


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="set CKPTS_LONG=1 for the long kill harness")
@pytest.mark.parametrize("seed", LONG_SEEDS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_long_run_loses_no_committed_checkpoint(
    scheduler: KillScheduler, mode: str, seed: int, long_summary: None
) -> None:
    trial(scheduler, mode, seed)

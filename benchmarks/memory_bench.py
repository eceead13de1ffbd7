"""The memory tier (``memory=``): what save() blocks for, against the copy floor, and goodput.

Two measurements of ``CheckpointManager(run, save=Every(steps=5), memory=Every(steps=1),
keep=[KeepLast(2)])`` on a transformer-like fp32 state with AdamW (``--size``, default
``medium``: ~55 M params, 0.66 GB):

1. **Blocking time per step.** Each step updates every tensor in place (an optimizer's
   step, so each snapshot copies new values), sleeps ``--sleep`` seconds (the
   accelerator's step), then times the copy floor, ``state.snapshot()`` alone (save()'s
   Python walk of the state: it shows what waiting for the GIL costs) and ``save(step,
   state)``, in that order. The floor is ``torch._foreach_copy_`` of the state into
   buffers allocated and touched once: what any snapshot that is complete when save()
   returns must do. Reported: save()'s median, min and max over the steps, the median of
   the per-step ratios save()/floor (the target's) and the ratio of the medians, the
   medians over durable steps (every 5th: the snapshot plus starting the background checkpoint) and
   memory-only steps, and what went on around each step more than twice the median.
   Once with the run on the local disk, once on a moto S3 server in a child process
   (``--no-s3`` skips it). After each, a fresh manager restores the run's newest
   checkpoint into a copy of the state and checks it bit-exact.
2. **Goodput.** ``--loop-steps`` training steps, each an in-place update of the state
   plus ~``--step`` seconds of work on the training thread, then ``save()``: the wall
   time with memory=Every(1)+save=Every(5), with memory=Every(4)+save=Every(5) and, for
   reference, with the same durable saves without the memory tier (async_save=True,
   save=Every(5)) and with the copy floor in place of save() (the lower bound of any
   every-step snapshot), against the same loop without checkpointing, interleaved (every
   loop once per round, order shuffled per round) over ``--reps`` rounds. The work is a
   calibrated loop of 1024x1024 fp32 matmuls (it needs the cores, as the background
   hashing and writing do: the default) or ``time.sleep`` (which hides that
   competition): ``--work matmul``, ``sleep`` or ``matmul,sleep``. Also reported: the
   overhead counting ``close()`` (which waits for the durable save still in flight: an
   upper bound). The JSON also has each loop's CPU seconds (this process and its keeper:
   OpenMP threads' spin-waits included, so only a rough measure of work).

Each loop gets a fresh run and manager; ``restore()`` (which allocates three snapshot slots
in shared memory and starts the keeper process), the keeper's start (until it is idle)
and ``close()`` (which waits for the durable save in flight) are timed apart from the
steps. The snapshots go to a temporary folder under /dev/shm (``CKPTS_MEMORY_DIR``),
removed at the end; every manager is closed, and no keeper process is left.

Run: ``python -m benchmarks.memory_bench [--size medium] [--steps 30] [--json]``, or
``make bench-memory``. Writes ``benchmarks/results/memory-<timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import ckpts
from benchmarks import _measure as ms
from benchmarks import _workloads as wl
from benchmarks._measure import log
from benchmarks.s3_bench import S3Bench, moto_server

TITLE = "Memory tier (memory=): save() blocking time against the copy floor, and goodput"
SAVE_EVERY = 5
TARGETS = {"local": 1.3, "s3": 1.5}  # blocking median / copy-floor median (the issue's)
GOODPUT_TARGET = 0.05  # overhead of memory=Every(1)+save=Every(5) against no checkpointing
MATMUL = 1024  # the side of the work's square matmuls
SLOWEST = 6  # slow steps described, at most
SHM = Path("/dev/shm")
NOTES = [
    "The copy floor is torch._foreach_copy_ of every tensor into buffers allocated and "
    "touched before the loop, timed right before each save() in the same step: the least "
    "any snapshot that is complete when save() returns can block for.",
    "The target is checked on the median of the per-step ratios save()/floor (each pair "
    "measured back to back, as BENCHMARKS.md asks). The ratio of the two medians is shown "
    "too; when other tenants load the machine for part of the run, both times are "
    "bimodal (a copy takes ~65 ms here when quiet, ~500 ms when not) and the two medians "
    "can fall in different modes.",
    "save() with memory= copies the state into a preallocated slot in /dev/shm and writes "
    "a small JSON marker; hashing (a sealing thread) and, every 5th step, the durable "
    "checkpoint (a writer thread, from the slot) run in the background, on the same 2 "
    "cores as the training thread.",
    "A durable step's save() also hands its slot to the background writer; 'durable "
    "save in flight' in the notes on slow steps says an earlier one was still being "
    "written. restore() allocates three slots; a fourth is allocated on the training "
    "thread the first time a durable save must wait for a slower store while another "
    "one is written ('allocated N new slot(s)').",
    "The keeper process imports torch only once its trainer has died; every loop starts "
    "once it is idle all the same, and its start is reported apart ('keeper start').",
    "'others' is the share of the machine's CPU used by processes other than this one "
    "and its children (keeper, moto) while the timed code ran: this machine is shared.",
    "moto keeps S3 objects in this machine's memory and answers on loopback: its times "
    "are not S3's.",
]


# ---------------------------------------------------------------- the machine


class CpuClock:
    """CPU time (clock ticks) of the whole machine and of this process with its children,
    from /proc: to tell how much of the machine other processes used meanwhile."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1

    def read(self) -> tuple[int, int]:
        """(busy ticks of all CPUs, ticks of this process, its threads and children)."""
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        own = _ticks(Path("/proc/self/stat"), children=True)
        for pid in children():
            own += _ticks(Path(f"/proc/{pid}/stat"), children=False)
        return busy, own

    @staticmethod
    def others(start: tuple[int, int], end: tuple[int, int]) -> float:
        """CPU seconds that other processes used between two reads."""
        return max(0, (end[0] - start[0]) - (end[1] - start[1])) / os.sysconf("SC_CLK_TCK")


def _ticks(stat: Path, *, children: bool) -> int:
    """utime + stime (+ cutime + cstime: waited-for children) of /proc/<pid>/stat."""
    try:
        text = stat.read_text()
    except OSError:  # the process is gone
        return 0
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)"
    values = [int(v) for v in fields[11:15]]  # utime, stime, cutime, cstime
    return sum(values) if children else values[0] + values[1]


def children() -> list[int]:
    """The pids of this process's live children (the keepers, the moto server)."""
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == me:
            found.append(int(entry.name))
    return found


def keepers() -> list[int]:
    """The pids of this process's keeper children still running."""
    alive = []
    for pid in children():
        with contextlib.suppress(OSError):
            if b"ckpts._run.keeper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
    return alive


def settle_keeper(limit: float = 30.0) -> dict[str, float]:
    """Wait until the keeper children have used no CPU for half a second: a keeper spends
    its first seconds importing torch, on the cores the timed loop would use. Returns the
    seconds waited and the CPU seconds the keepers have used (their start); after half a
    second when no keeper runs (no memory=)."""
    started = time.perf_counter()
    previous, quiet = -1, 0
    while time.perf_counter() - started < limit:
        pids = keepers()
        if not pids and time.perf_counter() - started > 0.5:
            break
        used = sum(_ticks(Path(f"/proc/{pid}/stat"), children=False) for pid in pids)
        quiet = quiet + 1 if pids and used == previous else 0
        if quiet >= 5:
            break
        previous = used
        time.sleep(0.1)
    cpu = sum(_ticks(Path(f"/proc/{pid}/stat"), children=False) for pid in keepers())
    return {"waited_s": time.perf_counter() - started, "cpu_s": cpu / os.sysconf("SC_CLK_TCK")}


class Window:
    """Over a block: wall seconds, CPU seconds of this process and its children (``own``)
    and the share of the machine's CPUs that other processes used (``others``)."""

    def __init__(self, clock: CpuClock) -> None:
        self.clock = clock
        self.seconds = self.own = self.others = 0.0

    def __enter__(self) -> Window:
        self._cpu = self.clock.read()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
        end = self.clock.read()
        used = self.clock.others(self._cpu, end)
        self.own = (end[1] - self._cpu[1]) / os.sysconf("SC_CLK_TCK")
        self.others = min(1.0, used / (self.seconds * self.clock.cores)) if self.seconds else 0.0


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextlib.contextmanager
def ckpts_warnings() -> Iterator[list[str]]:
    """What the ckpts logger says at WARNING and above inside the block (a skipped durable
    save, a failed hash, ...)."""
    found: list[str] = []
    handler = _Collect(found)
    logging.getLogger("ckpts").addHandler(handler)
    try:
        yield found
    finally:
        logging.getLogger("ckpts").removeHandler(handler)


def sources() -> dict[str, str]:
    """A hash of each memory-tier source file measured (ckpts is developed meanwhile)."""
    out = {}
    for module in ("ckpts._run.memory", "ckpts._run.host_memory", "ckpts._run.keeper",
                   "ckpts._run.manager", "ckpts.storage._shm"):
        path = importlib.import_module(module).__file__
        if path is not None:
            out[module] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return out


@contextlib.contextmanager
def memory_dir() -> Iterator[Path]:
    """A temporary folder on /dev/shm (real shared memory) as CKPTS_MEMORY_DIR."""
    folder = Path(tempfile.mkdtemp(prefix="ckpts-memory-bench-", dir=SHM))
    previous = os.environ.get("CKPTS_MEMORY_DIR")
    os.environ["CKPTS_MEMORY_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("CKPTS_MEMORY_DIR", None)
        else:
            os.environ["CKPTS_MEMORY_DIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- the state and its step


@dataclass
class Training:
    """The state, its in-place update, the copy floor and the step's work."""

    w: wl.Workload
    tensors: list[torch.Tensor]
    floats: list[torch.Tensor]
    buffers: list[torch.Tensor]
    matmuls: int = 0  # per step, once calibrated
    operands: tuple[torch.Tensor, ...] = field(default=(), repr=False)  # a, b, out

    @classmethod
    def of(cls, size: str) -> Training:
        w = wl.build(size)
        tensors = list(w.flat().values())
        buffers = [torch.empty_like(t).fill_(0) for t in tensors]  # allocated and touched
        return cls(w, tensors, [t for t in tensors if t.is_floating_point()], buffers)

    @property
    def state(self) -> ckpts.TrainState:
        return ckpts.TrainState(model=self.w.model, optimizer=self.w.optimizer)

    def update(self) -> None:
        """New values in every tensor, in place (as an optimizer step writes them)."""
        with torch.no_grad():
            torch._foreach_add_(self.floats, 1e-6)

    def floor(self) -> None:
        """The copy floor: every tensor into its preallocated buffer."""
        with torch.no_grad():
            torch._foreach_copy_(self.buffers, self.tensors)

    def calibrate(self, seconds: float) -> float:
        """Set how many matmuls make ``seconds`` of work on this machine when it is quiet;
        returns one matmul's time (the fastest of a few: other tenants only slow it)."""
        a, b = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
        out = torch.empty(MATMUL, MATMUL)
        torch.mm(a, b, out=out)
        times = []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(5):
                torch.mm(a, b, out=out)
            times.append((time.perf_counter() - started) / 5)
        one = min(times)
        self.matmuls = max(1, round(seconds / one))
        self.operands = (a, b, out)
        return one

    def work(self, kind: str, seconds: float) -> None:
        """The step's work on the training thread: matmuls, or a sleep."""
        if kind == "sleep":
            time.sleep(seconds)
            return
        a, b, out = self.operands
        for _ in range(self.matmuls):
            torch.mm(a, b, out=out)


def memory_manager(where: str | Path, memory_every: int,
                   options: Mapping[str, Any] | None) -> ckpts.CheckpointManager:
    return ckpts.CheckpointManager(where, save=ckpts.Every(steps=SAVE_EVERY),
                                   memory=ckpts.Every(steps=memory_every),
                                   keep=[ckpts.KeepLast(2)], storage_options=options)


# ---------------------------------------------------------------- 1. blocking time


def area_files(shm: Path, name: str) -> int:
    """How many slots of the memory areas under ``shm`` hold a file called ``name``
    (``pending.json``: a snapshot not yet hashed), or slot folders with ``name`` = ''."""
    if not name:
        return len(list(shm.glob("ckpts-*/*/rank-*/slot-*")))
    return len(list(shm.glob(f"ckpts-*/*/rank-*/slot-*/{name}")))


def durable_in_flight() -> bool:
    """Whether a durable save's writer thread (named ckpts-save-<step>) is running."""
    return any(t.name.startswith("ckpts-save-") for t in threading.enumerate())


def blocking_phase(t: Training, where: str | Path, options: Mapping[str, Any] | None,
                   steps: int, sleep: float, shm: Path, clock: CpuClock) -> dict[str, Any]:
    """``steps`` steps of update, sleep, copy floor, save(); every step's times."""
    state = t.state
    manager = memory_manager(where, 1, options)
    records: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        manager.restore(state)  # allocates three slots, starts the keeper
        setup = time.perf_counter() - started
        keeper = settle_keeper()
        for step in range(1, steps + 1):
            t.update()
            time.sleep(sleep)
            before = {"durable_in_flight": durable_in_flight(),
                      "unsealed": area_files(shm, "pending.json"),
                      "slots": area_files(shm, "")}
            with Window(clock) as window:
                started = time.perf_counter()
                t.floor()
                floor = time.perf_counter() - started
                started = time.perf_counter()
                state.snapshot()  # save()'s walk of the state alone (Python: needs the GIL)
                walk = time.perf_counter() - started
                started = time.perf_counter()
                manager.save(step, state)
                blocked = time.perf_counter() - started
            records.append({"step": step, "durable": step % SAVE_EVERY == 0, "floor": floor,
                            "snapshot": walk, "save": blocked, **before,
                            "slots_allocated": area_files(shm, "") - before["slots"],
                            "others": round(window.others, 3)})
        closing = time.perf_counter()
    finally:
        manager.close()
    return {"setup_s": setup, "keeper": keeper, "close_s": time.perf_counter() - closing,
            "steps": records}


def check_restore(t: Training, where: str | Path, options: Mapping[str, Any] | None,
                  step: int) -> float:
    """Restore the run's newest checkpoint into a scrambled copy of the state with a fresh
    manager (no memory=); raises unless it is ``step``, bit-exact. Returns its seconds."""
    target = wl.restore_target(t.w)
    manager = ckpts.CheckpointManager(where, storage_options=options)
    try:
        started = time.perf_counter()
        restored = manager.restore(ckpts.TrainState(model=target.model,
                                                    optimizer=target.optimizer))
        seconds = time.perf_counter() - started
    finally:
        manager.close()
    bad = wl.mismatches(wl.fingerprint(t.w), wl.fingerprint(target))
    if restored != step or bad:
        raise RuntimeError(f"{where}: restored step {restored} (expected {step}), "
                           f"{len(bad)} tensors differ: {bad[:5]}")
    return seconds


def summarize_blocking(result: dict[str, Any], target: float) -> dict[str, Any]:
    records = result["steps"]
    saves = [r["save"] for r in records]
    floors = [r["floor"] for r in records]
    floor = statistics.median(floors)
    worst = max(records, key=lambda r: r["save"])

    def part(durable: bool) -> dict[str, Any] | None:
        chosen = [r for r in records if r["durable"] == durable]
        if not chosen:
            return None
        return {"steps": len(chosen), "median": statistics.median(r["save"] for r in chosen),
                "floor_median": statistics.median(r["floor"] for r in chosen),
                "paired_ratio": statistics.median(r["save"] / r["floor"] for r in chosen)}

    paired = statistics.median(r["save"] / r["floor"] for r in records)
    return {"save": ms.Series(saves).summary(), "floor": ms.Series(floors).summary(),
            "snapshot": ms.Series([r["snapshot"] for r in records]).summary(),
            "ratio": statistics.median(saves) / floor, "paired_ratio": paired,
            "durable": part(True), "memory_only": part(False), "worst_step": worst,
            "target": target, "pass": paired <= target,
            "others": statistics.median(r["others"] for r in records)}


def causes(record: Mapping[str, Any]) -> list[str]:
    """What a step's save() may have waited for, as recorded around it."""
    found = ["durable step"] if record["durable"] else []
    if record["durable"] and record["durable_in_flight"]:
        found.append("the previous durable save still in flight")
    elif record["durable_in_flight"]:
        found.append("durable save in flight")
    if record["slots_allocated"]:
        found.append(f"allocated {record['slots_allocated']} new slot(s)")
    if record["unsealed"] > 1:
        found.append(f"{record['unsealed']} snapshots not yet hashed")
    if record["step"] == 1:
        found.append("first save")
    found.append(f"floor {1e3 * record['floor']:.0f} ms, state.snapshot() alone "
                 f"{1e3 * record['snapshot']:.0f} ms, others {100 * record['others']:.0f}%")
    return found


# ---------------------------------------------------------------- 2. goodput


NONE, EVERY_STEP = "no checkpointing", "memory=Every(1), save=Every(5)"
FLOOR = "copy floor every step, instead of save() (lower bound)"


def async_manager(where: Path) -> ckpts.CheckpointManager:
    return ckpts.CheckpointManager(where, save=ckpts.Every(steps=SAVE_EVERY), async_save=True,
                                   keep=[ckpts.KeepLast(2)])


# each goodput loop's manager (made for a fresh run folder), or None: none
LOOPS: dict[str, Callable[[Path], ckpts.CheckpointManager] | None] = {
    NONE: None,
    EVERY_STEP: lambda where: memory_manager(where, 1, None),
    "memory=Every(4), save=Every(5)": lambda where: memory_manager(where, 4, None),
    # the same durable saves without the memory tier: what the snapshots cost on top
    "async_save=True, save=Every(5), no memory= (reference)": async_manager,
    FLOOR: None,
}


def training_loop(t: Training, kind: str, step_s: float, steps: int,
                  save: Callable[[int], object] | None, clock: CpuClock) -> dict[str, Any]:
    """Wall seconds of ``steps`` steps (update, work, ``save(step)``), and each save's
    blocking time."""
    blocked = []
    with Window(clock) as window:
        for step in range(1, steps + 1):
            t.update()
            t.work(kind, step_s)
            if save is not None:
                started = time.perf_counter()
                save(step)
                blocked.append(time.perf_counter() - started)
    return {"wall": window.seconds, "cpu": window.own, "others": round(window.others, 3),
            "blocked": blocked}


def goodput_phase(t: Training, kinds: Sequence[str], step_s: float, steps: int, reps: int,
                  workdir: Path, clock: CpuClock
                  ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every loop once per round (order shuffled), ``reps`` rounds, per kind of work."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    state = t.state

    def copy_floor(step: int) -> None:
        t.floor()

    for kind in kinds:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LOOPS}
        training_loop(t, kind, step_s, 2, None, clock)  # untimed warm-up
        for rep in range(reps):
            order = list(LOOPS)
            random.Random(rep).shuffle(order)
            for name in order:
                make, folder = LOOPS[name], workdir / f"goodput-{kind}-{rep}"
                ms._settle()  # untimed: the previous loop's dirty pages are flushed
                manager = make(folder) if make is not None else None
                save: Callable[[int], object] | None = copy_floor if name == FLOOR else None
                try:
                    setup, keeper = 0.0, None
                    if manager is not None:
                        started = time.perf_counter()
                        manager.restore(state)  # memory=: allocates 2 slots, the keeper
                        manager.prepare(state)  # async_save: its staging buffers
                        setup = time.perf_counter() - started
                        keeper = settle_keeper()
                        save = functools.partial(manager.save, state=state)
                    record = training_loop(t, kind, step_s, steps, save, clock)
                    started = time.perf_counter()
                finally:
                    if manager is not None:
                        manager.close()
                record.update(setup_s=setup, keeper=keeper,
                              close_s=time.perf_counter() - started)
                runs[name].append(record)
                shutil.rmtree(folder, ignore_errors=True)
            log(f"  goodput ({kind}) round {rep + 1}/{reps}: " + ", ".join(
                f"{n.split(',')[0]} {runs[n][-1]['wall']:.2f}s" for n in LOOPS))
        out[kind] = runs
    return out


def summarize_goodput(runs: Mapping[str, list[dict[str, Any]]], steps: int
                      ) -> dict[str, Any]:
    base = [r["wall"] for r in runs[NONE]]
    base_cpu = [r["cpu"] for r in runs[NONE]]
    step_s = statistics.median(base) / steps
    rows: dict[str, Any] = {}
    for name, records in runs.items():
        walls = [r["wall"] for r in records]
        row: dict[str, Any] = {"wall": ms.Series(walls).summary(), "step_s": step_s,
                               "cpu": ms.Series([r["cpu"] for r in records]).summary(),
                               "others": statistics.median(r["others"] for r in records)}
        if name != NONE:
            overhead = [w / b - 1 for w, b in zip(walls, base, strict=True)]
            # the durable save still in flight at the end, paid by close(): an upper bound
            drained = [(r["wall"] + r["close_s"]) / b - 1
                       for r, b in zip(records, base, strict=True)]
            extra_cpu = [(r["cpu"] - c) / steps for r, c in zip(records, base_cpu, strict=True)]
            blocked = [s for r in records for s in r["blocked"]]
            row.update(overhead=ms.Series(overhead).summary(),
                       overhead_with_close=ms.Series(drained).summary(),
                       extra_cpu_per_step=ms.Series(extra_cpu).summary(),
                       blocked=ms.Series(blocked).summary(),
                       setup_s=statistics.median(r["setup_s"] for r in records),
                       close_s=statistics.median(r["close_s"] for r in records))
        rows[name] = row
    others = [r["others"] for records in runs.values() for r in records]
    floors = [s for r in runs[FLOOR] for s in r["blocked"]]
    return {"loops": rows, "step_s": step_s,
            "floor": ms.Series(floors).summary(),
            "floor_share": statistics.median(floors) / step_s,
            # how much the loop without checkpointing varied from round to round: an
            # overhead smaller than this is not resolved by the run
            "noise": (max(base) - min(base)) / statistics.median(base),
            "others_range": [min(others), max(others)]}


# ---------------------------------------------------------------- output


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _span(summary: Mapping[str, Any]) -> str:
    return (f"{_ms(summary['median'])} [{_ms(summary['min'])}-{_ms(summary['max'])}]")


def _pct(summary: Mapping[str, Any]) -> str:
    return (f"{100 * summary['median']:+.1f}% "
            f"[{100 * summary['min']:+.1f} to {100 * summary['max']:+.1f}]")


def markdown(result: dict[str, Any]) -> str:
    plan, info = result["plan"], result["info"]
    lines = [f"# {TITLE}", "", f"Machine: {wl.machine_line(result['machine'])}", "",
             f"State: {plan['size']}, {info['params'] / 1e6:.1f} M fp32 params + AdamW, "
             f"{info['tensors']} tensors, {info['state_bytes'] / 1e9:.2f} GB. Snapshots in "
             f"{info['memory_fs']}; local run on {info['run_fs']}.", ""]
    lines += [f"## save() blocking per step: memory=Every(1), save=Every({SAVE_EVERY}), "
              f"{plan['steps']} steps of in-place update + sleep {plan['sleep']} s", "",
              "| run | save() median [min-max] | copy floor median [min-max] | "
              "save() / floor, per-step median (target) | median / floor median | durable "
              "steps: median (per-step ratio) | memory-only steps: median (per-step ratio) | "
              "worst step | others |", "|---|---|---|---|---|---|---|---|---|"]
    for run, b in result["blocking"].items():
        s = b["summary"]
        d, m, worst = s["durable"], s["memory_only"], s["worst_step"]
        lines.append(
            f"| {run} | {_span(s['save'])} | {_span(s['floor'])} | "
            f"**{s['paired_ratio']:.2f}x** (<= {s['target']}x: "
            f"{'PASS' if s['pass'] else 'FAIL'}) | {s['ratio']:.2f}x | "
            + (f"{_ms(d['median'])} ({d['paired_ratio']:.2f}x, n={d['steps']})" if d else "-")
            + " | " + (f"{_ms(m['median'])} ({m['paired_ratio']:.2f}x, n={m['steps']})"
                       if m else "-")
            + f" | step {worst['step']}: {_ms(worst['save'])} | {100 * s['others']:.0f}% |")
    lines += ["", "| run | state.snapshot() alone (save()'s Python walk of the state), "
              "median [min-max] | restore() before the loop (3 slots, starts the keeper) | "
              "keeper start (until idle; CPU) | close() after the loop (drain) | "
              "restore check (fresh manager) |", "|---|---|---|---|---|---|"]
    for run, b in result["blocking"].items():
        lines.append(f"| {run} | {_span(b['summary']['snapshot'])} | {_ms(b['setup_s'])} | "
                     f"{_ms(b['keeper']['waited_s'])}; {b['keeper']['cpu_s']:.2f} CPU s | "
                     f"{_ms(b['close_s'])} | step {plan['steps']} bit-exact in "
                     f"{_ms(b['restore_check_s'])} |")
    lines += ["", f"Steps whose save() blocked more than twice the median (the {SLOWEST} "
              "slowest), and what was going on:", ""]
    for run, b in result["blocking"].items():
        median = b["summary"]["save"]["median"]
        slow = sorted((r for r in b["steps"] if r["save"] > 2 * median),
                      key=lambda r: r["save"], reverse=True)
        lines.append(f"- {run}: " + ("; ".join(
            f"step {r['step']} {_ms(r['save'])} ({', '.join(causes(r))})"
            for r in sorted(slow[:SLOWEST], key=lambda r: r["step"])) or "none")
            + (f"; and {len(slow) - SLOWEST} more" if len(slow) > SLOWEST else ""))
    lines += ["", "ckpts warnings during the loops:", ""]
    for run, warned in [*((f"blocking, {run}", b["warnings"])
                          for run, b in result["blocking"].items()),
                        ("goodput", info.get("goodput_warnings", []))]:
        lines.append(f"- {run}: " + (f"{len(warned)}, e.g. {warned[0]!r}" if warned
                                     else "none"))
    for kind, g in result["goodput"].items():
        work = (f"{plan['matmuls']} matmuls {MATMUL}x{MATMUL} (calibrated to "
                f"{plan['step_s']} s)" if kind == "matmul" else f"sleep {plan['step_s']} s")
        lines += ["", f"## Goodput ({kind}): {plan['loop_steps']} steps of in-place update "
                  f"+ {work}, {plan['reps']} interleaved rounds", "",
                  "| checkpointing | wall median [min-max] | per step | overhead vs none, "
                  "median [min-max] | with close() (drain) | save() blocking median "
                  "[min-max] | restore() / close() (untimed) | others |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in g["loops"].items():
            wall = row["wall"]
            per_step = wall["median"] / plan["loop_steps"]
            target = " (target <= 5%)" if name == EVERY_STEP else ""
            lines.append(
                f"| {name} | {wall['median']:.2f} s [{wall['min']:.2f}-{wall['max']:.2f}] | "
                f"{_ms(per_step)} | "
                + (f"{_pct(row['overhead'])}{target}" if "overhead" in row else "-") + " | "
                + (_pct(row["overhead_with_close"]) if "overhead" in row else "-") + " | "
                + (_span(row["blocked"]) if "blocked" in row else "-") + " | "
                + (f"{_ms(row['setup_s'])} / {_ms(row['close_s'])}" if "setup_s" in row
                   else "-") + f" | {100 * row['others']:.0f}% |")
        if g["noise"] > GOODPUT_TARGET:
            low, high = g["others_range"]
            lines += ["", f"**Noise:** the loop without checkpointing varied by "
                      f"{100 * g['noise']:.0f}% of its median between rounds, while other "
                      f"processes used {100 * low:.0f}-{100 * high:.0f}% of the CPUs: "
                      "overheads smaller than that are not resolved by this run (more "
                      "--reps, or a quiet machine)."]
        lines += ["", f"Copy floor {_span(g['floor'])} per step (in its loop) = "
                  f"{100 * g['floor_share']:.1f}% of a step without checkpointing "
                  f"({_ms(g['step_s'])}): the least an every-step snapshot that is complete "
                  "when save() returns can cost."]
    lines += ["", f"Keeper processes left after the run: {result['keepers_left']}; memory "
              f"folder removed: {result['memory_dir_removed']}.", ""]
    return "\n".join(lines + [f"- {note}" for note in NOTES]) + "\n"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", choices=wl.SIZES,
                        help="workload size (default medium: ~55 M params, 0.66 GB)")
    parser.add_argument("--steps", type=int, default=30,
                        help="steps of the blocking-time loops (default 30)")
    parser.add_argument("--sleep", type=float, default=0.3,
                        help="seconds each blocking-time step sleeps (default 0.3)")
    parser.add_argument("--loop-steps", type=int, default=20,
                        help="steps of each goodput loop (default 20)")
    parser.add_argument("--step", type=float, default=0.3,
                        help="seconds of work per goodput step (default 0.3)")
    parser.add_argument("--reps", type=int, default=3, help="goodput rounds (default 3)")
    parser.add_argument("--work", default="matmul",
                        help="goodput work: matmul, sleep or matmul,sleep (default matmul)")
    parser.add_argument("--no-s3", action="store_true", help="skip the run on moto S3")
    parser.add_argument("--no-goodput", action="store_true", help="skip the goodput loops")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="where memory-<timestamp>.json/.md go (default benchmarks/results)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the local runs are written (default: system temp)")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.work.split(",") if k.strip()]
    if min(args.steps, args.loop_steps, args.reps) < 1 or min(args.sleep, args.step) <= 0 \
            or not set(kinds) <= {"matmul", "sleep"}:
        parser.error("--steps, --loop-steps, --reps, --sleep and --step must be positive; "
                     "--work takes matmul and/or sleep")
    if not SHM.is_dir():
        parser.error(f"{SHM} is missing: the memory tier needs a tmpfs")
    started = time.perf_counter()
    clock = CpuClock()
    log(f"== building the {args.size} workload")
    t = Training.of(args.size)
    info: dict[str, Any] = {"sources": sources(), "params": t.w.n_params,
                            "tensors": len(t.tensors),
                            "state_bytes": t.w.nbytes()}
    plan: dict[str, Any] = {"size": args.size, "steps": args.steps, "sleep": args.sleep,
                            "loop_steps": args.loop_steps, "step_s": args.step,
                            "reps": args.reps, "work": kinds, "s3": not args.no_s3,
                            "save_every": SAVE_EVERY}
    blocking: dict[str, Any] = {}
    goodput: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ckpts-memory-bench-", dir=args.dir) as tmp, \
            memory_dir() as shm:
        machine = wl.machine(Path(tmp))
        info.update(run_fs=machine["filesystem"],
                    memory_fs=wl.machine(shm)["filesystem"])
        runs: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Any]]]] = [
            ("local", contextlib.nullcontext)]
        if not args.no_s3:
            runs.append(("s3 (moto)", moto_server))
        for name, server in runs:
            with server() as endpoint:
                if endpoint is None:
                    where: str | Path = Path(tmp) / "blocking-run"
                    options = None
                else:
                    bench = S3Bench(endpoint, Path(tmp))
                    where, options = bench.url("blocking-run"), bench.options
                log(f"== blocking time per step, {name}: {args.steps} steps")
                ms._settle()
                with ckpts_warnings() as warned:
                    result = blocking_phase(t, where, options, args.steps, args.sleep, shm,
                                            clock)
                result["warnings"] = warned
                result["restore_check_s"] = check_restore(t, where, options, args.steps)
                result["summary"] = summarize_blocking(
                    result, TARGETS["s3" if endpoint else "local"])
                s = result["summary"]
                log(f"  save() median {1e3 * s['save']['median']:.0f} ms, floor "
                    f"{1e3 * s['floor']['median']:.0f} ms: {s['ratio']:.2f}x")
                blocking[name] = result
            if endpoint is None:
                shutil.rmtree(where, ignore_errors=True)
        if not args.no_goodput and kinds:
            if "matmul" in kinds:
                one = t.calibrate(args.step)
                plan.update(matmuls=t.matmuls, matmul_s=one)
                log(f"== goodput: one {MATMUL}x{MATMUL} matmul takes {1e3 * one:.1f} ms: "
                    f"{t.matmuls} per step")
            with ckpts_warnings() as warned:
                raw = goodput_phase(t, kinds, args.step, args.loop_steps, args.reps,
                                    Path(tmp), clock)
            info["goodput_warnings"] = warned
            goodput = {kind: {**summarize_goodput(runs_of, args.loop_steps), "runs": runs_of}
                       for kind, runs_of in raw.items()}
    left = keepers()
    for pid in left:  # ours: started by a manager of this process; say so and end it
        log(f"WARNING: keeper process {pid} still running after every manager closed")
        with contextlib.suppress(OSError):
            os.kill(pid, 15)
    machine["loadavg_at_end"] = os.getloadavg()[0]
    result = {"title": TITLE, "machine": machine, "info": info, "plan": plan,
              "blocking": blocking, "goodput": goodput, "keepers_left": len(left),
              "memory_dir_removed": not shm.exists(), "notes": NOTES,
              "total_seconds": round(time.perf_counter() - started, 1)}
    text = markdown(result)
    print(text)
    if args.json:
        print(json.dumps(result, indent=1))
    ms.write_results(args.out, "memory", result, text)
    log(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()

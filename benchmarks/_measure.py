"""Timing in interleaved rounds, peak-RSS sampling with a time limit, result rows."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# A contender takes a fresh empty directory (or ignores it) and does one operation.
Op = Callable[[Path], Any]


class Deferred:
    """Returned by an op whose work goes on after it returns (an async save): the
    harness stops the clock, then calls ``finish`` untimed."""

    def __init__(self, finish: Callable[[], Any]) -> None:
        self.finish = finish


@dataclass
class Series:
    """The times (or sizes) of one contender, one per repetition, in round order."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def summary(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high,
                "values": self.values}


def paired_ratio(ours: Series, theirs: Series) -> float:
    """Median over repetitions of ours/theirs, each pair from the same round (a peer
    timed once, outside the rounds, gets the ratio of the medians)."""
    if len(ours.values) != len(theirs.values):
        return ours.median / theirs.median
    return statistics.median(a / b for a, b in zip(ours.values, theirs.values, strict=True))


class Rows(list[dict[str, Any]]):
    """Table rows: ckpts against one peer each, with the median per-round ratio."""

    def __init__(self, state_bytes: int) -> None:
        super().__init__()
        self.state_bytes = state_bytes

    def add(self, operation: str, ours: Series | str, peer: str, theirs: Series | str,
            unit: str = "s", anon: tuple[int, int] | None = None) -> None:
        ratio = None
        floor = max(1e6, 0.005 * self.state_bytes) if unit == "rss" else 0.0
        if isinstance(ours, Series) and isinstance(theirs, Series) \
                and min(theirs.values) > floor:
            ratio = paired_ratio(ours, theirs)
        self.append({"operation": operation, "ckpts": _dump(ours), "peer": peer,
                     "peer_value": _dump(theirs), "ratio": ratio, "unit": unit,
                     "anon": anon, "state_bytes": self.state_bytes})


def _dump(value: Series | str | None) -> Any:
    return value.summary() if isinstance(value, Series) else value


def write_results(out: Path | None, name: str, result: Mapping[str, Any], text: str) -> None:
    """Write ``out/<name>-<timestamp>.json`` (the result) and ``.md`` (its table), the
    timestamp from ``result["machine"]["date"]``; nothing when ``out`` is None."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    stamp = result["machine"]["date"].replace(":", "").replace("+0000", "Z")
    (out / f"{name}-{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}-{stamp}.md").write_text(text)
    log(f"wrote {out}/{name}-{stamp}.json and .md")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _settle() -> None:
    """Untimed: collect garbage, hand free heap memory back to the OS (so an op cannot
    look lean by reusing what an earlier op freed), flush dirty pages."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    os.sync()


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def run_rounds(ops: Mapping[str, Op], reps: int, workdir: Path, *, label: str = "",
               warmup: bool = False) -> dict[str, Series]:
    """Time every op once per round, ``reps`` rounds, in a new order each round.

    The order is shuffled (seeded by the round), not rotated: on the benchmark VM an
    op's time depends on the op before it (the op right after the short ``hash`` op
    spent 2-4 s of kernel time copying 1.27 GB into the page cache, ~0.5 s elsewhere,
    whatever the op), and a rotation always gives each op the same predecessor.

    Each op gets a fresh empty directory, deleted after the clock stops; whatever it
    returns is released (or, if :class:`Deferred`, finished) outside the timed region.
    ``warmup`` first runs one untimed round (buffers allocated, code paths warm).
    """
    names = list(ops)
    times: dict[str, list[float]] = {name: [] for name in names}
    if warmup:
        for name in names:
            (workdir / "warmup").mkdir(parents=True)
            result = ops[name](workdir / "warmup")
            if isinstance(result, Deferred):
                result.finish()
            del result
            shutil.rmtree(workdir / "warmup")
    for rep in range(reps):
        order = list(names)
        random.Random(rep).shuffle(order)
        for name in order:
            target = workdir / f"{_slug(name)}-{rep}"
            target.mkdir(parents=True)
            _settle()
            started = time.perf_counter()
            result = ops[name](target)
            elapsed = time.perf_counter() - started
            if isinstance(result, Deferred):
                result.finish()
            del result
            shutil.rmtree(target)
            times[name].append(elapsed)
        log(f"  {label} round {rep + 1}/{reps}: "
            + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return {name: Series(values) for name, values in times.items()}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:40]


def rss_now() -> tuple[int, int]:
    """(resident bytes, anonymous resident bytes) of this process, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]), int(fields[2])
    return resident * PAGE_SIZE, (resident - shared) * PAGE_SIZE


class PeakRSS:
    """Sample RSS every ``interval`` seconds in a thread while the block runs.

    ``extra`` is the peak minus the value just before the block (``extra_anon`` the
    same for anonymous memory: RSS also counts file pages mapped with mmap, which
    the kernel can drop at will).
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.base = self.peak = self.base_anon = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakRSS:
        _settle()
        self.base, self.base_anon = rss_now()
        self.peak, self.peak_anon = self.base, self.base_anon
        self._thread.start()
        return self

    def _sample(self) -> None:
        resident, anon = rss_now()
        self.peak = max(self.peak, resident)
        self.peak_anon = max(self.peak_anon, anon)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base

    @property
    def extra_anon(self) -> int:
        return self.peak_anon - self.base_anon


class OpTimeoutError(Exception):
    """An op ran past its limit and was interrupted (by SIGALRM, between bytecodes)."""


def _on_alarm(signum: int, frame: object) -> None:
    raise OpTimeoutError


def measure_memory(op: Op, target: Path, limit: float) -> tuple[PeakRSS, float | None]:
    """Run ``op`` once under :class:`PeakRSS`; returns the sampler and the seconds it
    took (sampler running; a :class:`Deferred` is finished inside the sampled region),
    or None when it ran past ``limit`` seconds and was interrupted."""
    target.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    elapsed: float | None = None
    try:
        with PeakRSS() as peak:
            started = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                result = op(target)
                elapsed = time.perf_counter() - started
                if isinstance(result, Deferred):
                    result.finish()
                del result
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except OpTimeoutError:
        log(f"  interrupted after {limit:.0f} s")
    finally:
        signal.signal(signal.SIGALRM, previous)
    return peak, elapsed


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (other processes share this machine)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_size(path: Path) -> int:
    """Bytes of every regular file under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total

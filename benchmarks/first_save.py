"""The first async save against later ones, with and without ``manager.prepare(state)``.

The first save of a fresh manager allocates its staging memory (pinned for CUDA
state); ``prepare(state)`` allocates it ahead, so the first save blocks no longer
than later ones (issue 14's target: the first at most 2x a later one). Each case
runs in a fresh process, so no allocation is inherited from another.

Run: ``python -m benchmarks.first_save [--sizes many_small,standard] [--later 4]``
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ckpts
from benchmarks import _workloads as wl


def one_case(size: str, prepare: bool, later_saves: int) -> str:
    """Time the first and later saves of a fresh manager, in this process."""
    w = wl.build(size)
    state = ckpts.TrainState(model=w.model, optimizer=w.optimizer)
    with tempfile.TemporaryDirectory(prefix="ckpts-first-") as tmp:
        manager = ckpts.CheckpointManager(Path(tmp) / "run", async_save=True,
                                          keep=[ckpts.KeepLast(1)])
        prepared = 0.0
        if prepare:
            started = time.perf_counter()
            manager.prepare(state)
            prepared = time.perf_counter() - started
        times = []
        for step in range(1 + later_saves):
            gc.collect()
            started = time.perf_counter()
            manager.save(step, state)
            times.append(time.perf_counter() - started)
            manager.wait()  # the write, outside the clock
        manager.close()
    later = statistics.median(times[1:])
    return (f"| {size} | {'yes' if prepare else 'no'} | {prepared * 1e3:.0f} ms | "
            f"{times[0] * 1e3:.0f} ms | {later * 1e3:.0f} ms | {times[0] / later:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="many_small,standard")
    parser.add_argument("--later", type=int, default=4, help="later saves (median)")
    parser.add_argument("--case", nargs=2, metavar=("SIZE", "PREPARE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one case
        print(one_case(args.case[0], args.case[1] == "yes", args.later))
        return
    print("| size | prepare() | its time | first save blocked | later (median) | first/later |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for prepare in ("no", "yes"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.first_save", "--later",
                                   str(args.later), "--case", size, prepare],
                                  capture_output=True, text=True, check=True)
            print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()

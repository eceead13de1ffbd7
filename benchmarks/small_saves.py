"""Small saves in a run with retention: the fixed cost a training loop pays per save.

Each round trains one step (untimed, so every save writes new bytes), then times, in a
new order each round: a long-lived manager saving into a run that keeps everything, one
that keeps only the newest checkpoint (``KeepLast(1)``: every save deletes the previous
one), and ``torch.save`` + fsync of the same state. The ratios are the medians of the
per-round ratios to ``torch.save``.

Run: ``python -m benchmarks.small_saves [--size tiny] [--reps 40]``
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

import torch

import ckpts
from benchmarks import _measure as ms
from benchmarks import _peers as peers
from benchmarks import _workloads as wl


def train_step(w: wl.Workload) -> None:
    """One AdamW step on random gradients: parameters and moments all change."""
    for p in w.model.parameters():
        p.grad = torch.randn_like(p)
    w.optimizer.step()
    for p in w.model.parameters():
        p.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=wl.SIZES)
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    w = wl.build(args.size)
    state = ckpts.TrainState(model=w.model, optimizer=w.optimizer)
    with tempfile.TemporaryDirectory(prefix="ckpts-small-saves-", dir=os.getcwd()) as tmp:
        workdir = Path(tmp)
        runs = {"no retention": ckpts.CheckpointManager(workdir / "all"),
                "KeepLast(1)": ckpts.CheckpointManager(workdir / "last",
                                                       keep=[ckpts.KeepLast(1)])}
        step = [0]

        def saving(manager: ckpts.CheckpointManager) -> ms.Op:
            def run(_: Path) -> None:
                manager.save(step[0], state)
            return run

        ops: dict[str, ms.Op] = {name: saving(manager) for name, manager in runs.items()}
        ops["torch.save + fsync"] = peers.torch_save(w)
        series: dict[str, list[float]] = {name: [] for name in ops}
        for rep in range(args.reps):
            step[0] = rep + 1
            train_step(w)
            order = list(ops)  # run_rounds shuffles by round number: start from a new order
            random.Random(rep).shuffle(order)
            times = ms.run_rounds({name: ops[name] for name in order}, 1, workdir / "scratch",
                                  label=f"step {step[0]}")
            for name, timed in times.items():
                series[name].extend(timed.values)
        for manager in runs.values():
            manager.close()
        kept = [c.step for c in runs["KeepLast(1)"].checkpoints()]
    peer = ms.Series(series["torch.save + fsync"])
    print(wl.machine_line(wl.machine(Path.cwd())))
    print(f"\n{args.size}: {w.nbytes() / 1e6:.1f} MB of state, {args.reps} rounds; "
          f"the KeepLast(1) run ends with steps {kept}\n")
    print("| save | median [min-max] | / torch.save + fsync |")
    print("|---|---|---|")
    for name, values in series.items():
        mine = ms.Series(values)
        print(f"| {name} | {mine.median * 1e3:.1f} ms [{mine.low * 1e3:.1f}-"
              f"{mine.high * 1e3:.1f}] | {ms.paired_ratio(mine, peer):.2f} |")


if __name__ == "__main__":
    main()

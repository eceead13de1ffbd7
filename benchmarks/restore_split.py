"""Where a restore's time goes, ckpts against torch.load + load_state_dict (issue 14).

The peer's parts are timed one by one (``torch.load``, the model's and the
optimizer's ``load_state_dict``); ckpts' restore is timed whole, and its parts are
shares of one profiled restore (the profiler slows Python code more than I/O, so
the shares are approximate). Medians of interleaved rounds, files warm in the page
cache, as in ``benchmarks.run``.

Run: ``python -m benchmarks.restore_split [--size many_small] [--reps 5]``
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ckpts
from benchmarks import _peers as peers
from benchmarks import _workloads as wl

# ckpts' parts: (label, function name in the profile, its module's file name)
PARTS = [("read the manifest and check it", "read_manifest", "_manifest.py"),
         ("check the live objects against it", "check_compatible", "_checkpoint.py"),
         ("read and hash the tensors into the live ones", "read_tensors", "_transfer.py"),
         ("hand each object its state (load_state_dict, or the optimizer's fast path)",
          "load_object", "_checkpoint.py")]


def timed(op: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        op()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", default="many_small", choices=wl.SIZES)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    w = wl.build(args.size)
    target = wl.restore_target(w)
    with tempfile.TemporaryDirectory(prefix="ckpts-split-") as tmp:
        run = Path(tmp) / "run"
        with ckpts.CheckpointManager(run) as manager:
            manager.save(1, ckpts.TrainState(model=w.model, optimizer=w.optimizer))
        peers.torch_save(w)(Path(tmp))
        torch_file = Path(tmp) / peers.TORCH_FILE
        state = ckpts.TrainState(model=target.model, optimizer=target.optimizer)

        def restore() -> None:
            ckpts.CheckpointManager(run).restore(state)

        loaded = torch.load(torch_file, weights_only=True)
        rows = {
            "ckpts restore": lambda: restore(),
            "torch.load": lambda: torch.load(torch_file, weights_only=True),
            "model.load_state_dict": lambda: target.model.load_state_dict(loaded["model"]),
            "optimizer.load_state_dict":
                lambda: target.optimizer.load_state_dict(loaded["optimizer"]),
        }
        for op in rows.values():  # warm-up: page cache, allocator
            op()
        medians = {name: timed(op, args.reps) for name, op in rows.items()}
        profile = cProfile.Profile()
        profile.runcall(restore)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = max(cumulative for (_, _, _, cumulative, _) in stats.values())
    peer = sum(medians[n] for n in ("torch.load", "model.load_state_dict",
                                    "optimizer.load_state_dict"))
    print(f"## restore split: {args.size}, medians of {args.reps}\n")
    print("| part | time |\n|---|---|")
    print(f"| **ckpts restore** | **{medians['ckpts restore'] * 1e3:.0f} ms** "
          f"({medians['ckpts restore'] / peer:.2f}x the peer) |")
    for label, function, module in PARTS:
        share = sum(row[3] for (file, _, name), row in stats.items()
                    if name == function and file.endswith(module)) / total
        print(f"| ckpts: {label} | {share:.0%} (profile share) |")
    print(f"| **torch.load + load_state_dict** | **{peer * 1e3:.0f} ms** |")
    for name in ("torch.load", "model.load_state_dict", "optimizer.load_state_dict"):
        print(f"| peer: {name} | {medians[name] * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()

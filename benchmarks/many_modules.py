"""Restore of a model of many modules: 5,000 x ``Linear(16, 16)`` + AdamW (30,000 tensors
with the optimizer's state) into a live model and optimizer, ckpts against ``torch.load``
+ ``load_state_dict`` of the same state, interleaved rounds in one process.

Two targets: a model and optimizer that already hold state (a restart's objects after
``manager.prepare``, or a second restore), and fresh ones (a new process: the optimizer
has no state yet). Each restore is checked bit-exact.

Run: ``python -m benchmarks.many_modules [--modules 5000] [--reps 3] [--json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ckpts

Pair = tuple[torch.nn.Module, torch.optim.Optimizer]


def build(modules: int, *, stepped: bool) -> Pair:
    """The model and its AdamW, after one step when ``stepped`` (so the state exists)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(modules)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if stepped:
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter)
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = parser.parse_args()
    source = build(args.modules, stepped=True)
    expected = {key: value.clone() for key, value in source[0].state_dict().items()}
    folder = Path(tempfile.mkdtemp(prefix="ckpts-many-modules-"))
    try:
        run = folder / "run"
        with ckpts.CheckpointManager(run) as manager:
            manager.save(1, ckpts.TrainState(model=source[0], optimizer=source[1]))
        torch.save({"model": source[0].state_dict(), "optimizer": source[1].state_dict()},
                   folder / "state.pt")

        def holding_state() -> Pair:
            model, optimizer = copy.deepcopy(source)
            with torch.no_grad():
                for tensor in [*model.state_dict().values(),
                               *(v for s in optimizer.state.values() for v in s.values())]:
                    tensor.fill_(-1.0)
            return model, optimizer

        def with_ckpts(target: Pair) -> float:
            start = time.perf_counter()
            ckpts.CheckpointManager(run).restore(ckpts.TrainState(model=target[0],
                                                                  optimizer=target[1]))
            return time.perf_counter() - start

        def with_torch(target: Pair) -> float:
            start = time.perf_counter()
            loaded = torch.load(folder / "state.pt", weights_only=True)
            target[0].load_state_dict(loaded["model"])
            target[1].load_state_dict(loaded["optimizer"])
            return time.perf_counter() - start

        results = {}
        for label, make in (("holding state", holding_state),
                            ("fresh", lambda: build(args.modules, stepped=False))):
            times: dict[str, list[float]] = {"ckpts": [], "torch": []}
            contenders: dict[str, Callable[[Pair], float]] = {"ckpts": with_ckpts,
                                                              "torch": with_torch}
            for _ in range(args.reps):
                for name, restore in contenders.items():
                    target = make()
                    times[name].append(restore(target))
                    if not all(torch.equal(value, expected[key])
                               for key, value in target[0].state_dict().items()):
                        raise SystemExit(f"{name} did not restore the model exactly")
            ratios = [a / b for a, b in zip(times["ckpts"], times["torch"], strict=True)]
            results[label] = {"ckpts_s": statistics.median(times["ckpts"]),
                              "torch_s": statistics.median(times["torch"]),
                              "ratio": statistics.median(ratios), "times": times}
            print(f"{label}: ckpts {results[label]['ckpts_s']:.3f} s, torch.load + "
                  f"load_state_dict {results[label]['torch_s']:.3f} s, ratio "
                  f"{results[label]['ratio']:.2f} (target <= 0.3)")
        if args.json:
            print(json.dumps({"modules": args.modules, "reps": args.reps, **results}))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

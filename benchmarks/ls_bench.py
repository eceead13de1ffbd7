"""``ckpts ls`` on a run of 1,000 checkpoints, timed as whole processes (start-up included).

The run is made cheaply: one real checkpoint written by the library, copied 999
times, each copy's manifest given the step of its directory name (and a metric,
so the best markers have work to do). The baseline row times ``ckpts ls`` of an
empty run: the fixed cost of starting Python and importing the CLI.

Run: ``python -m benchmarks.ls_bench [--checkpoints 1000] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CKPTS = str(Path(sys.executable).parent / "ckpts")


def make_run(run: Path, count: int) -> None:
    """Write one real checkpoint, then copy it to steps 2..count with rewritten manifests."""
    import torch

    import ckpts

    model = torch.nn.Linear(16, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    first = ckpts.CheckpointManager(run).save(1, state, metrics={"val_loss": 1.0}, epoch=0)
    assert first is not None
    for step in range(2, count + 1):
        target = run / f"step-{step:08d}"
        shutil.copytree(first.path, target)
        manifest_path = target / "manifest.json"
        manifest = json.loads(manifest_path.read_bytes())
        manifest["step"] = step
        manifest["epoch"] = step // 100
        manifest["metrics"] = {"val_loss": 1.0 / step + (step % 7) * 1e-3}
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")


def time_command(args: list[str], repeat: int) -> list[float]:
    """Wall-clock seconds of ``repeat`` runs of ``args`` (output discarded; must exit 0)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, empty = Path(tmp) / "run", Path(tmp) / "empty"
        empty.mkdir()
        started = time.perf_counter()
        make_run(run, options.checkpoints)
        print(f"made {options.checkpoints} checkpoints in {time.perf_counter() - started:.1f} s")
        n = options.checkpoints
        cases = {
            "ckpts ls EMPTY_RUN (start-up only)": [CKPTS, "ls", str(empty)],
            f"ckpts ls RUN ({n} checkpoints)": [CKPTS, "ls", str(run)],
            f"ckpts ls RUN --json ({n} checkpoints)": [CKPTS, "ls", str(run), "--json"],
        }
        width = max(map(len, cases))
        print(f"\n{'command':<{width}}  {'min':>7}  {'median':>7}  {'max':>7}  "
              f"({options.repeat} runs each)")
        for name, args in cases.items():
            times = time_command(args, options.repeat)
            print(f"{name:<{width}}  {min(times):>6.3f}s  {statistics.median(times):>6.3f}s  "
                  f"{max(times):>6.3f}s")


if __name__ == "__main__":
    main()

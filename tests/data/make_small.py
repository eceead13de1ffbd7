"""Write the fixture of the current format, ``tests/data/v2-small/``, that
test_format_stability.py pins (``v1-small/`` was written by this script under format v1).

Usage: python tests/data/make_small.py [--force]

The fixture is a run directory holding one checkpoint, ``step-00000003``: a
Linear(3, 2) with weights from ``torch.arange``, a bfloat16 parameter, an int64
buffer, an SGD-with-momentum optimizer after one step, and the RNGs seeded with 0.
Every value is exact in binary, so the test can state them.

A fixture records what one format version looks like on disk; it is written once
and committed. Regenerating it would hide exactly the change it exists to catch, so
the script refuses to overwrite it unless given ``--force`` (do that only for a
new format version, with a new fixture name).
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import ckpts

FIXTURE = Path(__file__).with_name("v2-small")
STEP = 3
CHECKPOINT = f"step-{STEP:08d}"
METRICS = {"loss": 0.125, "accuracy": 0.75}
EPOCH = 1


class SmallNet(torch.nn.Module):
    """Linear(3, 2), a bfloat16 scale and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.scale = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
        self.register_buffer("counts", torch.zeros(4, dtype=torch.int64))


def build_state() -> ckpts.TrainState:
    """The fixture's state, exactly; leaves every global RNG seeded with 0."""
    model = SmallNet()
    with torch.no_grad():
        model.linear.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4 - 0.5)
        model.linear.bias.copy_(torch.tensor([0.25, -0.75]))
        model.scale.copy_(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
        model.counts.copy_(torch.tensor([0, 1, -1, 2**40]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.linear.weight.grad = torch.full((2, 3), 0.25)
    model.linear.bias.grad = torch.tensor([1.0, -0.5])
    model.scale.grad = torch.tensor([0.5, 0.25], dtype=torch.bfloat16)
    optimizer.step()  # params -= 0.5 * grad; momentum_buffer = grad (first step)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return ckpts.TrainState(model=model, optimizer=optimizer)


def write(run: Path) -> Path:
    """Save the fixture's state as step 3 of ``run``; returns the checkpoint directory."""
    with ckpts.CheckpointManager(run) as manager:
        checkpoint = manager.save(STEP, build_state(), metrics=METRICS, epoch=EPOCH)
    assert checkpoint is not None
    return Path(checkpoint.path)


def main(argv: list[str]) -> int:
    if argv not in ([], ["--force"]):
        print(__doc__, file=sys.stderr)
        return 2
    if FIXTURE.exists():
        if argv != ["--force"]:
            print(f"{FIXTURE} exists: refusing to overwrite the pinned fixture "
                  "(pass --force only for a deliberate format change)", file=sys.stderr)
            return 1
        shutil.rmtree(FIXTURE)
    with tempfile.TemporaryDirectory() as scratch:
        written = write(Path(scratch) / "run")
        FIXTURE.mkdir()
        shutil.copytree(written, FIXTURE / CHECKPOINT)  # the checkpoint only, no lock file
    for path in sorted(FIXTURE.rglob("*")):
        print(path.relative_to(FIXTURE.parent), path.stat().st_size if path.is_file() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Write the fixtures that test_format_stability.py pins, as today's code saves them
(format v4): ``tests/data/v4-small/`` (one process) and ``tests/data/v4-ranks-small/``
(two ranks). The older fixtures were written by this script under the format of their
time and stay as they were: ``v1-small/`` and ``v2-small/`` (one process, formats v1
and v2), ``v3-small/`` (two ranks, format v3).

Usage: python tests/data/make_small.py [v4|v4-ranks] [--force]     (default: v4)

Each fixture is a run directory holding one checkpoint, ``step-00000003``.

One process (v1, v2, v4): a Linear(3, 2) with weights from ``torch.arange``, a
bfloat16 parameter, an int64 buffer, an SGD-with-momentum optimizer after one step,
and the RNGs seeded with 0.

Two ranks (v3, v4-ranks): a 2-rank gloo job (``torch.multiprocessing.spawn``, CPU)
saves a :class:`ShardedNet` under FSDP2 (``fully_shard``: each rank holds half of
each parameter's rows, 2 + 1 of the 3-row layer) and its AdamW after one step, plus
each rank's RNGs, seeded with the rank. The hyperparameters (betas 0.5/0.75,
eps 0, lr 0.25, weight decay 0.5) make the step exact: each parameter becomes
``0.875 * p - 0.25 * sign(grad)``, ``exp_avg`` is ``grad / 2`` and ``exp_avg_sq``
is ``grad**2 / 4``.

Every value is exact in binary, so the tests can state them. The safetensors files
are the same bytes in every format (v2 to v4 changed only the JSON around them).

A fixture records what one format version looks like on disk; it is written once
and committed. Regenerating it would hide exactly the change it exists to catch, so
the script refuses to overwrite it unless given ``--force`` (do that only for a
new format version, with a new fixture name).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import ckpts

FIXTURE = Path(__file__).with_name("v4-small")  # one process, today's format
SHARDED_FIXTURE = Path(__file__).with_name("v4-ranks-small")  # two ranks, today's format
WORLD_SIZE = 2
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


class ShardedNet(torch.nn.Module):
    """Linear(4, 3) then Linear(3, 2), and an int64 buffer (replicated, not sharded)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(4, 3)
        self.second = torch.nn.Linear(3, 2)
        self.register_buffer("counts", torch.zeros(4, dtype=torch.int64))


def sharded_values() -> dict[str, torch.Tensor]:
    """ShardedNet's values before the step, exact in binary."""
    return {
        "first.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4 - 1.5,
        "first.bias": torch.tensor([0.5, -0.25, 1.0]),
        "second.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 2 - 1.0,
        "second.bias": torch.tensor([-0.75, 0.125]),
        "counts": torch.tensor([0, 1, -1, 2**40]),
    }


def sharded_gradients() -> dict[str, torch.Tensor]:
    """The gradient of each parameter for the one step: no zeros (eps is 0)."""
    return {
        "first.weight": torch.tensor([[0.5, -0.25, 1.0, -2.0], [0.25, 0.5, -0.5, 4.0],
                                      [-1.0, 0.125, 2.0, -0.5]]),
        "first.bias": torch.tensor([1.0, -1.0, 0.5]),
        "second.weight": torch.tensor([[-0.5, 0.25, 1.0], [2.0, -0.125, -1.0]]),
        "second.bias": torch.tensor([0.25, -4.0]),
    }


def sharded_objects(values: dict[str, torch.Tensor] | None = None
                    ) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    """A ShardedNet under FSDP2 on this job's ranks (torch.distributed must be
    initialized) holding ``values`` (default: :func:`sharded_values`), and its AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = ShardedNet()
    live = model.state_dict()  # views of the parameters and buffer, before sharding
    with torch.no_grad():
        for key, value in (values or sharded_values()).items():
            live[key].copy_(value)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model.first, mesh=mesh)
    fully_shard(model.second, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.25, betas=(0.5, 0.75), eps=0.0,
                                  weight_decay=0.5)
    return model, optimizer


def build_sharded_state() -> ckpts.TrainState:
    """On each rank of a job: the two-rank fixtures' state after its one step; leaves every
    global RNG of rank r seeded with r."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model, optimizer = sharded_objects()
    gradients = sharded_gradients()
    for key, parameter in model.named_parameters():
        assert isinstance(parameter, DTensor)
        parameter.grad = distribute_tensor(gradients[key], parameter.device_mesh,
                                           parameter.placements)
    optimizer.step()
    rank = dist.get_rank()
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(rank)
    return ckpts.TrainState(model=model, optimizer=optimizer)


def write_sharded(run: Path) -> Path:
    """On every rank of a job: save the two-rank fixtures' state as step 3 of ``run``;
    returns the checkpoint directory."""
    with ckpts.CheckpointManager(run) as manager:
        checkpoint = manager.save(STEP, build_sharded_state(), metrics=METRICS, epoch=EPOCH)
    assert checkpoint is not None
    return Path(checkpoint.path)


def free_port() -> int:
    """A TCP port free on this machine now, for the job's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_sharded_on_rank(rank: int, world: int, port: int, run: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        write_sharded(Path(run))
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    force = "--force" in argv
    rest = [arg for arg in argv if arg != "--force"]
    if rest not in ([], ["v4"], ["v4-ranks"]):
        print(__doc__, file=sys.stderr)
        return 2
    fixture = SHARDED_FIXTURE if rest == ["v4-ranks"] else FIXTURE
    if fixture.exists():
        if not force:
            print(f"{fixture} exists: refusing to overwrite the pinned fixture "
                  "(pass --force only for a deliberate format change)", file=sys.stderr)
            return 1
        shutil.rmtree(fixture)
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        if fixture == SHARDED_FIXTURE:
            torch.multiprocessing.spawn(_write_sharded_on_rank,
                                        args=(WORLD_SIZE, free_port(), str(run)),
                                        nprocs=WORLD_SIZE)
            written = run / CHECKPOINT
        else:
            written = write(run)
        fixture.mkdir()
        shutil.copytree(written, fixture / CHECKPOINT)  # the checkpoint only, no lock file
    for path in sorted(fixture.rglob("*")):
        print(path.relative_to(fixture.parent), path.stat().st_size if path.is_file() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

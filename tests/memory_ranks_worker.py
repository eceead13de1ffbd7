"""One rank of a 2-rank DDP job (gloo, CPU) with the memory tier, for test_memory_ranks.py.

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p CKPTS_MEMORY_DIR=dir \\
       python memory_ranks_worker.py RUN HOLD_AT STEP_SLEEP

A tiny MLP with dropout, wrapped in DistributedDataParallel, trains with AdamW on a batch
drawn from a generator seeded by the step and the rank (so a resume at any step sees the
same data); dropout draws from the global RNG, seeded per rank, which only a restore of
each rank's own RNG state keeps exact. The manager snapshots every step into host memory
(``memory=Every(steps=1)``) and writes a durable checkpoint every :data:`SAVE_EVERY` steps
(``save=Every(steps=5)``), in the background from the snapshot.

The rank prints, each line flushed at once (so a SIGKILL keeps what was printed):

- ``start STEP SOURCE`` after ``restore()``: SOURCE is ``memory`` when ckpts logged that
  it restored the step from host memory, ``run`` otherwise (0 when nothing was restored);
- ``returned STEP LOSS`` once ``save(STEP)`` returned (LOSS: ``float.hex``, exact);
- ``holding STEP`` if it reached HOLD_AT (> 0): it then sleeps, snapshots complete, until
  the test kills it;
- ``final DIGEST`` (a sha256 of the parameters and the optimizer state) and ``closed``,
  after ``close()`` at :data:`MAX_STEP`.

ckpts' log (INFO and up) goes to stderr. A rank still alive after :data:`MAX_WALL`
seconds ends itself with status 3, so a broken test leaves no process behind.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import ckpts

WORLD_SIZE = 2
SAVE_EVERY = 5
MAX_STEP = 12  # not a multiple of SAVE_EVERY: close() makes the last step durable
MAX_WALL = 120.0
FROM_MEMORY = "from host memory"


class Restores(logging.Handler):
    """Remembers what ckpts logs (to tell a restore from memory from one from the run)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build_model() -> torch.nn.Module:
    """The same initial weights on every rank."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.25), torch.nn.Linear(16, 1))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    inputs = torch.randn(8, 6, generator=generator)
    return inputs, inputs.sum(dim=1, keepdim=True).sin()


def digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """A sha256 of every parameter and optimizer moment, bit for bit."""
    hashed = hashlib.sha256()
    tensors = [value for _, value in sorted(model.state_dict().items())]
    for _, slots in sorted(optimizer.state_dict()["state"].items()):
        tensors += [torch.as_tensor(value) for _, value in sorted(slots.items())]
    for tensor in tensors:
        hashed.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return hashed.hexdigest()


def say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    run, hold_at, step_sleep = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    watchdog = threading.Timer(MAX_WALL, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    restores = Restores()
    logging.getLogger("ckpts").addHandler(restores)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    if dist.get_world_size() != WORLD_SIZE:
        raise SystemExit(f"run with WORLD_SIZE={WORLD_SIZE}")
    torch.manual_seed(100 + rank)  # dropout differs per rank: its RNG must be its own

    model = DistributedDataParallel(build_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    manager = ckpts.CheckpointManager(run, save=ckpts.Every(steps=SAVE_EVERY),
                                      memory=ckpts.Every(steps=1), collective_timeout=60.0)
    step = manager.restore(state) or 0
    source = "memory" if any(FROM_MEMORY in m for m in restores.messages) else "run"
    say(f"start {step} {source}")
    while step < MAX_STEP:
        step += 1
        inputs, targets = batch(step, rank)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        manager.save(step, state)
        say(f"returned {step} {loss.item().hex()}")
        if step == hold_at:
            say(f"holding {step}")
            while True:
                time.sleep(1)
        time.sleep(step_sleep)
    manager.close()
    say(f"final {digest(model.module, optimizer)}")
    dist.destroy_process_group()
    say("closed")


if __name__ == "__main__":
    main()

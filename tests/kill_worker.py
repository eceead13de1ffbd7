"""A training loop that saves every step, for the SIGKILL harness (run as a subprocess).

Usage: python kill_worker.py RUN MODE SEED     (MODE: sync | async)

Restores the newest checkpoint of RUN if there is one, prints ``ready STEP``, then
trains and saves step after step until it is killed (or after two minutes, so an
orphan cannot run forever). ``committed STEP`` is printed only once that step is
durable: after ``save()`` returns in sync mode; after ``wait()`` in async mode,
where the next step's training overlaps the background write.

Every value the harness checks is derived from the step (see :func:`mark`), and
the weights follow from SEED and the step alone (:func:`train_step` draws its
batch from a generator seeded with the step), so a test can rebuild the state of
any step in-process and compare it with what a restore returns.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

import ckpts

KEEP = 3
MAX_SECONDS = 120.0
WIDTH = 256
HIDDEN = 1024  # ~2 MB of float32 weights, ~6 MB per checkpoint with AdamW's two moments


class KillNet(torch.nn.Module):
    """Two linear layers plus buffers that carry the step (float32 and int64)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(WIDTH, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, WIDTH)
        self.register_buffer("marker", torch.zeros(64))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Progress:
    """A user's own Stateful object: plain JSON values that follow the step."""

    def __init__(self) -> None:
        self.step = 0
        self.recent: tuple[int, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "recent": self.recent, "by_step": {self.step: str(self.step)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.recent = state["recent"]


def build(seed: int) -> tuple[ckpts.TrainState, KillNet, torch.optim.AdamW, Progress]:
    """The worker's state at step 0 (weights from ``seed``; the global RNGs are left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = KillNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    progress = Progress()
    state = ckpts.TrainState(model=model, optimizer=optimizer, progress=progress)
    return state, model, optimizer, progress


def train_step(model: KillNet, optimizer: torch.optim.Optimizer, step: int) -> float:
    """One AdamW step on a batch that depends on ``step`` only."""
    batch = torch.randn(32, WIDTH, generator=torch.Generator().manual_seed(step))
    loss = (model(batch) - batch).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def mark(model: KillNet, progress: Progress, step: int) -> None:
    """Write the values the harness checks for ``step``."""
    model.marker.fill_(float(step))
    model.step_count.fill_(step)
    progress.step = step
    progress.recent = tuple(range(max(1, step - 2), step + 1))


def main() -> None:
    run, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode not in ("sync", "async"):
        raise SystemExit(f"MODE must be sync or async, got {mode!r}")
    torch.set_num_threads(1)
    state, model, optimizer, progress = build(seed)
    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(KEEP)],
                                      async_save=mode == "async")
    step = manager.restore(state) or 0
    print("ready", step, flush=True)
    in_flight: int | None = None
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline:
        step += 1
        loss = train_step(model, optimizer, step)  # async: overlaps the previous write
        mark(model, progress, step)
        if in_flight is not None:
            manager.wait()
            print("committed", in_flight, flush=True)
        manager.save(step, state, metrics={"loss": loss, "step_value": float(step)})
        if mode == "sync":
            print("committed", step, flush=True)
        else:
            in_flight = step
    manager.close()


if __name__ == "__main__":
    main()

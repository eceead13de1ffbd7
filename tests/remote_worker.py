"""A training loop that saves every step to an S3 run, for the SIGKILL test of test_remote_runs.py.

Usage: python remote_worker.py URL ENDPOINT SEED

Opens the run as ``FsspecStorage(URL, ..., lease_seconds=LEASE_SECONDS)`` with the test
server's fixed credentials at ENDPOINT, restores the newest checkpoint if there is one,
prints ``ready STEP``, then trains and saves step after step (``KeepLast(KEEP)``) until it
is killed (or after a minute, so an orphan cannot run forever), printing ``committed STEP``
once ``save()`` returned. The optimizer state is just over the multipart part size, so a
kill often lands in the middle of a multipart upload.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

import ckpts

KEEP = 2
LEASE_SECONDS = 2.0
MAX_SECONDS = 60.0
WIDTH = 1024  # 4 MiB of weights; AdamW's two moments make a 8 MiB + header optimizer file


def storage_options(endpoint: str) -> dict[str, Any]:
    """The options that reach the test server (moto accepts any key when auth is off)."""
    return {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def open_run(url: str, endpoint: str) -> ckpts.storage.FsspecStorage:
    """The run with a short lease, so a killed writer frees it within seconds."""
    return ckpts.storage.FsspecStorage(url, storage_options(endpoint), lease_seconds=LEASE_SECONDS)


def build(seed: int) -> tuple[ckpts.TrainState, torch.nn.Linear, torch.optim.AdamW]:
    """The worker's state at step 0."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torch.nn.Linear(WIDTH, WIDTH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return ckpts.TrainState(model=model, optimizer=optimizer), model, optimizer


def train_step(model: torch.nn.Linear, optimizer: torch.optim.Optimizer, step: int) -> None:
    """One AdamW step on a batch that depends on ``step`` only."""
    batch = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(step))
    loss = (model(batch) - batch).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def main() -> None:
    url, endpoint, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    state, model, optimizer = build(seed)
    manager = ckpts.CheckpointManager(open_run(url, endpoint), keep=[ckpts.KeepLast(KEEP)])
    step = manager.restore(state) or 0
    print("ready", step, flush=True)
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline:
        step += 1
        train_step(model, optimizer, step)
        manager.save(step, state)
        print("committed", step, flush=True)
    manager.close()


if __name__ == "__main__":
    main()

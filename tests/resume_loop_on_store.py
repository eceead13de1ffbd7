"""A tiny training loop whose run is a URL, with a one-second writer lease, that keeps its
newest checkpoint only.

Usage: python resume_loop_on_store.py RUN_URL (the store's credentials and endpoint come
from the AWS variables)

``check_resume(..., run="s3://...")`` kills it after a few saves and waits until the
killed writer's lease expires before it resumes the loop: a short lease keeps that
wait short. Every step draws its batch from the torch RNG, which each checkpoint holds,
so the loop resumes exactly. ``KeepLast(1)`` deletes each checkpoint at the next save:
the check takes them from the store as they are committed.
"""

from __future__ import annotations

import sys
import time

import torch

import ckpts
from ckpts.storage import FsspecStorage

STEPS = 6


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    manager = ckpts.CheckpointManager(FsspecStorage(sys.argv[1], {}, lease_seconds=1.0),
                                      keep=[ckpts.KeepLast(1)])
    step = manager.restore(state) or 0
    while step < STEPS:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        manager.save(step, state, metrics={"loss": loss.item()})
        time.sleep(0.1)  # a step takes a moment, so the kill lands mid-run
    manager.close()


if __name__ == "__main__":
    main()

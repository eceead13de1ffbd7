"""A DDP job whose data order must survive a resume on another number of ranks, for
tests/test_data_elastic.py.

Usage: MASTER_ADDR=127.0.0.1 MASTER_PORT=p python elastic_worker.py RANKS RUN RECORDS SAVE_AT

The process imports torch and ckpts once, then forks one child per rank (on a 2-core
machine, importing torch in every rank's own interpreter costs more than the job), and
exits with an error if any rank failed. Each rank: a one-weight model wrapped in
DistributedDataParallel, AdamW, and ``ResumableLoader(DataLoader(TensorDataset(
arange(SAMPLES)), sampler=DistributedSampler))``, all in a ``CheckpointManager`` on RUN:
the rank restores RUN's newest checkpoint, then trains to the end of epoch 1. After every
batch it appends ``{"step", "epoch", "samples"}`` to ``RECORDS-rank{r}.jsonl`` (flushed, so
a SIGKILL keeps it); at global step SAVE_AT (0: never) it saves and appends
``{"saved": step}``. With SAVE_AT negative it saves at step ``-SAVE_AT`` and then waits to
be SIGKILLed.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ckpts
from ddp_worker import append_line

SAMPLES = 96
BATCH_SIZE = 4
SEED = 7
EPOCHS = 2


def build_model() -> torch.nn.Module:
    """The same initial weight on every rank."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Linear(1, 1)


def train(run: Path, records: str, save_at: int) -> None:
    """One rank's job (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set)."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = DistributedDataParallel(build_model())
    dataset = TensorDataset(torch.arange(SAMPLES))
    sampler: DistributedSampler[int] = DistributedSampler(dataset, seed=SEED)
    loader = ckpts.ResumableLoader(DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = ckpts.TrainState(model=model, optimizer=optimizer, loader=loader)
    manager = ckpts.CheckpointManager(run, collective_timeout=60.0)
    step = manager.restore(state) or 0
    with open(f"{records}-rank{rank}.jsonl", "a") as log:
        while loader.epoch < EPOCHS:
            epoch = loader.epoch
            for (samples,) in loader:
                step += 1
                loss = model(samples.float()[:, None] / SAMPLES).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                append_line(log, json.dumps({"step": step, "epoch": epoch,
                                             "samples": samples.tolist()}))
                if step == abs(save_at):
                    manager.save(step, state)
                    append_line(log, json.dumps({"saved": step}))
                    while save_at < 0:  # the test kills the job
                        time.sleep(1)
    manager.close()
    dist.destroy_process_group()


def main() -> None:
    ranks, run, records, save_at = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], \
        int(sys.argv[4])
    torch.set_num_threads(1)
    os.environ["WORLD_SIZE"] = str(ranks)
    _ = ckpts.CheckpointManager, ckpts.TrainState, ckpts.ResumableLoader  # imported once
    importlib.import_module("torch._dynamo")  # DDP imports it when built: once, not per rank
    children = []
    for rank in range(ranks):
        child = os.fork()
        if child == 0:
            os.environ["RANK"] = str(rank)
            failed = True
            try:
                train(run, records, save_at)
                failed = False
            finally:
                if failed:
                    traceback.print_exc()
                sys.stdout.flush()
                os._exit(int(failed))
        children.append(child)
    failed = [rank for rank, child in enumerate(children) if os.waitpid(child, 0)[1]]
    if failed:
        raise SystemExit(f"rank(s) {failed} failed")


if __name__ == "__main__":
    main()

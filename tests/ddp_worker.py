"""One rank of a 2-rank DDP training job, for the exact-resume test (run under torchrun).

Usage::

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \\
        tests/ddp_worker.py OUT LIFE MODE STEP_SLEEP

A small MLP with dropout, wrapped in DistributedDataParallel, trains on a synthetic
dataset (built from a seed) read through ``DistributedSampler(shuffle=True)`` inside a
:class:`ckpts.ResumableLoader`, with AdamW and a warmup + cosine LR schedule. The input
noise draws from python's ``random``, numpy and torch, each seeded differently per rank,
so a rank that restored another rank's RNG would diverge. Every rank restores from
``OUT/run`` at start and saves every :data:`SAVE_EVERY` steps (MODE ``sync`` or
``async``; ``none`` trains without ckpts' manager: the reference). An epoch has
:data:`STEPS_PER_EPOCH` steps, not a multiple of :data:`SAVE_EVERY`, so checkpoints
fall mid-epoch (and one at an epoch's end).

Each rank appends to ``OUT/losses-life{LIFE}-rank{R}.txt``: ``resumed STEP``, then
``STEP LOSS`` per step (``repr`` of the float, exact), flushed and fsynced, and writes
``OUT/final-rank{R}.safetensors`` (parameters and optimizer state) once it finishes.
STEP_SLEEP seconds of sleep per step give the test time to kill the job mid-run.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ckpts

WORLD_SIZE = 2
SAMPLES = 52  # 26 per rank: 7 batches of 4 per epoch, the last one of 2
BATCH_SIZE = 4
STEPS_PER_EPOCH = 7
SAVE_EVERY = 3
TOTAL_STEPS = 4 * STEPS_PER_EPOCH
WARMUP = 4


def build_model() -> torch.nn.Module:
    """The same initial weights on every rank (DDP would broadcast rank 0's anyway)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(32, 4),
        )


def build_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(SAMPLES, 8, generator=generator)
    labels = torch.randint(0, 4, (SAMPLES,), generator=generator)
    return TensorDataset(inputs, labels)


def warmup_cosine(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL_STEPS - WARMUP)))


def final_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                  ) -> dict[str, torch.Tensor]:
    """Parameters and optimizer moments, flat, for a safetensors file."""
    tensors = {f"model.{key}": value.detach().clone()
               for key, value in model.state_dict().items()}
    for index, slots in optimizer.state_dict()["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).clone()
    return tensors


def append_line(log: TextIO, line: str) -> None:
    """One line, durable before the next step runs (a SIGKILL keeps what was logged)."""
    log.write(line + "\n")
    log.flush()
    os.fsync(log.fileno())


def main() -> None:
    out, life, mode, step_sleep = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], \
        float(sys.argv[4])
    if mode not in ("sync", "async", "none"):
        raise SystemExit(f"MODE must be sync, async or none, got {mode!r}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if dist.get_world_size() != WORLD_SIZE:
        raise SystemExit(f"run with --nproc_per_node {WORLD_SIZE}")
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    np.random.seed(300 + rank)

    model = DistributedDataParallel(build_model())
    dataset = build_dataset()
    sampler: DistributedSampler[int] = DistributedSampler(dataset, shuffle=True, seed=7)
    loader = ckpts.ResumableLoader(DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler))
    if len(loader) != STEPS_PER_EPOCH:
        raise SystemExit(f"expected {STEPS_PER_EPOCH} batches per epoch, got {len(loader)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    state = ckpts.TrainState(model=model, optimizer=optimizer, scheduler=scheduler,
                             loader=loader)
    manager = None if mode == "none" else ckpts.CheckpointManager(
        out / "run", keep=[ckpts.KeepLast(3)], async_save=mode == "async",
        collective_timeout=60.0)
    step = (manager.restore(state) if manager else None) or 0
    with open(out / f"losses-life{life}-rank{rank}.txt", "a") as log:
        append_line(log, f"resumed {step}")
        while step < TOTAL_STEPS:
            sampler.set_epoch(loader.epoch)  # the restored epoch after a resume
            for inputs, labels in loader:
                step += 1
                scale = 0.05 * (1 + random.random()) * float(np.random.rand())
                noisy = inputs + scale * torch.randn_like(inputs)
                loss = torch.nn.functional.cross_entropy(model(noisy), labels)
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                append_line(log, f"{step} {loss.item()!r}")
                if manager and step % SAVE_EVERY == 0:
                    manager.save(step, state, epoch=loader.epoch)
                time.sleep(step_sleep)
                if step == TOTAL_STEPS:
                    break
    if manager:
        manager.close()
    safetensors.torch.save_file(final_tensors(model.module, optimizer),
                                str(out / f"final-rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A training loop with the memory tier, for test_memory_tier.py (run as a subprocess).

Usage: python memory_worker.py RUN MAX_STEP SEED [--options JSON] [--pace SECONDS] [--hold]

Environment: ``CKPTS_MEMORY_DIR`` (the test's own folder for the memory areas).

Builds a small MLP with dropout and AdamW from SEED, opens RUN (a path, or a URL with
``--options``, the storage options as JSON) with ``memory=Every(steps=1)``,
``save=Every(steps=5)`` and ``KeepLast(3)``, restores, and prints ``start STEP SOURCE``
(SOURCE: ``memory`` when the "ckpts" logger said the state came from host memory,
``run`` when it came from the run, ``none`` on a fresh start). Then it trains step after
step up to MAX_STEP, printing ``returned STEP LOSS`` (``float.hex()``, so that a test
compares bits) right after each ``save()`` returned, sleeping ``--pace`` seconds after
each step, and ends with ``close()`` and ``closed``. With ``--hold`` it waits for its
durable saves, prints ``holding`` instead of closing, and waits to be killed.

Every step's batch comes from a generator seeded with the step, and dropout draws from
the global generator seeded with SEED, so :func:`reference` (no checkpoint manager at
all) gives the loss of every step of an uninterrupted run. A watchdog ends the process
after MAX_SECONDS, so that an orphan never outlives a failed test for long.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

import torch

import ckpts

SAVE_EVERY = 5
KEEP = 3
MAX_SECONDS = 120.0
WIDTH, HIDDEN, BATCH = 16, 64, 8
FROM_MEMORY = "from host memory"


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer at step 0; seeds the global generator (dropout) with ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(HIDDEN, WIDTH))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    """One AdamW step on a batch that depends on ``step`` only (dropout: the global RNG)."""
    batch = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(step))
    loss = (model(batch) - batch.flip(1)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.item())


def reference(seed: int, steps: int) -> tuple[dict[int, str], dict[int, dict[str, torch.Tensor]]]:
    """An uninterrupted run without any checkpointing: each step's loss (``float.hex()``)
    and each step's model and optimizer tensors (``model.*``, ``optimizer.N.*``) and
    global RNG state (``rng``). Leaves
    the caller's global RNG and thread count as they were."""
    losses: dict[int, str] = {}
    tensors: dict[int, dict[str, torch.Tensor]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's setting: same kernels, same bits
    try:
        with torch.random.fork_rng():
            model, optimizer = build(seed)
            for step in range(1, steps + 1):
                losses[step] = train_step(model, optimizer, step).hex()
                found = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
                for index, slots in optimizer.state_dict()["state"].items():
                    found |= {f"optimizer.{index}.{k}": v.clone() for k, v in slots.items()
                              if isinstance(v, torch.Tensor)}
                found["rng"] = torch.get_rng_state()
                tensors[step] = found
    finally:
        torch.set_num_threads(threads)
    return losses, tensors


class _Said(logging.Handler):
    """Remembers whether the "ckpts" logger said it restored from host memory."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.from_memory = False

    def emit(self, record: logging.LogRecord) -> None:
        if FROM_MEMORY in record.getMessage():
            self.from_memory = True


def _watchdog(seconds: float) -> None:
    def end() -> None:
        time.sleep(seconds)
        print(f"memory_worker: still running after {seconds} s; exiting", file=sys.stderr,
              flush=True)
        os._exit(3)

    threading.Thread(target=end, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("max_step", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("--options", default=None, help="storage options as JSON")
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    _watchdog(MAX_SECONDS)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="worker %(name)s %(levelname)s: %(message)s")
    said = _Said()
    logging.getLogger("ckpts").addHandler(said)
    torch.set_num_threads(1)
    model, optimizer = build(args.seed)
    state = ckpts.TrainState(model=model, optimizer=optimizer)
    options = json.loads(args.options) if args.options else None
    manager = ckpts.CheckpointManager(
        args.run, save=ckpts.Every(steps=SAVE_EVERY), memory=ckpts.Every(steps=1),
        keep=[ckpts.KeepLast(KEEP)], storage_options=options)
    step = manager.restore(state) or 0
    source = "memory" if said.from_memory else "run" if step else "none"
    print(f"start {step} {source}", flush=True)
    while step < args.max_step:
        step += 1
        loss = train_step(model, optimizer, step)
        manager.save(step, state, metrics={"loss": loss})
        print(f"returned {step} {loss.hex()}", flush=True)
        if args.pace:
            time.sleep(args.pace)
    if args.hold:
        manager.wait()  # the durable saves are committed; the snapshots stay in memory
        print("holding", flush=True)
        time.sleep(MAX_SECONDS)
        return
    manager.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main()

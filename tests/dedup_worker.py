"""A fine-tuning loop over a frozen base that saves every step (run as a subprocess).

Usage: python dedup_worker.py RUN MODE SEED     (MODE: sync | async)

The model is a frozen base (two Linear layers, ~4 MB, ``requires_grad=False``) plus a
small trainable adapter, with AdamW over the adapter only, so every save after the
first reuses the base's file (a hard link) and writes the rest. The worker restores
the newest checkpoint of RUN if there is one, prints ``ready STEP``, then trains and
saves step after step until it is killed (or after two minutes, so an orphan cannot
run forever). ``committed STEP`` is printed once that step is durable: after
``save()`` returns in sync mode, after the next ``wait()`` in async mode.

The state of any step follows from SEED and the step alone (:func:`train_step`
draws its batch from a generator seeded with the step and leaves the global RNGs
alone), so test_dedup.py imports :func:`build` and :func:`train_step` to rebuild it.
"""

from __future__ import annotations

import sys
import time

import torch

import ckpts

KEEP = 3
MAX_SECONDS = 120.0
WIDTH = 256
HIDDEN = 2048  # the base: 2 x 256 x 2048 float32 weights, ~4 MB
RANK = 8
FROZEN_KEYS = ("base.0.weight", "base.0.bias", "base.2.weight", "base.2.bias")
TRAINABLE_KEYS = ("adapter.0.weight", "adapter.1.weight", "marker")


class AdapterNet(torch.nn.Module):
    """``base(x) + adapter(x)``: a base model and a low-rank adapter beside it."""

    marker: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Sequential(torch.nn.Linear(WIDTH, HIDDEN), torch.nn.ReLU(),
                                        torch.nn.Linear(HIDDEN, WIDTH))
        self.adapter = torch.nn.Sequential(torch.nn.Linear(WIDTH, RANK, bias=False),
                                           torch.nn.Linear(RANK, WIDTH, bias=False))
        self.register_buffer("marker", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x) + self.adapter(x)
        return out

    def base_weight(self, index: int) -> torch.Tensor:
        """The weight of the base's ``index``-th layer (0 or 2)."""
        layer = self.base[index]
        assert isinstance(layer, torch.nn.Linear)
        return layer.weight


def build(seed: int, *, frozen: bool = True
          ) -> tuple[ckpts.TrainState, AdapterNet, torch.optim.AdamW]:
    """The state at step 0: weights from ``seed``; with ``frozen``, the base does not
    require grad and AdamW holds the adapter only (else: a full fine-tune)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AdapterNet()
    model.base.requires_grad_(not frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return ckpts.TrainState(model=model, optimizer=optimizer), model, optimizer


def train_step(model: AdapterNet, optimizer: torch.optim.Optimizer, step: int) -> float:
    """One AdamW step on a batch that depends on ``step`` only; ``marker`` holds the step."""
    batch = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(step))
    loss = (model(batch) - batch).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.marker.fill_(float(step))
    return float(loss.item())


def main() -> None:
    run, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode not in ("sync", "async"):
        raise SystemExit(f"MODE must be sync or async, got {mode!r}")
    torch.set_num_threads(1)
    state, model, optimizer = build(seed)
    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(KEEP)],
                                      async_save=mode == "async")
    step = manager.restore(state) or 0
    print("ready", step, flush=True)
    in_flight: int | None = None
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline:
        step += 1
        loss = train_step(model, optimizer, step)  # async: overlaps the previous write
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

"""The nanoGPT-style loop of ``resume_loop_pitfall.py``, fixed: ``ckpts check-resume`` passes.

Usage: python resume_loop_fixed.py RUN_DIR

Two changes make it resume exactly:
- the batch drawn before the save is part of the state (``PrefetchedBatch``);
- after a resume, the evaluation and save of the restored step are not repeated.
"""

from __future__ import annotations

import sys
import time

import torch

import ckpts

MAX_ITERS = 24
EVAL_INTERVAL = 6
EVAL_ITERS = 2
BATCH_SIZE, BLOCK_SIZE, VOCAB = 4, 8, 16


class TinyLM(torch.nn.Module):
    """A bigram-ish language model with dropout: about 1,700 parameters."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.drop(torch.relu(self.embed(tokens))))
        return logits


DATA = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))


def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: random windows, drawn from the global torch RNG."""
    ix = torch.randint(len(DATA) - BLOCK_SIZE - 1, (BATCH_SIZE,))
    x = torch.stack([DATA[i : i + BLOCK_SIZE] for i in ix])
    y = torch.stack([DATA[i + 1 : i + 1 + BLOCK_SIZE] for i in ix])
    return x, y


def loss_of(model: TinyLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def estimate_loss(model: TinyLM) -> float:
    model.eval()
    losses = [loss_of(model, *get_batch()).item() for _ in range(EVAL_ITERS)]
    model.train()
    return sum(losses) / len(losses)


class PrefetchedBatch:
    """The batch drawn before save() and used after it: it belongs in the checkpoint."""

    def __init__(self) -> None:
        self.x, self.y = get_batch()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "y": self.y}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.x, self.y = state["x"], state["y"]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(1337)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = PrefetchedBatch()  # draws the first batch; a restore replaces it
    state = ckpts.TrainState(model=model, optimizer=optimizer, batch=batch)
    train(ckpts.CheckpointManager(sys.argv[1]), state, model, optimizer, batch)


def train(manager: ckpts.CheckpointManager, state: ckpts.TrainState, model: TinyLM,
          optimizer: torch.optim.Optimizer, batch: PrefetchedBatch) -> None:
    """Resume if the run has a checkpoint (no --resume flag), then train to MAX_ITERS."""
    resumed_at = manager.restore(state)
    iter_num = resumed_at or 0

    while True:
        if iter_num % EVAL_INTERVAL == 0 and iter_num != resumed_at:  # done before the save
            val_loss = estimate_loss(model)
            if iter_num > 0:
                manager.save(iter_num, state, metrics={"val_loss": val_loss})
        if iter_num == MAX_ITERS:
            break
        loss = loss_of(model, batch.x, batch.y)
        batch.x, batch.y = get_batch()  # prefetch the next batch while the step runs
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iter_num += 1
        time.sleep(0.01)  # a step takes a moment, as in real training


if __name__ == "__main__":
    main()

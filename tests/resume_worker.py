"""A training run for the bit-exact resume test (run as a subprocess).

Usage: python resume_worker.py RUN_DIR TOTAL_STEPS [SLOW_AFTER_STEP]

Trains a small transformer with dropout, AdamW, warmup+cosine LambdaLR and a
shuffled DataLoader, checkpointing every 5 steps. Prints ``resumed STEP`` then
``loss STEP VALUE`` per step. After SLOW_AFTER_STEP it sleeps a little each step,
so the test can SIGKILL it at an arbitrary point mid-epoch.
"""

from __future__ import annotations

import math
import sys
import time

import torch

import ckpts

SAVE_EVERY = 5
WARMUP = 4


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 20, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.block = torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64,
                                                      dropout=0.1, batch_first=True)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens)))


def main() -> None:
    run, total = sys.argv[1], int(sys.argv[2])
    slow_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    data = torch.randint(0, 20, (96, 9), generator=torch.Generator().manual_seed(1))
    dataset = torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:])
    loader = ckpts.ResumableLoader(torch.utils.data.DataLoader(dataset, batch_size=8,
                                                               shuffle=True))
    model = TinyTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    def warmup_cosine(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, total - WARMUP)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    state = ckpts.TrainState(model=model, optimizer=optimizer, scheduler=scheduler,
                             loader=loader)
    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(2)])
    step = manager.restore(state) or 0
    print("resumed", step, flush=True)
    while step < total:
        for inputs, targets in loader:
            step += 1
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            print("loss", step, repr(loss.item()), flush=True)
            if step % SAVE_EVERY == 0 or step == total:
                manager.save(step, state, metrics={"loss": loss.item()}, epoch=loader.epoch)
            if slow_after is not None and step > slow_after:
                time.sleep(0.05)
            if step == total:
                break


if __name__ == "__main__":
    main()

"""A plain training loop that survives being killed: run it, Ctrl-C or kill -9 it, run it again.

    python examples/train_resume.py runs/example

Each run resumes from the newest intact checkpoint and continues exactly as if it
had never stopped; at the end it loads the best checkpoint for inference.
"""

from __future__ import annotations

import signal
import sys

import torch

import ckpts

STEPS = 300


def main(run_dir: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    inputs = torch.randn(512, 16)
    targets = inputs.sum(dim=1, keepdim=True).sin()
    train = torch.utils.data.TensorDataset(inputs[:448], targets[:448])
    loader = ckpts.ResumableLoader(torch.utils.data.DataLoader(train, batch_size=32,
                                                               shuffle=True))
    state = ckpts.TrainState(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)

    with ckpts.CheckpointManager(
        run_dir,
        save=[ckpts.Every(steps=50), ckpts.OnImprovement("val_loss", min_delta=1e-4)],
        keep=[ckpts.KeepBest(3, "val_loss"), ckpts.KeepLast(1)],
        save_on_signal=(signal.SIGTERM,),  # preemption: save at the next step, then exit
        async_save=True,
    ) as manager:
        step = manager.restore(state) or 0
        print(f"starting at step {step}")
        while step < STEPS:
            for batch_inputs, batch_targets in loader:
                step += 1
                loss = torch.nn.functional.mse_loss(model(batch_inputs), batch_targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                metrics = {"train_loss": loss.item()}
                if step % 10 == 0:
                    model.eval()
                    with torch.no_grad():
                        metrics["val_loss"] = torch.nn.functional.mse_loss(
                            model(inputs[448:]), targets[448:]).item()
                    model.train()
                manager.save(step, state, metrics=metrics, epoch=loader.epoch,
                             force=step == STEPS)
                if step == STEPS:
                    break
        best = manager.best("val_loss")
    if best is not None:
        ckpts.load_weights(best, model)
        print(f"best: step {best.step}, val_loss {best.metrics['val_loss']:.4f} ({best.path})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/example")

"""Lightning with ckpts: one plugin and a resumable loader, and resume is exact. Kill it, run it
again.

    python examples/train_lightning.py runs/lightning [EPOCHS]

ModelCheckpoint keeps its usual policies (the 2 best by val_loss, plus last.ckpt), after
each validation: twice an epoch here, so half the checkpoints are mid-epoch.
CkptsCheckpointIO writes each .ckpt as an atomic ckpts run with every RNG in it, and
ckpts.ResumableLoader lets a mid-epoch checkpoint resume at the next batch, so a run
killed at any instant (or run again with more EPOCHS) continues from last.ckpt exactly as
if it had never stopped. At the end, the best checkpoint's weights load with
ckpts.load_weights. Runs on a CPU in a few seconds, with the unified ``lightning``
package or with ``pytorch_lightning``: the plugin is the same.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl  # pip install lightning
except ImportError:
    import pytorch_lightning as pl  # pip install pytorch-lightning (the ckpts[lightning] extra)

import ckpts
from ckpts.integrations.lightning import CkptsCheckpointIO

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Regressor(pl.LightningModule):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.GELU(),
                                       torch.nn.Dropout(0.1), torch.nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Data(pl.LightningDataModule):
    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(512, 16, generator=generator)
        targets = inputs.sum(dim=1, keepdim=True).sin()
        self.train = TensorDataset(inputs[:448], targets[:448])
        self.val = TensorDataset(inputs[448:], targets[448:])

    def train_dataloader(self) -> ckpts.ResumableLoader:
        # Lightning saves its position with each checkpoint: a mid-epoch one resumes exactly
        return ckpts.ResumableLoader(DataLoader(self.train, batch_size=32, shuffle=True))

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.val, batch_size=64)


class ShowStart(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        print(f"starting at step {trainer.global_step}")


def main(run_dir: str, epochs: int) -> None:
    pl.seed_everything(0, verbose=False)
    best = pl.callbacks.ModelCheckpoint(dirpath=run_dir, monitor="val_loss", save_top_k=2,
                                        save_last=True)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", deterministic=True,
        val_check_interval=7,  # validate (and checkpoint) every 7 of an epoch's 14 steps
        plugins=[CkptsCheckpointIO()],  # the one line ckpts adds
        callbacks=[best, ShowStart()],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Regressor(), datamodule=Data(), ckpt_path="last")  # "last": resume if there is one

    # each .ckpt is a ckpts run holding one checkpoint (`ckpts best RUN_DIR --metric val_loss`
    # prints the same one's path)
    checkpoint = ckpts.CheckpointManager(best.best_model_path).latest()
    if checkpoint is None:
        raise SystemExit(f"no committed checkpoint in {best.best_model_path}")
    model = Regressor()
    ckpts.load_weights(checkpoint, model)
    print(f"best: {Path(best.best_model_path).name} "
          f"val_loss={checkpoint.metrics['val_loss']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/lightning",
         int(sys.argv[2]) if len(sys.argv) > 2 else 4)

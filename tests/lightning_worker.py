"""A tiny Lightning fit through CkptsCheckpointIO, run in a subprocess by test_lightning.py.

Usage: lightning_worker.py CKPT_DIR LOSS_LOG WEIGHTS_OUT [--epochs N] [--kill-at-step S]
       [--resume] [--async]

Logs ``global_step loss.hex()`` per training step to LOSS_LOG, kills itself with
SIGKILL once ``--kill-at-step`` is reached (mid-epoch, after earlier checkpoints were
committed), resumes with ``ckpt_path="last"`` with ``--resume``, and writes the final
weights to WEIGHTS_OUT with safetensors.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file

from ckpts.integrations.lightning import CkptsCheckpointIO

warnings.filterwarnings("ignore")  # Lightning's advice (num_workers, ...) is noise here


class TinyRegressor(pl.LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Dropout(0.3),
            torch.nn.Linear(width, 1),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class LossLog(Callback):
    def __init__(self, path: str, kill_at_step: int | None) -> None:
        self.file = open(path, "a")  # noqa: SIM115 - kept open for the whole fit
        self.kill_at_step = kill_at_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.file.write(f"{trainer.global_step} {outputs['loss'].item().hex()}\n")
        self.file.flush()
        if trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def data() -> tuple[torch.utils.data.DataLoader[Any], torch.utils.data.DataLoader[Any]]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 4, generator=generator)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])).sin()
    train = torch.utils.data.TensorDataset(x[:64], y[:64])
    val = torch.utils.data.TensorDataset(x[64:], y[64:])
    return (torch.utils.data.DataLoader(train, batch_size=8, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=16))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt_dir")
    parser.add_argument("loss_log")
    parser.add_argument("weights_out")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--async", dest="async_save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = TinyRegressor()
    train, val = data()
    checkpoints = ModelCheckpoint(dirpath=args.ckpt_dir, monitor="val_loss", save_top_k=2,
                                  save_last=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, deterministic=True,
        plugins=[CkptsCheckpointIO(async_save=args.async_save)],
        callbacks=[checkpoints, LossLog(args.loss_log, args.kill_at_step)],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, train, val, ckpt_path="last" if args.resume else None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights_out)
    with open(args.weights_out + ".best", "w") as f:
        f.write(checkpoints.best_model_path)


if __name__ == "__main__":
    main(sys.argv[1:])

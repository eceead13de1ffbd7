"""A tiny Lightning fit through CkptsCheckpointIO, run in a subprocess by test_lightning.py.

Usage: lightning_worker.py CKPT_DIR LOSS_LOG WEIGHTS_OUT [--package P] [--epochs N]
       [--every-n-steps S] [--resumable] [--kill-at-step S] [--resume [PATH]] [--async]

Fits with the Trainer of ``--package`` (``pytorch_lightning``, the default, or the
unified ``lightning``). Logs ``global_step loss.hex()`` per training step to LOSS_LOG,
kills itself with SIGKILL once ``--kill-at-step`` is reached (after earlier checkpoints
were committed), resumes with ``--resume`` (from ``last``, or from PATH), and writes the
final weights to WEIGHTS_OUT with safetensors and the best checkpoint's path to
WEIGHTS_OUT.best.

Checkpoints: the 2 best by ``val_loss`` (at each epoch's end) and ``last.ckpt``; with
``--every-n-steps`` a second ModelCheckpoint writes ``last.ckpt`` every S steps instead,
mid-epoch too. ``--resumable`` wraps the training DataLoader in ``ckpts.ResumableLoader``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
import warnings
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file

import ckpts
from ckpts.integrations.lightning import CkptsCheckpointIO

warnings.filterwarnings("ignore")  # Lightning's advice (num_workers, ...) is noise here

# each Lightning package's name -> the module holding its Trainer, LightningModule, callbacks
PACKAGES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}


def trainer_package(package: str) -> ModuleType:
    """``pytorch_lightning``, or ``lightning.pytorch`` for the unified ``lightning``."""
    return importlib.import_module(PACKAGES[package])


@functools.cache
def regressor_class(package: str) -> type[Any]:
    """TinyRegressor as a LightningModule of ``package`` (a Trainer takes only its own)."""
    pl = trainer_package(package)

    class TinyRegressor(pl.LightningModule):  # type: ignore[misc, name-defined]
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

    return TinyRegressor


def __getattr__(name: str) -> Any:
    if name == "TinyRegressor":  # the pytorch_lightning module, as test_import.py uses it
        return regressor_class("pytorch_lightning")
    raise AttributeError(name)


def loss_log(package: str, path: str, kill_at_step: int | None) -> Any:
    """A callback of ``package`` that logs each step's loss and SIGKILLs at ``kill_at_step``."""
    pl = trainer_package(package)

    class LossLog(pl.Callback):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.file = open(path, "a")  # noqa: SIM115 - kept open for the whole fit

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self.file.write(f"{trainer.global_step} {outputs['loss'].item().hex()}\n")
            self.file.flush()
            if trainer.global_step == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

        def teardown(self, trainer: Any, module: Any, stage: str) -> None:
            self.file.close()

    return LossLog()


def data() -> tuple[torch.utils.data.DataLoader[Any], torch.utils.data.DataLoader[Any]]:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 4, generator=generator)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])).sin()
    train = torch.utils.data.TensorDataset(x[:64], y[:64])
    val = torch.utils.data.TensorDataset(x[64:], y[64:])
    return (torch.utils.data.DataLoader(train, batch_size=8, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=16))


def fit(package: str, ckpt_dir: str, loss_path: str, *, epochs: int = 4,
        every_n_steps: int | None = None, resumable: bool = False,
        kill_at_step: int | None = None, resume: str | None = None,
        async_save: bool = False) -> tuple[Any, Any]:
    """Seed, fit TinyRegressor as the module docstring says; return the module and the
    ModelCheckpoint that keeps the 2 best."""
    pl = trainer_package(package)
    pl.seed_everything(0, verbose=False)
    model = regressor_class(package)()
    train, val = data()
    best = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", save_top_k=2,
                                        save_last=every_n_steps is None)
    callbacks = [best, loss_log(package, loss_path, kill_at_step)]
    if every_n_steps is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, every_n_train_steps=every_n_steps, save_top_k=0, save_last=True))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True,
        plugins=[CkptsCheckpointIO(async_save=async_save)], callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, ckpts.ResumableLoader(train) if resumable else train, val,
                ckpt_path=resume)
    return model, best


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt_dir")
    parser.add_argument("loss_log")
    parser.add_argument("weights_out")
    parser.add_argument("--package", choices=sorted(PACKAGES), default="pytorch_lightning")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every-n-steps", type=int)
    parser.add_argument("--resumable", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--resume", nargs="?", const="last")
    parser.add_argument("--async", dest="async_save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, best = fit(args.package, args.ckpt_dir, args.loss_log, epochs=args.epochs,
                      every_n_steps=args.every_n_steps, resumable=args.resumable,
                      kill_at_step=args.kill_at_step, resume=args.resume,
                      async_save=args.async_save)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights_out)
    with open(args.weights_out + ".best", "w") as f:
        f.write(best.best_model_path)


if __name__ == "__main__":
    main(sys.argv[1:])

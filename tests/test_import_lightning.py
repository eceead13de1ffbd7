"""Importing the .ckpt files Lightning writes itself: ModelCheckpoint's score becomes the metric."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import ckpts
from lightning_worker import TinyRegressor, data
from test_cli import ckpts_session

pl = pytest.importorskip("pytorch_lightning")

pytestmark = [
    # Lightning's notices about this tiny CPU fit, not ours
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*torch.utils._pytree.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*:FutureWarning"),
]


def test_native_ckpt_files_import_with_their_monitored_score_for_ckpts_best(
        tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    saved = tmp_path / "checkpoints"
    checkpointing = pl.callbacks.ModelCheckpoint(
        dirpath=saved, filename="{epoch}-{step}", monitor="val_loss", save_top_k=-1,
        save_last=True)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                         callbacks=[checkpointing], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(TinyRegressor(), *data())  # Lightning's own TorchCheckpointIO writes the files
    scores = {Path(path).name: float(score) for path, score in checkpointing.best_k_models.items()}
    assert sorted(scores) == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt",
                              "epoch=2-step=24.ckpt"]
    best_name = min(scores, key=scores.__getitem__)
    moved = tmp_path / "moved"  # a copied folder: ranked by the file's name
    shutil.copytree(saved, moved)

    run, last_run = tmp_path / "run", tmp_path / "last"
    results = ckpts_session(
        ["import", saved / "epoch=0-step=8.ckpt", run],
        ["import", moved / "epoch=1-step=16.ckpt", run],
        ["import", saved / "epoch=2-step=24.ckpt", run],
        ["best", run, "--metric", "val_loss"],
        ["ls", run, "--json"],
        ["import", saved / "last.ckpt", last_run])
    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]

    assert {row["step"]: row["metrics"] for row in json.loads(results[4].stdout)} == {
        8: {"val_loss": scores["epoch=0-step=8.ckpt"]},
        16: {"val_loss": scores["epoch=1-step=16.ckpt"]},
        24: {"val_loss": scores["epoch=2-step=24.ckpt"]},
    }
    best_step = int(re.search(r"step=(\d+)", best_name).group(1))  # type: ignore[union-attr]
    assert results[3].stdout.strip() == str(run / f"step-{best_step:08d}")
    # last.ckpt is in no top k: Lightning records no score for it, so it gets none
    (last,) = ckpts.CheckpointManager(last_run).checkpoints()
    assert (last.step, last.metrics) == (24, {})

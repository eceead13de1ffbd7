"""Which end of a metric is best, as ``ls``, ``best``, ``prune`` and ``report`` judge it.

The run looks like a Trainer's: ``eval_loss`` (lower is better), ``eval_accuracy``
(higher), ``eval_samples_per_second`` (a throughput: no better end) and Trainer's
fractional ``epoch`` logged as a metric beside the epoch the checkpoint was saved with.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpts
from ckpts.cli._common import metric_direction
from ckpts.cli.report import write_report
from test_cli import ckpts_session, parse_json

METRICS = {  # step -> metrics; best eval_loss and eval_accuracy at 20, fastest at 30
    10: {"eval_loss": 0.9, "eval_accuracy": 0.5, "eval_samples_per_second": 100.0, "epoch": 0.5},
    20: {"eval_loss": 0.6, "eval_accuracy": 0.8, "eval_samples_per_second": 90.0, "epoch": 1.0},
    30: {"eval_loss": 0.7, "eval_accuracy": 0.7, "eval_samples_per_second": 120.0, "epoch": 1.5},
}


class TinyConfig:
    """What a transformers config offers ckpts: ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "tiny", "hidden_size": 2}


class ConfiguredLinear(torch.nn.Linear):
    """A module with a ``config``, as a transformers model has: its config is recorded."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.config = TinyConfig()


def trainer_like_run(run: Path, model: torch.nn.Module) -> Path:
    with ckpts.CheckpointManager(run) as manager:
        for step, metrics in METRICS.items():
            manager.save(step, ckpts.TrainState(model=model), metrics=metrics,
                         epoch=int(metrics["epoch"]))
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trainer_like_run(tmp_path_factory.mktemp("direction") / "run", torch.nn.Linear(2, 2))


def test_metric_direction_reads_the_words_of_the_name() -> None:
    lower = ["val_loss", "loss", "eval_perplexity", "valPPL", "top5_err", "wer", "test/mse"]
    higher = ["eval_accuracy", "top1_acc", "eval_f1", "rouge1", "rougeLsum", "bleu4",
              "eval_exact_match", "eval_auc", "precision", "recall", "reward"]
    unknown = ["eval_samples_per_second", "eval_runtime", "learning_rate", "grad_norm",
               "epoch", "stderr", "acc_loss", "total_flos"]
    assert [metric_direction(m) for m in lower] == ["min"] * len(lower)
    assert [metric_direction(m) for m in higher] == ["max"] * len(higher)
    assert [metric_direction(m) for m in unknown] == [None] * len(unknown)


def test_ls_best_and_prune_rank_each_metric_by_its_direction(run: Path) -> None:
    table, as_json, accuracy, lowest_accuracy, speed, pruned = ckpts_session(
        ["ls", run], ["ls", run, "--json"], ["best", run, "--metric", "eval_accuracy"],
        ["best", run, "--metric", "eval_accuracy", "--mode", "min"],
        ["ls", run, "--metric", "eval_samples_per_second", "--mode", "max", "--json"],
        ["prune", run, "--keep-best", "1", "--metric", "eval_accuracy", "--dry-run"])
    assert [row["markers"] for row in parse_json(as_json)] == [
        [], ["best(eval_loss)", "best(eval_accuracy)"], ["latest"]]  # no best throughput
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["step", "created", "size", "epoch", "eval_loss", "eval_accuracy",
                              "eval_samples_per_second", "markers"]  # one epoch column
    assert [line.split()[5] for line in lines] == ["0.5", "1", "1.5"]  # Trainer's epoch
    assert accuracy.stdout == f"{run / 'step-00000020'}\n"
    assert lowest_accuracy.stdout == f"{run / 'step-00000010'}\n"
    assert parse_json(speed)[2]["markers"] == ["latest", "best(eval_samples_per_second)"]
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("would remove step-00000010 ")  # keeps 20 (best) and 30
    assert "would remove 1 of 3" in pruned.stdout


def test_report_ranks_by_eval_loss_stars_only_known_directions_and_suggests_an_export(
        run: Path, tmp_path: Path) -> None:
    page = write_report(run, tmp_path / "plain.html").read_text()
    assert re.search(r'id="recommendation" data-step="20"', page)
    assert "lowest eval_loss (0.6)" in page
    charts = dict(re.findall(r'data-metric="([^"]+)"(.*?)</svg>', page))
    assert sorted(charts) == ["eval_accuracy", "eval_loss", "eval_samples_per_second"]
    assert 'class="point kept best" data-step="20"' in charts["eval_accuracy"]
    assert "best" not in charts["eval_samples_per_second"]
    assert (f'<code id="export">ckpts export {run / "step-00000020"} model.safetensors '
            "--format safetensors</code>") in page  # no Hugging Face config: no --format hf

    by_accuracy = write_report(run, tmp_path / "acc.html", metric="eval_accuracy").read_text()
    assert "highest eval_accuracy (0.8)" in by_accuracy

    configured = trainer_like_run(tmp_path / "configured", ConfiguredLinear())
    page = write_report(configured, tmp_path / "hf.html").read_text()
    assert (f'<code id="export">ckpts export {configured / "step-00000020"} OUT --format hf'
            "</code>") in page

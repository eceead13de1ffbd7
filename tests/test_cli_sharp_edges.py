"""CLI sharp edges, each with its bad input: damaged checkpoints in ``ls``/``best``, and
``diff`` naming the differing non-tensor keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpts

CKPTS = str(Path(sys.executable).parent / "ckpts")
VAL_LOSS = {10: 0.5, 20: 0.3, 30: 0.4}  # best (min) at 20


class RunConfig:
    """nanoGPT-style configuration kept in the checkpoint as a Stateful."""

    def __init__(self, **config: Any) -> None:
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = state["config"]


def ckpts_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTS, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    model = torch.nn.Linear(3, 2)
    # the model does not change: dedup=False gives each checkpoint its own bytes, which
    # the tests damage in place one checkpoint at a time
    with ckpts.CheckpointManager(tmp_path / "run", dedup=False) as manager:
        for step, val_loss in VAL_LOSS.items():
            config = RunConfig(out_dir=f"out-{step}", lr=0.1, sizes=(3, step), seeds={0: 1})
            manager.save(step, ckpts.TrainState(model=model, run=config),
                         metrics={"val_loss": val_loss})
    return tmp_path / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def test_ls_marks_a_checkpoint_whose_files_no_longer_match_the_manifest_sizes(run: Path) -> None:
    truncate(run / "step-00000020" / "model.safetensors")
    (run / "step-00000030" / "rng.safetensors").unlink()

    rows = {row["step"]: row for row in json.loads(ckpts_cli("ls", run, "--json").stdout)}
    table = ckpts_cli("ls", run).stdout.splitlines()

    assert rows[10]["damaged"] is None and rows[10]["markers"] == ["best(val_loss)"]
    assert rows[20]["damaged"].startswith("model.safetensors has ")
    assert rows[20]["damaged"].endswith("bytes, the manifest says "
                                        f"{rows[20]['damaged'].split()[-1]}")
    assert "damaged" in rows[20]["markers"] and "best(val_loss)" not in rows[20]["markers"]
    assert rows[30]["damaged"] == "rng.safetensors is missing (or not a regular file)"
    assert rows[30]["markers"] == ["latest", "damaged"]  # damaged: never the best
    assert table[2].split()[0] == "20" and table[2].endswith("damaged")


def test_best_skips_a_damaged_checkpoint_with_a_note(run: Path) -> None:
    truncate(run / "step-00000020" / "model.safetensors")

    result = ckpts_cli("best", run, "--metric", "val_loss")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{run / 'step-00000030'}\n"  # 0.4, the best intact one
    assert result.stderr.startswith("note: skipping step 20, which is damaged "
                                    "(model.safetensors has ")
    assert f"`ckpts verify {run}`" in result.stderr


def test_best_fails_when_every_checkpoint_with_the_metric_is_damaged(run: Path) -> None:
    for step in VAL_LOSS:
        truncate(run / f"step-{step:08d}" / "model.safetensors")

    result = ckpts_cli("best", run, "--metric", "val_loss")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(
        "error: every checkpoint with the metric 'val_loss' in ")


def test_diff_names_the_differing_non_tensor_keys(run: Path) -> None:
    a, b = run / "step-00000010", run / "step-00000020"

    table = ckpts_cli("diff", a, b)
    report = json.loads(ckpts_cli("diff", a, b, "--json").stdout)

    assert table.returncode == 0, table.stderr
    assert "non-tensor state differs in: run\n" in table.stdout
    assert "  run.config.out_dir: 'out-10' -> 'out-20'" in table.stdout
    assert "  run.config.sizes.1: 10 -> 20" in table.stdout  # a tuple's item
    assert "run.config.lr" not in table.stdout and "run.config.seeds" not in table.stdout
    assert report["state_changed"] == ["run"]
    differences = {d["path"]: d for d in report["state_differences"]}
    assert differences["run.config.out_dir"] == {"path": "run.config.out_dir",
                                                 "a": "'out-10'", "b": "'out-20'"}
    assert set(differences) == {"run.config.out_dir", "run.config.sizes.1"}

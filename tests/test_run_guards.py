"""A run folder used wrongly: a checkpoint given as the run, foreign checkpoints, nothing to
restore."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import ckpts
from conftest import run_contents


def state() -> ckpts.TrainState:
    return ckpts.TrainState(model=torch.nn.Linear(4, 4))


def test_a_checkpoint_folder_is_refused_as_a_run(tmp_path: Path) -> None:
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        manager.save(60, state())
    checkpoint = tmp_path / "run" / "step-00000060"
    before = sorted(p.name for p in checkpoint.iterdir())
    with pytest.raises(ckpts.InvalidArgumentError) as info:
        ckpts.CheckpointManager(checkpoint)
    assert "is a checkpoint, not a run" in str(info.value)
    assert f"CheckpointManager({str(tmp_path / 'run')!r})" in str(info.value)
    assert sorted(p.name for p in checkpoint.iterdir()) == before


@pytest.mark.parametrize("foreign", ["ckpt.pt", "last.ckpt", "checkpoint-500"])
def test_restore_names_foreign_checkpoints_and_the_import_command(
        tmp_path: Path, foreign: str, caplog: pytest.LogCaptureFixture) -> None:
    if foreign.startswith("checkpoint-"):
        (tmp_path / foreign).mkdir()
    else:
        (tmp_path / foreign).write_bytes(b"not ours")
    with ckpts.CheckpointManager(tmp_path) as manager:
        with caplog.at_level(logging.WARNING, logger="ckpts"):
            assert manager.restore(state()) is None
        assert foreign in caplog.text and f"ckpts import SRC {tmp_path}" in caplog.text
        with pytest.raises(ckpts.NotACheckpointError) as info:
            manager.restore(state(), missing_ok=False)
    assert foreign in str(info.value) and "ckpts import" in str(info.value)
    assert run_contents(tmp_path) == [foreign]  # nothing written or removed


def test_restore_with_missing_ok_false_on_an_empty_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with ckpts.CheckpointManager(tmp_path / "new") as manager:
        with caplog.at_level(logging.WARNING, logger="ckpts"):
            assert manager.restore(state()) is None  # a fresh run: no warning
        assert caplog.text == ""
        with pytest.raises(ckpts.NotACheckpointError, match="missing_ok=True"):
            manager.restore(state(), missing_ok=False)


def test_a_url_never_becomes_a_local_folder(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckpts.CheckpointError, match="nosuchprotocol://run"):
        ckpts.CheckpointManager("nosuchprotocol://run")
    run = f"memory://{tmp_path.name}/run"
    with ckpts.CheckpointManager(run) as manager:
        manager.save(1, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    assert [c.path for c in manager.checkpoints()] == [f"{run}/step-00000001"]
    assert list(tmp_path.iterdir()) == []  # no folder named 'memory:' or 'nosuchprotocol:'
    file_url = ckpts.CheckpointManager(f"file://{tmp_path}/local")
    file_url.save(1, ckpts.TrainState(model=torch.nn.Linear(2, 2)))
    assert (tmp_path / "local" / "step-00000001" / "manifest.json").is_file()

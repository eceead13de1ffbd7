"""Usage errors of every ``ckpts`` command: one line on stderr, exit code 2, no torch.

A missing option or argument, a bad value, an unknown option or command reads
``ckpts best: missing option '--metric'; see ckpts best --help``. None of them, nor
the bad input ``export`` and ``evaluate`` can check from their arguments and the
manifest, imports torch (seconds of start-up). The commands run through
:func:`test_cli.ckpts_session`, which records whether torch got imported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ckpts
from test_cli import Result, ckpts_script, ckpts_session

USAGE_LINE = re.compile(r"(ckpts(?: [a-z-]+)?): \S.*; see \1 --help\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two checkpoints of a plain module (no Hugging Face config)."""
    run = tmp_path_factory.mktemp("usage") / "run"
    with ckpts.CheckpointManager(run) as manager:
        for step in (10, 20):
            manager.save(step, ckpts.TrainState(model=torch.nn.Linear(2, 2)),
                         metrics={"val_loss": 1.0 / step})
    return run


def assert_usage_error(result: Result, command: list[str]) -> None:
    assert (result.returncode, result.stdout) == (2, ""), (command, result)
    assert USAGE_LINE.fullmatch(result.stderr), (command, result.stderr)
    assert not result.imported_torch, command


def test_every_commands_usage_errors_are_one_line_without_torch(run: Path) -> None:
    checkpoint = run / "step-00000010"
    commands = [
        ["best", run], ["ls"], ["ls", run, "--mode", "mid"], ["ls", run, "--bogus"],
        ["show", checkpoint, "extra"], ["du"], ["diff", checkpoint], ["verify"],
        ["prune", run, "--keep-last", "0"], ["pin", run, "abc"], ["unpin"],
        ["plot", run], ["report", run, "--mode", "mid"], ["export", checkpoint, "out"],
        ["export", checkpoint, "out", "--format", "onnx"],
        ["export", checkpoint, "out", "--format", "hf", "--dtype", "int3"],
        ["evaluate", run, "eval.py"], ["import"], ["check-resume"], ["demo", "--bogus"],
        ["bogus"],
    ]
    results = ckpts_session(*commands)
    for command, result in zip(commands, results, strict=True):
        assert_usage_error(result, [str(arg) for arg in command])
    assert results[0].stderr == "ckpts best: missing option '--metric'; see ckpts best --help\n"
    assert results[2].stderr == ("ckpts ls: invalid value for '--mode': 'mid' is not one of "
                                 "'min', 'max'; see ckpts ls --help\n")
    assert results[-1].stderr == "ckpts: no such command 'bogus'; see ckpts --help\n"


def test_the_installed_script_prints_a_usage_error_as_one_line(run: Path) -> None:
    result = ckpts_script("prune", run, "--keep-best", "two")
    assert (result.returncode, result.stdout) == (2, "")
    assert USAGE_LINE.fullmatch(result.stderr), result.stderr
    assert result.stderr.startswith("ckpts prune: invalid value for '--keep-best'")


def test_export_and_evaluate_refuse_bad_input_before_importing_torch(
        run: Path, tmp_path: Path) -> None:
    checkpoint = run / "step-00000010"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    results = ckpts_session(
        ["export", checkpoint, tmp_path / "hf", "--format", "hf"],
        ["export", checkpoint, tmp_path / "w.safetensors", "--format", "safetensors",
         "--max-shard-size", "lots"],
        ["export", checkpoint, taken, "--format", "hf"],
        ["evaluate", run, tmp_path / "missing.py", "--metric", "val_acc"])
    for result, fragment in zip(results, ("needs the model's Hugging Face config", "'lots'",
                                          "already exists", "missing.py does not exist"),
                                strict=True):
        assert result.returncode == 2 and result.stdout == "", result
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert fragment in result.stderr
        assert not result.imported_torch, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

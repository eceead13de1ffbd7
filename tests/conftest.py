"""Shared fixtures: tiny models built from configs (no downloads)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckpts

pytest_plugins = ["s3_server"]


class TinyNet(torch.nn.Module):
    """Two linear layers, a BatchNorm (buffers) and dropout."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, width)
        self.norm = torch.nn.BatchNorm1d(width)
        self.drop = torch.nn.Dropout(0.1)
        self.fc2 = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def run_contents(run: Path) -> list[str]:
    """Names in a run directory, without the lock files and the metrics history (small
    metadata)."""
    return sorted(p.name for p in run.iterdir()
                  if p.name not in (".ckpts.lock", ".ckpts-updates.lock", ".ckpts-history.jsonl"))


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture
def tiny_state() -> tuple[ckpts.TrainState, TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 3)
    return ckpts.TrainState(model=model, optimizer=optimizer), model, optimizer


def assert_state_dicts_equal(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), key
            assert x.dtype == y.dtype and torch.equal(x, y), key
        elif isinstance(x, dict):
            assert_state_dicts_equal(x, y)
        elif isinstance(x, (list, tuple)):
            assert type(x) is type(y) and len(x) == len(y), key
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                if isinstance(u, dict):
                    assert_state_dicts_equal(u, v)
                elif isinstance(u, torch.Tensor):
                    assert torch.equal(u, v), (key, i)
                else:
                    assert u == v or (u != u and v != v), (key, i)
        else:
            assert x == y or (x != x and y != y), key


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 48 MB filesystem (tmpfs), mounted by the test; skipped where that is impossible."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)

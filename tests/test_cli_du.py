"""``ckpts du`` and ``ckpts prune --keep-within`` on runs whose checkpoints share files.

A model with a frozen base, saved with ``dedup`` on, hard-links the base's file
into every checkpoint. The expected numbers are computed here from the files
themselves (``os.stat``: one inode counted once, at the oldest checkpoint holding
it), independently of :mod:`ckpts._run.usage`. The commands run through
:func:`test_cli.ckpts_session`, several per subprocess.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.filesize import decimal

import ckpts
from s3_server import S3Bucket
from test_cli import Result, assert_bad_input, ckpts_session, parse_json
from test_cli_urls import remote_session

STEPS = [10, 20, 30, 40]


class FrozenBase(torch.nn.Module):
    """A frozen 64x64 base (16.6 kB of weights, equal in every checkpoint) under a small
    trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 2)
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.base(x)))
        return out


def save_run(run: str | Path, *, dedup: bool, storage_options: dict[str, Any] | None = None
             ) -> None:
    """Train the head a little before each of four saves (the base never changes)."""
    torch.manual_seed(0)
    model = FrozenBase()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.9)
    with ckpts.CheckpointManager(run, dedup=dedup, storage_options=storage_options) as manager:
        for step in STEPS:
            model(torch.randn(4, 64)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            manager.save(step, ckpts.TrainState(model=model, optimizer=optimizer))


@dataclass(frozen=True)
class DiskUsage:
    """Sizes counted from the files on disk: per step, and for the run."""

    logical: dict[int, int]
    physical: dict[int, int]
    shared: dict[int, int]
    run_physical: int
    run_shared: int


def disk_usage(run: Path) -> DiskUsage:
    """Count ``run``'s checkpoint files by inode: a file's bytes count once, at the oldest
    checkpoint holding them; shared bytes are those of inodes in two or more checkpoints."""
    holders: dict[tuple[int, int], set[int]] = {}
    files: dict[int, dict[tuple[int, int], int]] = {}
    for folder in sorted(run.glob("step-*")):
        step = int(folder.name.removeprefix("step-"))
        stats = [path.stat() for path in folder.iterdir() if path.is_file()]
        files[step] = {(st.st_dev, st.st_ino): st.st_size for st in stats}
        for inode in files[step]:
            holders.setdefault(inode, set()).add(step)
    sizes = {inode: size for held in files.values() for inode, size in held.items()}
    return DiskUsage(
        logical={step: sum(held.values()) for step, held in files.items()},
        physical={step: sum(size for inode, size in held.items() if min(holders[inode]) == step)
                  for step, held in files.items()},
        shared={step: sum(size for inode, size in held.items() if len(holders[inode]) > 1)
                for step, held in files.items()},
        run_physical=sum(sizes.values()),
        run_shared=sum(size for inode, size in sizes.items() if len(holders[inode]) > 1),
    )


def copy_run(run: Path, target: Path) -> Path:
    """A copy of ``run`` whose files share inodes as the original's do (``shutil.copytree``
    would copy a hard-linked file once per name)."""
    copies: dict[tuple[int, int], Path] = {}
    target.mkdir()
    for path in sorted(run.rglob("*")):
        copy = target / path.relative_to(run)
        if path.is_dir():
            copy.mkdir()
            continue
        inode = (path.stat().st_dev, path.stat().st_ino)
        if inode in copies:
            os.link(copies[inode], copy)
        else:
            copies[inode] = Path(shutil.copy2(path, copy))
    return target


def table_rows(result: Result) -> dict[str, list[str]]:
    """``du``'s table by first cell (step or ``total``); cells are two or more spaces apart."""
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert re.split(r"\s{2,}", header)[:5] == ["step", "logical", "physical", "shared", "savings"]
    rows = [re.split(r"\s{2,}", line) for line in lines if not line.startswith("physical")]
    return {row[0]: row for row in rows}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shared/``: four checkpoints saved with dedup; ``plain/``: the same, without."""
    root = tmp_path_factory.mktemp("du")
    save_run(root / "shared", dedup=True)
    save_run(root / "plain", dedup=False)
    return root


def test_du_counts_each_shared_file_once_as_the_inodes_on_disk(template: Path) -> None:
    run = template / "shared"
    expected = disk_usage(run)
    assert expected.run_shared > 0  # the frozen base is one inode in all four checkpoints
    as_json, table = ckpts_session(["du", run, "--json"], ["du", run])

    usage = parse_json(as_json)
    assert [c["step"] for c in usage["checkpoints"]] == STEPS
    for row in usage["checkpoints"]:
        step = row["step"]
        assert row["path"] == str(run / f"step-{step:08d}")
        assert row["logical"] == row["nbytes"] == sum(row["by_kind"].values())
        assert (row["logical"], row["physical"], row["shared"]) == (
            expected.logical[step], expected.physical[step], expected.shared[step])
        assert row["savings"] == row["logical"] - row["physical"]
    assert usage["checkpoints"][0]["savings"] == 0  # the oldest holder pays for the base
    assert all(row["savings"] > 0 for row in usage["checkpoints"][1:])
    assert usage["path"] == str(run)
    assert usage["logical"] == usage["nbytes"] == sum(expected.logical.values())
    assert usage["physical"] == expected.run_physical == sum(expected.physical.values())
    assert usage["shared"] == expected.run_shared
    assert usage["savings"] == usage["logical"] - usage["physical"] > 0
    # each object's index file (model.index.json, ...) counts with its object: none is "other"
    assert set(usage["by_kind"]) == {"module", "optimizer", "rng", "manifest"}, usage["by_kind"]

    rows = table_rows(table)
    assert list(rows) == [*map(str, STEPS), "total"]
    savings = usage["savings"]
    assert rows["total"][1:5] == [
        decimal(usage["logical"]), decimal(usage["physical"]), decimal(usage["shared"]),
        f"{decimal(savings)} ({savings / usage['logical']:.0%})"]
    assert rows["10"][4] == "0 bytes"
    assert table.stdout.splitlines()[-1].startswith("physical: on disk, a file shared by")


def test_du_of_a_run_saved_without_dedup_shows_nothing_shared(template: Path) -> None:
    run = template / "plain"
    as_json, table = ckpts_session(["du", run, "--json"], ["du", run])
    usage = parse_json(as_json)
    expected = disk_usage(run)
    for row in [usage, *usage["checkpoints"]]:
        assert (row["shared"], row["savings"]) == (0, 0)
        assert row["physical"] == row["logical"] == row["nbytes"]
    assert usage["physical"] == expected.run_physical
    assert table_rows(table)["total"][3:5] == ["0 bytes", "0 bytes"]


def test_prune_keep_within_fits_the_run_and_reports_the_bytes_freed_on_disk(
    template: Path, tmp_path: Path
) -> None:
    run = copy_run(template / "shared", tmp_path / "run")
    rehearsal = copy_run(run, tmp_path / "rehearsal")
    before = disk_usage(run)
    budget = before.logical[30] + before.physical[40]  # what the newest two hold, no more
    dry, real, verified = ckpts_session(
        ["prune", rehearsal, "--keep-within", str(budget), "--dry-run"],
        ["prune", run, "--keep-within", str(budget)], ["verify", run])

    after = disk_usage(run)
    assert sorted(after.logical) == [30, 40]  # the oldest went first
    assert after.run_physical <= budget
    freed = before.run_physical - after.run_physical
    logical_removed = before.logical[10] + before.logical[20]
    assert freed < logical_removed  # the shared base stays with step 30 and 40
    assert real.returncode == 0, real.stderr
    assert real.stdout.splitlines()[-1] == (
        f"removed 2 of 4 checkpoint(s) (freed {decimal(freed)} on disk; 2 kept)")
    assert real.stdout.splitlines()[0] == (
        f"removed step-00000010 ({decimal(before.logical[10])}; "
        f"{decimal(before.shared[10])} of it shared with kept checkpoints)")
    assert verified.returncode == 0, verified.stdout  # the kept ones still hold the base

    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == (
        f"would remove 2 of 4 checkpoint(s) (would free {decimal(freed)} on disk; 2 kept)")
    assert disk_usage(rehearsal) == before


def test_prune_keep_within_warns_when_protected_checkpoints_exceed_it(
    template: Path, tmp_path: Path
) -> None:
    run = copy_run(template / "shared", tmp_path / "run")
    newest = disk_usage(run).logical[40]
    (result,) = ckpts_session(["prune", run, "--keep-within", "1kB"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("removed 3 of 4 checkpoint(s)")
    assert result.stderr == (
        f"warning: {run} still holds {decimal(newest)}, over --keep-within 1kB: what is left "
        "is protected (the newest checkpoint, pinned ones, --keep-best picks); unpin some or "
        "keep fewer best\n")


def test_du_and_prune_refuse_a_missing_run_and_a_bad_size_before_importing_torch(
    template: Path, tmp_path: Path
) -> None:
    run, missing = template / "shared", tmp_path / "nowhere"
    before = disk_usage(run)
    results = ckpts_session(
        ["du", missing], ["prune", missing, "--keep-within", "1GB"],
        ["prune", run, "--keep-within", "12XB"], ["prune", run, "--keep-within", "0"],
        ["prune", run, "--keep-within", "lots", "--dry-run"])
    for result in results[:2]:
        assert_bad_input(result, str(missing), "does not exist")
    for result, size in zip(results[2:], ["12XB", "0", "lots"], strict=True):
        assert_bad_input(result, f"--keep-within {size}:", "not a positive byte count", "500MB")
    assert not any(r.imported_torch for r in results)
    assert disk_usage(run) == before


def test_du_on_s3_counts_every_object_in_full(s3_bucket: S3Bucket) -> None:
    options = s3_bucket.storage_options
    run = s3_bucket.url("frozen")
    save_run(run, dedup=True, storage_options=options)
    nowhere = os.environ["AWS_CONFIG_FILE"]  # set by s3_bucket: no ~/.aws files
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": s3_bucket.server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere}
    as_json, table = remote_session(env, ["du", run, "--json"], ["du", run])

    usage = parse_json(as_json)
    assert [c["step"] for c in usage["checkpoints"]] == STEPS
    for row in [usage, *usage["checkpoints"]]:
        assert row["physical"] == row["logical"] == row["nbytes"] > 0
        assert (row["shared"], row["savings"]) == (0, 0)
    assert table_rows(table)["total"][3:5] == ["0 bytes", "0 bytes"]
    assert table.stdout.splitlines()[-1].startswith(
        "physical = logical: on s3:// a reused file is a server-side copy")

"""The ``ckpts`` commands on a checkpoint saved by two ranks (format v3).

Every test copies the committed ``tests/data/v3-small/`` fixture (written by
``tests/data/make_small.py v3``: a 2-rank FSDP2 model, its AdamW, each rank's RNGs)
and runs the commands through :func:`test_cli.ckpts_session`, several per
subprocess. Expected numbers come from the fixture's files and manifest, not from
the CLI's own code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.filesize import decimal

from test_cli import ckpts_session, parse_json

FIXTURE = Path(__file__).with_name("data") / "v3-small"
STEP = "step-00000003"
RANK_FILES = {
    0: ["model-rank00000.safetensors", "optimizer-rank00000.safetensors",
        "rng.rank0.safetensors"],
    1: ["model-rank00001.safetensors", "optimizer-rank00001.safetensors",
        "rng.rank1.safetensors"],
}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A copy of the v3 fixture's run (commands may take its lock or damage it)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def manifest_of(run: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((run / STEP / "manifest.json").read_bytes())
    return loaded


def size_of(run: Path, name: str) -> int:
    return (run / STEP / name).stat().st_size


def test_show_json_lists_each_ranks_files_and_the_per_rank_objects(run: Path) -> None:
    (shown, with_tensors) = ckpts_session(["show", run / STEP, "--json"],
                                          ["show", run / STEP, "--json", "--tensors"])
    info = parse_json(shown)
    assert info["world_size"] == 2
    assert info["per_rank"] == {"rng": ["rng.rank0", "rng.rank1"]}
    assert info["ranks"] == [
        {"rank": rank, "files": files, "nbytes": sum(size_of(run, f) for f in files)}
        for rank, files in RANK_FILES.items()]
    assert sorted(info["objects"]) == ["model", "optimizer", "rng.rank0", "rng.rank1"]
    assert info["files"] == {f: size_of(run, f) for files in RANK_FILES.values() for f in files}
    assert info["nbytes"] == sum(p.stat().st_size for p in (run / STEP).iterdir())
    tensors = parse_json(with_tensors)["objects"]["model"]["tensors"]
    assert tensors["first.weight"] == {"dtype": "F32", "shape": [3, 4], "shards": 2,
                                       "files": RANK_FILES[0][:1] + RANK_FILES[1][:1]}
    assert tensors["counts"] == {"dtype": "I64", "shape": [4], "file": RANK_FILES[0][0]}
    # a sharded tensor's bytes are its global shape's: 12 + 3 + 6 + 2 floats and 4 int64
    assert parse_json(with_tensors)["objects"]["model"]["nbytes"] == 23 * 4 + 4 * 8


def test_show_prints_the_world_size_a_table_of_files_by_rank_and_shard_counts(
        run: Path) -> None:
    (shown,) = ckpts_session(["show", run / STEP, "--tensors"])
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "world size        2" in lines
    assert "per-rank objects  rng (rng.rank0, rng.rank1)" in lines
    assert "files by rank" in lines
    for rank, files in RANK_FILES.items():
        row = next(line.split() for line in lines if line.split()[:1] == [str(rank)]
                   and files[0] in line)
        nbytes = sum(size_of(run, f) for f in files)
        assert row[:2] == [str(rank), "3"] and " ".join(row[2:4]) == decimal(nbytes), row
        assert ", ".join(files) in " ".join(row[4:])
    sharded = next(line.split() for line in lines if line.startswith("first.weight"))
    assert sharded == ["first.weight", "F32", "[3,", "4]", "2", "shards"]
    whole = next(line.split() for line in lines if line.startswith("counts"))
    assert whole == ["counts", "I64", "[4]", RANK_FILES[0][0]]


def test_show_of_a_single_process_checkpoint_has_no_rank_table() -> None:
    checkpoint = Path(__file__).with_name("data") / "v2-small" / STEP
    (shown, as_json) = ckpts_session(["show", checkpoint], ["show", checkpoint, "--json"])
    assert shown.returncode == 0, shown.stderr
    assert "files by rank" not in shown.stdout and "per-rank" not in shown.stdout
    info = parse_json(as_json)
    assert (info["world_size"], info["ranks"], info["per_rank"]) == (1, [], {})


def test_ls_and_du_count_every_ranks_files(run: Path) -> None:
    listed, used = ckpts_session(["ls", run, "--json"], ["du", run, "--json"])
    (checkpoint,) = parse_json(listed)
    total = sum(p.stat().st_size for p in (run / STEP).iterdir())
    assert (checkpoint["step"], checkpoint["nbytes"]) == (3, total)
    usage = parse_json(used)
    by_kind = {"manifest": size_of(run, "manifest.json"),
               "module": sum(size_of(run, files[0]) for files in RANK_FILES.values()),
               "optimizer": sum(size_of(run, files[1]) for files in RANK_FILES.values()),
               "rng": sum(size_of(run, files[2]) for files in RANK_FILES.values())}
    assert usage["by_kind"] == dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
    assert usage["nbytes"] == usage["logical"] == total


def test_verify_passes_on_the_intact_sharded_checkpoint(run: Path) -> None:
    (checked,) = ckpts_session(["verify", run])
    assert checked.returncode == 0, (checked.stdout, checked.stderr)
    lines = checked.stdout.splitlines()
    assert lines[0] == f"{STEP}  OK" and lines[-1].startswith("1 checkpoint(s) verified, 0 ")
    verdicts = {line.split()[0]: line.split()[-1] for line in lines[1:-1]}
    assert verdicts == {f: "OK" for files in RANK_FILES.values() for f in files}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_names_the_rank_file_whose_shard_has_a_flipped_byte(run: Path) -> None:
    shard = manifest_of(run)["objects"]["model"]["tensors"]["first.weight"]["shards"][1]
    assert shard["file"] == RANK_FILES[1][0]
    flip_byte(run / STEP / shard["file"], shard["offsets"][0] + 5)
    (checked,) = ckpts_session(["verify", run])
    assert checked.returncode == 1, (checked.stdout, checked.stderr)
    assert f"{STEP}  FAILED" in checked.stdout
    verdicts = {line.split()[0]: line.split()[-1] for line in checked.stdout.splitlines()
                if line.startswith("  ") and line.split()[0] in RANK_FILES[0] + RANK_FILES[1]}
    assert verdicts == {f: "FAILED" if f == shard["file"] else "OK"
                        for files in RANK_FILES.values() for f in files}
    (problem,) = [line for line in checked.stdout.splitlines() if "content hash" in line]
    assert f"{STEP}/{shard['file']}: content hash of tensor 'first.weight'" in problem

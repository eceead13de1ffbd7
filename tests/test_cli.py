"""The ``ckpts`` commands, run in subprocesses on runs written by the library.

Most checks go through :func:`ckpts_session`: one subprocess runs several
commands in turn through the console script's own entry point
(``ckpts.cli.main``), recording each one's exit code, stdout, stderr and whether
torch got imported. Importing torch costs seconds, so a session pays for it once
instead of once per command. :func:`ckpts_script` runs the installed ``ckpts``
script itself, for the checks that need a real process per command.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.filesize import decimal
from safetensors.torch import load_file

import ckpts

CKPTS = str(Path(sys.executable).parent / "ckpts")
STEPS = [10, 20, 30, 40, 50]
VAL_LOSS = [0.5, 0.3, 0.4, math.nan, 0.35]  # best (min) at 20; NaN at 40
ACCURACY = [0.1, 0.2, 0.3, 0.4, 0.5]  # best by max at 50, by min at 10
FOREIGN = ["notes.txt", "step-abc", "step-00000009"]  # not checkpoints: never listed nor deleted

SESSION = """
import contextlib, io, json, sys, traceback
from ckpts.cli import main

results = []
for args in json.loads(sys.stdin.read()):
    sys.argv = ["ckpts", *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue(), "torch" in sys.modules])
sys.stdout.write(json.dumps(results))
"""


@dataclass
class Result:
    """What one command did."""

    returncode: int
    stdout: str
    stderr: str
    imported_torch: bool | None = None  # known for session commands


class Net(torch.nn.Module):
    """A linear layer and a constant buffer (equal in every checkpoint of a run)."""

    scale: torch.Tensor

    def __init__(self, width: int = 2, scale_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, width)
        self.register_buffer("scale", torch.ones(width, dtype=scale_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out * self.scale


def ckpts_session(*commands: Sequence[str | Path]) -> list[Result]:
    """Run ``commands`` one after another in one fresh subprocess; one result each."""
    payload = json.dumps([[str(arg) for arg in command] for command in commands])
    process = subprocess.run([sys.executable, "-c", SESSION], input=payload,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    return [Result(*result) for result in json.loads(process.stdout)]


def ckpts_script(*args: str | Path) -> Result:
    """Run the installed ``ckpts`` script."""
    process = subprocess.run([CKPTS, *map(str, args)], capture_output=True, text=True,
                             timeout=120)
    return Result(process.returncode, process.stdout, process.stderr)


def parse_json(result: Result) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def entries(run: Path) -> list[str]:
    """The names in a run directory, but for hidden bookkeeping files (the writer lock)."""
    return sorted(p.name for p in run.iterdir() if not p.name.startswith("."))


def assert_bad_input(result: Result, *fragments: str) -> None:
    """Exit code 2, no traceback, and (for our own checks) one ``error:`` line naming the cause."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    if fragments:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        for fragment in fragments:
            assert fragment in result.stderr


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``run/``: five trained checkpoints plus foreign files; ``other/``: a different model."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ckpts.CheckpointManager(root / "run") as manager:
        for i, step in enumerate(STEPS):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            optimizer.step()
            manager.save(step, ckpts.TrainState(model=model, optimizer=optimizer),
                         metrics={"val_loss": VAL_LOSS[i], "acc": ACCURACY[i]}, epoch=i // 2)
    (root / "run" / "notes.txt").write_text("lr sweep 3\n")
    (root / "run" / "step-abc").mkdir()
    (root / "run" / "step-00000009").mkdir()  # a save that never committed: no manifest
    (root / "run" / "step-00000009" / "model.safetensors").write_bytes(b"partial")
    other = ckpts.TrainState(model=Net(width=4, scale_dtype=torch.float64),
                             head=torch.nn.Linear(3, 1))
    with ckpts.CheckpointManager(root / "other") as manager:
        manager.save(10, other)
    return root


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the five-checkpoint run, which a test may prune or pin."""
    return Path(shutil.copytree(template / "run", tmp_path / "run"))


def test_console_script_prints_json_and_exits_2_on_bad_input(run: Path) -> None:
    rows = parse_json(ckpts_script("ls", run, "--json"))
    assert [r["step"] for r in rows] == STEPS
    assert_bad_input(ckpts_script("ls", run / "nowhere"), "does not exist")


def test_ls_json_lists_committed_checkpoints_with_markers(run: Path) -> None:
    default, by_accuracy = ckpts_session(["ls", run, "--json"],
                                         ["ls", run, "--metric", "acc", "--mode", "min", "--json"])
    rows = parse_json(default)
    assert [r["step"] for r in rows] == STEPS  # foreign files and the uncommitted step 9 ignored
    by_step = {r["step"]: r for r in rows}
    assert by_step[50]["markers"] == ["latest", "best(acc)"]  # acc: higher is better
    assert by_step[20]["markers"] == ["best(val_loss)"]
    assert by_step[10]["markers"] == []
    assert by_step[40]["metrics"] == {"val_loss": None, "acc": 0.4}  # NaN as null
    assert by_step[30]["path"] == str(run / "step-00000030")
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2]
    assert all(r["nbytes"] > 0 and r["tags"] == [] and r["created"].endswith("+00:00")
               for r in rows)

    rows = parse_json(by_accuracy)  # --mode says otherwise
    assert [r["markers"] for r in rows] == [["best(acc)"], [], [], [], ["latest"]]


def test_ls_table_shows_metrics_and_markers(run: Path) -> None:
    (result,) = ckpts_session(["ls", run])
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["step", "created", "size", "epoch", "val_loss", "acc", "markers"]
    assert [line.split()[0] for line in lines] == [str(s) for s in STEPS]
    assert lines[1].endswith("best(val_loss)") and lines[4].endswith("latest, best(acc)")
    assert " nan " in lines[3]


def test_ls_lists_each_run_of_a_directory_of_runs(template: Path, tmp_path: Path) -> None:
    as_json, table, empty = ckpts_session(["ls", template, "--json"], ["ls", template],
                                          ["ls", tmp_path, "--json"])
    runs = parse_json(as_json)
    assert sorted(runs) == ["other", "run"]
    assert [r["step"] for r in runs["run"]] == STEPS and [r["step"] for r in runs["other"]] == [10]
    assert table.returncode == 0 and table.stdout.startswith("other\n")
    assert "\nrun\n" in table.stdout
    assert parse_json(empty) == []  # an empty directory: nothing to list, not an error


def test_reading_commands_never_import_torch(template: Path) -> None:
    run = template / "run"
    results = ckpts_session(["ls", run], ["ls", run, "--json"], ["ls", template],
                            ["best", run, "--metric", "val_loss"], ["du", run],
                            ["show", run / "step-00000010", "--tensors"])
    assert [(r.returncode, r.imported_torch) for r in results] == [(0, False)] * len(results)


def test_best_prints_only_the_path(run: Path) -> None:
    lowest, highest = ckpts_session(["best", run, "--metric", "val_loss"],
                                    ["best", run, "--metric", "val_loss", "--mode", "max"])
    assert (lowest.returncode, lowest.stdout) == (0, f"{run / 'step-00000020'}\n")
    assert highest.stdout == f"{run / 'step-00000010'}\n"  # NaN ranks last, never best


def test_unknown_metric_or_mode_is_refused_naming_the_metrics_present(run: Path) -> None:
    results = ckpts_session(
        ["best", run, "--metric", "bleu"], ["ls", run, "--metric", "bleu"],
        ["prune", run, "--keep-best", "1", "--metric", "bleu"],
        ["best", run, "--metric", "val_loss", "--mode", "mid"], ["ls", run, "--mode", "mid"],
        ["prune", run, "--keep-best", "1", "--metric", "val_loss", "--mode", "mid"])
    for result in results[:3]:
        assert_bad_input(result, "'bleu'", "val_loss, acc")
    for result in results[3:]:
        assert_bad_input(result)
        assert "mid" in result.stderr
    assert entries(run) == sorted([*FOREIGN, *(f"step-{s:08d}" for s in STEPS)])


def test_a_missing_path_is_refused_by_every_command_before_importing_torch(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere"
    results = ckpts_session(["ls", missing], ["best", missing, "--metric", "loss"],
                            ["show", missing], ["du", missing], ["diff", missing, missing],
                            ["verify", missing], ["prune", missing, "--keep-last", "1"],
                            ["pin", missing, "1"], ["unpin", missing, "1"])
    for result in results:
        assert_bad_input(result, str(missing), "does not exist")
    assert not any(r.imported_torch for r in results)


def test_show_describes_objects_tensors_and_files(run: Path) -> None:
    checkpoint = run / "step-00000020"
    as_json, table, of_run, uncommitted = ckpts_session(
        ["show", checkpoint, "--tensors", "--json"], ["show", checkpoint], ["show", run],
        ["show", run / "step-00000009"])
    info = parse_json(as_json)
    assert (info["step"], info["epoch"], info["metrics"]) == (20, 0, {"val_loss": 0.3, "acc": 0.2})
    assert info["versions"]["torch"] == torch.__version__ and info["world_size"] == 1
    model = info["objects"]["model"]
    assert (model["kind"], model["class"], model["num_tensors"]) == ("module", "Net", 3)
    assert model["nbytes"] == (2 * 3 + 2 + 2) * 4 and model["dtypes"] == ["F32"]
    assert model["tensors"]["fc.weight"] == {"dtype": "F32", "shape": [2, 3],
                                             "file": "model.safetensors"}
    assert info["files"]["model.safetensors"] == (checkpoint / "model.safetensors").stat().st_size
    assert sorted(info["objects"]) == ["model", "optimizer", "rng"]

    assert table.returncode == 0 and "fc.weight" not in table.stdout  # keys only with --tensors
    assert "model.safetensors" in table.stdout and "val_loss=0.3" in table.stdout
    assert_bad_input(of_run, "is not a checkpoint")
    assert_bad_input(uncommitted, "is not a checkpoint")


def test_du_sums_manifest_file_sizes_by_object_kind(run: Path) -> None:
    as_json, table = ckpts_session(["du", run, "--json"], ["du", run])
    usage = parse_json(as_json)
    assert [c["step"] for c in usage["checkpoints"]] == STEPS
    for entry in usage["checkpoints"]:
        manifest_path = Path(entry["path"]) / "manifest.json"
        files = json.loads(manifest_path.read_text())["files"]  # data files and indexes (v4)
        expected = sum(f["nbytes"] for f in files.values()) + manifest_path.stat().st_size
        assert entry["nbytes"] == sum(entry["by_kind"].values()) == expected
        # an object's index file (its tree and tensor table) counts with the object's kind
        for kind, name in (("module", "model"), ("optimizer", "optimizer"), ("rng", "rng")):
            assert entry["by_kind"][kind] == files[f"{name}.safetensors"]["nbytes"] \
                + files[f"{name}.index.json"]["nbytes"], (kind, entry["by_kind"])
        assert entry["by_kind"]["manifest"] == manifest_path.stat().st_size
    assert usage["nbytes"] == sum(c["nbytes"] for c in usage["checkpoints"])
    assert set(usage["by_kind"]) == {"module", "optimizer", "rng", "manifest"}, usage["by_kind"]
    assert table.returncode == 0 and table.stdout.splitlines()[-2].split()[0] == "total"


def test_verify_reports_each_checkpoint_and_fails_on_a_corrupt_one(run: Path) -> None:
    damaged = run / "step-00000030" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    whole_run, single, uncommitted = ckpts_session(
        ["verify", run], ["verify", run / "step-00000010"], ["verify", run / "step-00000009"])

    assert whole_run.returncode == 1, whole_run.stderr
    lines = whole_run.stdout.splitlines()
    assert [line for line in lines if line.startswith("step-")] == [
        "step-00000010  OK", "step-00000020  OK", "step-00000030  FAILED",
        "step-00000040  OK", "step-00000050  OK"]
    assert str(damaged) in whole_run.stdout and "content hash" in whole_run.stdout
    assert lines[-1] == "5 checkpoint(s) verified, 1 with problems"
    assert single.returncode == 0 and single.stdout.startswith("step-00000010  OK")
    assert_bad_input(uncommitted, "is not a checkpoint")
    # manifests, indexes, headers and hashes: verify never needs torch
    assert not any(r.imported_torch for r in (whole_run, single, uncommitted))


def test_prune_refuses_unclear_policies_and_deletes_nothing(run: Path) -> None:
    before = entries(run)
    no_policy, best_alone, stray_metric, zero, of_checkpoint = ckpts_session(
        ["prune", run], ["prune", run, "--keep-best", "2"],
        ["prune", run, "--keep-last", "2", "--metric", "val_loss"],
        ["prune", run, "--keep-last", "0"], ["prune", run / "step-00000010", "--keep-last", "1"])
    assert_bad_input(no_policy, "--keep-last", "--keep-best", "--keep-every")
    assert_bad_input(best_alone, "--keep-best needs --metric")
    assert_bad_input(stray_metric, "only apply with --keep-best")
    assert_bad_input(zero)
    assert_bad_input(of_checkpoint, "is a checkpoint, not a run")
    assert entries(run) == before


def test_prune_keeps_what_any_policy_keeps_and_never_foreign_files(
    run: Path, tmp_path: Path
) -> None:
    with ckpts.CheckpointManager(run) as manager:  # closing releases the run's writer lock
        manager.pin(30)
    rehearsal = Path(shutil.copytree(run, tmp_path / "rehearsal"))  # for the dry run
    sizes = {c.step: decimal(c.nbytes) for c in ckpts.CheckpointManager(run).checkpoints()}
    dry, real = ckpts_session(
        ["prune", rehearsal, "--keep-last", "1", "--dry-run"],
        ["prune", run, "--keep-best", "1", "--metric", "val_loss", "--keep-every", "40"])

    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[:3] == [
        f"would remove step-{s:08d} ({sizes[s]})" for s in (10, 20, 40)]  # 30 pinned, 50 latest
    assert dry.stdout.splitlines()[3].startswith("would remove 3 of 5 checkpoint(s)")
    assert entries(rehearsal) == sorted([*FOREIGN, *(f"step-{s:08d}" for s in STEPS)])

    assert real.returncode == 0, real.stderr
    assert real.stdout.splitlines()[0] == f"removed step-00000010 ({sizes[10]})"
    # kept: 20 (best val_loss), 30 (pinned), 40 (multiple of 40), 50 (latest)
    assert entries(run) == sorted(
        [*FOREIGN, "step-00000020", "step-00000030", "step-00000040", "step-00000050"])
    assert (run / "step-00000009" / "model.safetensors").read_bytes() == b"partial"


def test_pin_and_unpin_tags_a_checkpoint(run: Path) -> None:
    pin, listed, wrong_tag, wrong_step, unpin, unpinned = ckpts_session(
        ["pin", run, "10", "--tag", "paper"], ["ls", run, "--json"],
        ["unpin", run, "10", "--tag", "release"], ["pin", run, "15"],
        ["unpin", run, "10"], ["ls", run, "--json"])
    assert (pin.returncode, pin.stdout) == (0, "pinned step-00000010 (tags: paper)\n")
    assert parse_json(listed)[0]["markers"] == ["pinned:paper"]
    assert_bad_input(wrong_tag, "no tag 'release'", "paper")
    assert_bad_input(wrong_step, "step 15", "10, 20, 30, 40, 50")
    assert (unpin.returncode, unpin.stdout) == (0, "unpinned step-00000010 (tags left: none)\n")
    rows = parse_json(unpinned)
    assert rows[0]["tags"] == [] and len(rows) == 5  # unpinning alone removes nothing


def test_diff_classifies_every_tensor_of_both_checkpoints(run: Path, template: Path) -> None:
    a, b = run / "step-00000010", run / "step-00000050"
    same_model, other_model = ckpts_session(
        ["diff", a, b, "--json"], ["diff", a, template / "other" / "step-00000010"])

    report = parse_json(same_model)
    rows = {row["key"]: row for row in report["tensors"]}
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    expected = (weights_a["fc.weight"].double() - weights_b["fc.weight"].double()).abs().max()
    assert rows["model/fc.weight"]["status"] == "changed"
    assert rows["model/fc.weight"]["max_abs_diff"] == pytest.approx(float(expected))
    assert rows["model/scale"] == {"key": "model/scale", "status": "equal", "max_abs_diff": None,
                                   "a": {"dtype": "F32", "shape": [2]},
                                   "b": {"dtype": "F32", "shape": [2]}}
    assert rows["optimizer/state.0.momentum_buffer"]["status"] == "changed"
    counts = {s: sum(r["status"] == s for r in report["tensors"]) for s in report["summary"]}
    assert report["summary"] == counts

    assert other_model.returncode == 0, other_model.stderr
    *lines, summary = other_model.stdout.splitlines()
    described = {line.split()[0]: " ".join(line.split()[1:]) for line in lines[1:]}
    assert described["model/fc.weight"] == "shape changed F32[2, 3] F32[4, 3]"
    assert described["model/scale"] == "dtype changed F32[2] F64[4]"
    assert described["optimizer/state.0.momentum_buffer"] == "only in A F32[2, 3] -"
    assert described["head/weight"] == "only in B - F32[1, 3]"
    assert summary.endswith("1 dtype changed, 2 shape changed, 2 only in A, 2 only in B")

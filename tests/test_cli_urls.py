"""Every ``ckpts`` command that reads or writes a run works on a URL, here S3 (moto on loopback).

The commands run in subprocesses, as users run them: the endpoint and the credentials
reach s3fs through the usual AWS variables, set in the subprocess's environment only.
One module-scoped bucket holds the runs the reading commands share; a test that
changes a run (verify after corruption, pin, prune, evaluate) works on its own copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ckpts
from ckpts._format.catalog import list_checkpoints
from ckpts.cli import app
from s3_server import S3Server
from test_cli import SESSION, Result, assert_bad_input, parse_json

STEPS = [10, 20, 30]
VAL_LOSS = [0.5, 0.2, 0.4]  # best (min) at 20


@dataclass(frozen=True)
class RemoteRuns:
    """A bucket with ``runs/exp1`` (three checkpoints) and ``runs/exp2`` (one), the AWS
    variables that reach it, and the weights each checkpoint of exp1 holds."""

    bucket: str
    storage_options: dict[str, Any]
    env: dict[str, str]
    weights: dict[int, dict[str, torch.Tensor]]

    def url(self, run: str = "runs/exp1", step: int | None = None) -> str:
        return f"s3://{self.bucket}/{run}" + ("" if step is None else f"/step-{step:08d}")

    def fs(self) -> Any:
        return fsspec.filesystem("s3", **self.storage_options, skip_instance_cache=True)

    def copy(self) -> str:
        """A fresh copy of exp1 (its checkpoints and metrics history); its URL."""
        fs, source = self.fs(), f"{self.bucket}/runs/exp1"
        target = f"copies/{uuid.uuid4().hex[:8]}"
        for key in fs.find(source):
            if not key.endswith(".ckpts.lock"):
                fs.copy(key, f"{self.bucket}/{target}{key[len(source):]}")
        return self.url(target)

    def keys(self, url: str) -> list[str]:
        """The object names under a run, relative to it (the writer's lease left out)."""
        prefix = url.removeprefix("s3://")
        fs = self.fs()
        fs.invalidate_cache()
        return sorted(k[len(prefix) + 1:] for k in fs.find(prefix) if not k.endswith(".lock"))


@pytest.fixture(scope="module")
def remote(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> RemoteRuns:
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}
    bucket = f"cli-{uuid.uuid4().hex[:16]}"
    fsspec.filesystem("s3", **options, skip_instance_cache=True).call_s3(
        "create_bucket", Bucket=bucket)
    nowhere = str(tmp_path_factory.mktemp("aws") / "absent")  # no ~/.aws files
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere}
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights: dict[int, dict[str, torch.Tensor]] = {}
    runs = RemoteRuns(bucket, options, env, weights)
    with ckpts.CheckpointManager(runs.url(), storage_options=options) as manager:
        for step, val_loss in zip(STEPS, VAL_LOSS, strict=True):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            optimizer.step()
            manager.save(step, ckpts.TrainState(model=model, optimizer=optimizer),
                         metrics={"val_loss": val_loss})
            weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    with ckpts.CheckpointManager(runs.url("runs/exp2"), storage_options=options) as manager:
        manager.save(5, ckpts.TrainState(model=model), metrics={"val_loss": 0.9})
    return runs


def remote_session(env: dict[str, str], *commands: Sequence[str | Path],
                   cwd: Path | None = None) -> list[Result]:
    """Run ``commands`` one after another in one subprocess with ``env``; one result each."""
    payload = json.dumps([[str(arg) for arg in command] for command in commands])
    process = subprocess.run([sys.executable, "-c", SESSION], input=payload, env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    return [Result(*result) for result in json.loads(process.stdout)]


def test_reading_commands_work_on_an_s3_run_without_importing_torch(remote: RemoteRuns) -> None:
    run, checkpoint = remote.url(), remote.url(step=20)
    listed, table, runs, best, shown, usage = remote_session(
        remote.env, ["ls", run, "--json"], ["ls", run], ["ls", remote.url("runs"), "--json"],
        ["best", run, "--metric", "val_loss"], ["show", checkpoint, "--json"],
        ["du", run, "--json"])

    rows = parse_json(listed)
    assert [r["step"] for r in rows] == STEPS
    assert [r["path"] for r in rows] == [remote.url(step=s) for s in STEPS]
    assert [r["markers"] for r in rows] == [[], ["best(val_loss)"], ["latest"]]
    assert table.returncode == 0 and table.stdout.splitlines()[2].endswith("best(val_loss)")
    by_run = parse_json(runs)
    assert sorted(by_run) == ["exp1", "exp2"] and [r["step"] for r in by_run["exp2"]] == [5]
    assert (best.returncode, best.stdout) == (0, f"{checkpoint}\n")
    info = parse_json(shown)
    assert (info["path"], info["step"], info["metrics"]) == (checkpoint, 20, {"val_loss": 0.2})
    assert info["objects"]["model"]["num_tensors"] == 2
    sizes = remote.fs().du(checkpoint.removeprefix("s3://"), total=False)
    assert info["files"]["model.safetensors"] == sizes[
        f"{checkpoint.removeprefix('s3://')}/model.safetensors"]
    disk = parse_json(usage)
    assert [c["path"] for c in disk["checkpoints"]] == [remote.url(step=s) for s in STEPS]
    assert disk["nbytes"] == sum(r["nbytes"] for r in rows)  # manifests' sizes = the listing's
    assert not any(r.imported_torch for r in (listed, table, runs, best, shown, usage))


def test_verify_checks_remote_objects_and_fails_on_a_corrupted_one(remote: RemoteRuns) -> None:
    copy = remote.copy()
    damaged = f"{copy.removeprefix('s3://')}/step-00000020/model.safetensors"
    fs = remote.fs()
    data = bytearray(fs.cat_file(damaged))
    data[-1] ^= 0xFF  # same size: only the content hash can tell
    fs.pipe_file(damaged, bytes(data))

    intact, failed, single_ok, single_failed = remote_session(
        remote.env, ["verify", remote.url()], ["verify", copy],
        ["verify", f"{copy}/step-00000010"], ["verify", f"{copy}/step-00000020"])

    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.splitlines()[-1] == "3 checkpoint(s) verified, 0 with problems"
    assert failed.returncode == 1, failed.stderr
    assert [line for line in failed.stdout.splitlines() if line.startswith("step-")] == [
        "step-00000010  OK", "step-00000020  FAILED", "step-00000030  OK"]
    assert f"s3://{damaged}" in failed.stdout and "content hash" in failed.stdout
    file_lines = [line.split() for line in failed.stdout.splitlines()
                  if line.startswith("  model.safetensors")]
    assert [line[-1] for line in file_lines] == ["OK", "FAILED", "OK"]  # the damaged file named
    assert single_ok.returncode == 0 and single_ok.stdout.startswith("step-00000010  OK")
    assert single_failed.returncode == 1
    assert single_failed.stdout.startswith("step-00000020  FAILED")


def test_diff_compares_two_remote_checkpoints(remote: RemoteRuns) -> None:
    (result,) = remote_session(remote.env, ["diff", remote.url(step=10), remote.url(step=30),
                                            "--json"])
    report = parse_json(result)
    assert (report["a"], report["b"]) == (remote.url(step=10), remote.url(step=30))
    rows = {row["key"]: row for row in report["tensors"]}
    expected = (remote.weights[10]["weight"].double()
                - remote.weights[30]["weight"].double()).abs().max()
    assert rows["model/weight"]["status"] == "changed"
    assert rows["model/weight"]["max_abs_diff"] == pytest.approx(float(expected))
    assert rows["optimizer/state.0.momentum_buffer"]["status"] == "changed"


def test_pin_prune_and_unpin_change_a_remote_run(remote: RemoteRuns) -> None:
    run = remote.copy()
    pin, pinned, prune, unpin, after = remote_session(
        remote.env, ["pin", run, "10", "--tag", "paper"], ["ls", run, "--json"],
        ["prune", run, "--keep-last", "1"], ["unpin", run, "10"], ["ls", run, "--json"])

    assert (pin.returncode, pin.stdout) == (0, "pinned step-00000010 (tags: paper)\n")
    assert parse_json(pinned)[0]["markers"] == ["pinned:paper"]
    assert prune.returncode == 0, prune.stderr
    assert prune.stdout.splitlines()[0].startswith("removed step-00000020 (")
    assert prune.stdout.splitlines()[1].startswith("removed 1 of 3 checkpoint(s)")
    assert (unpin.returncode, unpin.stdout) == (0, "unpinned step-00000010 (tags left: none)\n")
    assert [(r["step"], r["tags"]) for r in parse_json(after)] == [(10, []), (30, [])]
    assert not any(key.startswith("step-00000020") for key in remote.keys(run))


def test_export_writes_a_remote_checkpoints_weights_to_a_local_file(
    remote: RemoteRuns, tmp_path: Path
) -> None:
    out = tmp_path / "weights.safetensors"
    (result,) = remote_session(remote.env, ["export", remote.url(step=30), out,
                                            "--format", "safetensors"])
    assert (result.returncode, result.stdout) == (0, f"{out}\n"), result.stderr
    exported = load_file(out)
    assert exported.keys() == remote.weights[30].keys()
    assert all(torch.equal(exported[k], remote.weights[30][k]) for k in exported)


def test_evaluate_passes_each_checkpoints_url_to_the_script(
    remote: RemoteRuns, tmp_path: Path
) -> None:
    run = remote.copy()
    script = tmp_path / "score.py"
    script.write_text("import json, sys\n"
                      "url = sys.argv[1]\n"
                      "print(json.dumps({'remote': float(url.startswith('s3://')),\n"
                      "                  'step': float(url.rsplit('-', 1)[1])}))\n")
    done, listed = remote_session(
        remote.env, ["evaluate", run, script, "--metric", "remote", "--metric", "step"],
        ["ls", run, "--json"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"evaluated 3 checkpoint(s) of {run}\n"
    assert [r["metrics"] for r in parse_json(listed)] == [
        {"val_loss": v, "remote": 1.0, "step": float(s)} for s, v in zip(STEPS, VAL_LOSS,
                                                                          strict=True)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # matplotlib's own imports
def test_plot_and_report_draw_a_remote_run(remote: RemoteRuns, tmp_path: Path) -> None:
    image = tmp_path / "curve.png"
    plot, report = remote_session(
        remote.env, ["plot", remote.url(), remote.url("runs/exp2"), "--metric", "val_loss",
                     "-o", image],
        ["report", remote.url(), "-o", tmp_path / "report.html"])
    assert (plot.returncode, plot.stdout) == (0, f"{image}\n"), plot.stderr
    assert image.read_bytes().startswith(b"\x89PNG")
    assert (report.returncode, report.stdout) == (0, f"{tmp_path / 'report.html'}\n"), \
        report.stderr
    page = (tmp_path / "report.html").read_text()
    assert remote.url() in page and "<svg" in page and "no limit known" in page


def test_bad_urls_exit_2_naming_the_url_and_create_nothing(
    remote: RemoteRuns, tmp_path: Path
) -> None:
    unknown, missing = "nosuchproto://x/run", "s3://no-such-bucket-for-ckpts/run"
    commands: list[list[str | Path]] = []
    for run in (unknown, missing):
        step = f"{run}/step-00000010"
        commands += [["ls", run], ["best", run, "--metric", "val_loss"], ["du", run],
                     ["show", step], ["verify", run], ["verify", step], ["diff", step, step],
                     ["prune", run, "--keep-last", "1"], ["pin", run, "10"],
                     ["unpin", run, "10"], ["plot", run, "--metric", "val_loss"],
                     ["export", step, "out.safetensors", "--format", "safetensors"],
                     ["evaluate", run, __file__, "--metric", "x"]]
    results = remote_session(remote.env, *commands, cwd=tmp_path)

    for command, result in zip(commands, results, strict=True):
        run = unknown if unknown in str(command[1]) else missing
        assert_bad_input(result, run)
        if run == missing:
            assert "does not exist" in result.stderr and "create the bucket" in result.stderr
        else:
            assert "fsspec cannot open this URL" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no folder named 'nosuchproto:' or 's3:'
    assert not remote.fs().exists("no-such-bucket-for-ckpts")


def test_a_checkpoint_url_is_not_a_run_and_a_run_url_not_a_checkpoint(remote: RemoteRuns) -> None:
    run, checkpoint = remote.url(), remote.url(step=10)
    as_run, as_checkpoint, uncommitted = remote_session(
        remote.env, ["ls", checkpoint], ["show", run], ["show", remote.url(step=15)])
    assert_bad_input(as_run, f"{checkpoint} is a checkpoint, not a run", f"({run})")
    assert_bad_input(as_checkpoint, f"{run} is not a checkpoint")
    assert_bad_input(uncommitted, "step-00000015 is not a checkpoint")


def test_import_writes_into_a_run_given_as_a_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # in process, so memory:// (one store per process) is seen by the test too
    source = tmp_path / "model.pt"
    weights = torch.nn.Linear(3, 2).state_dict()
    torch.save(weights, source)
    run = f"memory://cli-{uuid.uuid4().hex}/run"
    monkeypatch.chdir(tmp_path)

    done = CliRunner().invoke(app, ["import", str(source), run, "--step", "3"])

    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"imported 1 checkpoint(s) from {source} into {run}\n")
    (checkpoint,) = list_checkpoints(run)
    assert checkpoint.path == f"{run}/step-00000003"
    loaded = ckpts.load_state(checkpoint, "model")
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no local 'memory:'

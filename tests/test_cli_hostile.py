"""The CLI against what a hostile or busy run holds: ``verify`` while a writer's retention
deletes checkpoints (no false alarms), and tags, metric names and values that would
crash the CLI or reach the terminal as escape sequences."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckpts
from ckpts._checkpoint.verify import verify_listed
from faulty_storage import FaultyStorage
from v4_worker import rehash_index

CKPTS = str(Path(sys.executable).parent / "ckpts")


def ckpts_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CKPTS, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def save_steps(run: Path, steps: list[int]) -> None:
    with ckpts.CheckpointManager(run, dedup=False) as manager:
        for step in steps:
            manager.save(step, ckpts.TrainState(model=torch.nn.Linear(64, 64)))


# ---- verify while retention deletes ------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch, ckpts
    from pathlib import Path
    run, stop = Path(sys.argv[1]), Path(sys.argv[2])
    model = torch.nn.Linear(256, 256)  # 256 kB: verify spends a while on each checkpoint
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(2)], dedup=False) as manager:
        step = 0
        while not stop.exists():
            step += 1
            with torch.no_grad():
                model.weight.add_(1.0)
            manager.save(step, ckpts.TrainState(model=model))
            if step == 3:
                print("saving", flush=True)
    print(step, flush=True)
""")


def test_verify_run_while_retention_deletes_reports_no_false_failures(tmp_path: Path) -> None:
    run, stop = tmp_path / "run", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "saving"
        runs = [ckpts_cli("verify", run) for _ in range(2)]
        stop.touch()
        saved = int(writer.stdout.readline())
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None
        writer.stdout.close()
    assert saved > 20  # retention deleted checkpoints all along the verify runs
    for result in runs:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "FAILED" not in result.stdout, result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        notes = [line for line in result.stdout.splitlines() if "deleted while" in line]
        assert all(line.endswith("deleted while verifying (retention or prune?)")
                   for line in notes), notes


def test_a_checkpoint_deleted_between_listing_and_checking_is_not_a_problem(
        tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    storage = FaultyStorage(tmp_path)
    first, second = sorted(storage.committed(), key=lambda entry: entry.step)
    # retention deletes step 1 after its manifest was read, before its files are
    storage.hooks["read_ranges"] = lambda: storage.delete(first.name)

    assert verify_listed(storage, first.name, first.sizes) is None
    assert storage.committed() == [second]
    storage.hooks.clear()
    assert verify_listed(storage, second.name, second.sizes) == []


def test_a_file_missing_beside_its_manifest_is_still_damage(tmp_path: Path) -> None:
    save_steps(tmp_path, [1])
    storage = FaultyStorage(tmp_path)
    listed = storage.committed()
    (tmp_path / "step-00000001" / "model.safetensors").unlink()

    problems = verify_listed(storage, listed[0].name, listed[0].sizes)

    assert problems is not None and len(problems) == 1
    assert "step-00000001/model.safetensors" in problems[0], problems
    assert ckpts.verify(tmp_path) == [
        f"step-00000001: {tmp_path}/step-00000001/model.safetensors: missing (or not a "
        "regular file)"]
    result = ckpts_cli("verify", tmp_path)
    assert result.returncode == 1 and "step-00000001  FAILED" in result.stdout, result.stdout


# ---- what a run holds reaches the terminal escaped -----------------------------------------

CLEAR = "\x1b[2J\x1b[H"  # clears the terminal and moves the cursor home
METRIC = "acc\x1b[31m\x07$\\x$\x85"  # colour, bell, a broken TeX formula, a C1 control
KEY = "w\x1b]0;pwned\x07"  # an OSC sequence: sets the terminal's title


class Config:
    """Non-tensor state whose dict key, and a tensor whose name, hold escape sequences."""

    def __init__(self, step: int) -> None:
        self.step = step

    def state_dict(self) -> dict[str, object]:
        return {KEY: self.step, "weights": {KEY: torch.full((2,), float(self.step))}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        pass


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two runs named with an escape sequence: one whose checkpoints hold a
    tag that clears the screen, a lone surrogate tag, a metric name and a file name with
    control characters, and tensor and state keys with terminal sequences; and one
    whose only checkpoint has a broken manifest."""
    base = tmp_path_factory.mktemp("hostile")
    run = base / f"run{CLEAR}"
    with ckpts.CheckpointManager(run) as manager:
        for step in (1, 2):
            manager.save(step, ckpts.TrainState(model=torch.nn.Linear(2, 2), cfg=Config(step)),
                         metrics={"loss": 1.0 / step, METRIC: 0.5 * step})
        manager.pin(1, CLEAR)
        manager.pin(2, "\ud800")
    checkpoint = run / "step-00000002"
    # the file's name is in the manifest's files and in the rows of the model's index
    # (format v4), whose new size and hash the manifest then records
    for file in ("manifest.json", "model.index.json"):
        (checkpoint / file).write_text((checkpoint / file).read_text().replace(
            "model.safetensors", "model\\u001b[2J.safetensors"))
    rehash_index(checkpoint, "model.index.json")
    (checkpoint / "model.safetensors").rename(checkpoint / "model\x1b[2J.safetensors")
    damaged = base / f"other{CLEAR}" / "step-00000001"  # `ls` warns, naming its path
    damaged.mkdir(parents=True)
    (damaged / "manifest.json").write_text("{}")
    return run


def hostile_commands(run: Path, out: Path) -> dict[str, list[str | Path]]:
    step1, step2 = run / "step-00000001", run / "step-00000002"
    return {
        "ls": ["ls", run], "ls --json": ["ls", run, "--json"], "ls runs": ["ls", run.parent],
        "show": ["show", step2, "--tensors"], "show --json": ["show", step2, "--json"],
        "best": ["best", run, "--metric", METRIC, "--mode", "max"],
        "best unknown metric": ["best", run, "--metric", "nope"],
        "du": ["du", run], "diff": ["diff", step1, step2], "verify": ["verify", run],
        "pin": ["pin", run, "1", "--tag", CLEAR],  # pinned already: changes nothing
        "unpin unknown tag": ["unpin", run, "2", "--tag", "nope"],
        "report": ["report", run, "-o", out / "report.html"],
        "plot": ["plot", run, "--metric", METRIC, "-o", out / "plot.png"],
    }


@pytest.mark.parametrize("command", list(hostile_commands(Path("run"), Path("out"))))
def test_what_a_run_holds_reaches_the_terminal_escaped(hostile: Path, tmp_path: Path,
                                                       command: str) -> None:
    args = hostile_commands(hostile, tmp_path)[command]
    result = subprocess.run([CKPTS, *map(str, args)], capture_output=True, timeout=120)

    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == (2 if "unknown" in command else 0), stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert b"\x1b" not in result.stdout + result.stderr, stdout + stderr
    assert not any(0x80 <= ord(c) <= 0x9f or 0xd800 <= ord(c) <= 0xdfff or
                   (ord(c) < 0x20 and c != "\n") for c in stdout + stderr), stdout + stderr


def test_escaped_text_reads_as_python_would_write_it(hostile: Path) -> None:
    listing = ckpts_cli("ls", hostile).stdout
    shown = ckpts_cli("show", hostile / "step-00000002", "--tensors").stdout
    missing = ckpts_cli("best", hostile, "--metric", "nope").stderr

    assert "pinned:\\x1b[2J\\x1b[H" in listing
    assert "acc\\x1b[31m\\x07$\\x$\\x85" in listing  # the metric's column
    assert "pinned:\\ud800" in listing
    assert "\ntags        \\ud800\n" in shown
    assert "model\\x1b[2J.safetensors" in shown
    assert "w\\x1b]0;pwned\\x07" in shown  # the tensor key
    assert "metrics present: loss, acc\\x1b[31m\\x07$\\x$\\x85\n" in missing


# ---- numbers a float cannot hold -------------------------------------------------------------

def run_with_metric(run: Path, name: str, value: object) -> Path:
    """A run of two checkpoints; step 2's manifest records ``value`` (JSON) for ``name``,
    as a hand-edited or foreign manifest could."""
    with ckpts.CheckpointManager(run) as manager:
        for step in (1, 2):
            manager.save(step, ckpts.TrainState(model=torch.nn.Linear(2, 2)),
                         metrics={"loss": 1.0 / step, name: float(step)})
    manifest = run / "step-00000002" / "manifest.json"
    recorded = json.loads(manifest.read_text())
    recorded["metrics"][name] = value
    manifest.write_text(json.dumps(recorded))
    return run


def number_commands(run: Path, name: str) -> list[list[str | Path]]:
    return [["ls", run], ["ls", run, "--json"], ["show", run / "step-00000002"],
            ["show", run / "step-00000002", "--json"], ["best", run, "--metric", name],
            ["report", run, "-o", run.parent / "report.html"],
            ["plot", run, "--metric", name, "-o", run.parent / "plot.png"]]


def test_an_infinite_metric_is_shown_and_plotted_without_a_crash(tmp_path: Path) -> None:
    run = run_with_metric(tmp_path / "run", "score", {"__float__": "inf"})

    results = [ckpts_cli(*args) for args in number_commands(run, "score")]

    for result in results:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result
    listing, as_json = results[0].stdout, json.loads(results[1].stdout)
    assert "  0.5    inf  latest, best(loss)" in listing, listing
    assert [row["metrics"]["score"] for row in as_json] == [1.0, None]  # not valid JSON: null
    assert "score=inf" in results[2].stdout


def test_an_integer_metric_too_large_for_a_float_is_shown_without_a_crash(
        tmp_path: Path) -> None:
    run = run_with_metric(tmp_path / "run", "score", 10**400)
    with (run / ".ckpts-history.jsonl").open("a") as history:  # and a deleted step 0
        history.write(json.dumps({"step": 0, "metrics": {"score": -(10**400)}}) + "\n")

    results = [ckpts_cli(*args) for args in number_commands(run, "score")]

    for result in results:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result
    assert "  0.5    inf  latest, best(loss)" in results[0].stdout, results[0].stdout
    assert [row["metrics"]["score"] for row in json.loads(results[1].stdout)] == [1.0, None]

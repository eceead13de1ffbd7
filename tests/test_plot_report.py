"""Model selection you can see: metric curves, the plot, and the HTML report in Chromium.

The runs are real: a tiny model saved through ``CheckpointManager`` with a
retention policy, so some steps are deleted and survive only in the metrics
history. The report is rendered by headless Chromium (``--dump-dom`` and
``--screenshot``); without Chromium the test skips, unless ``CI`` is set, where a
missing Chromium is a failure.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ckpts
from ckpts._format.catalog import list_checkpoints
from ckpts._run import history as _history
from ckpts.cli import app
from ckpts.cli.curves import metric_curve, recommend
from ckpts.cli.report import write_report
from ckpts.storage import LocalStorage

# a U-shaped validation loss: best at step 40, then overfitting
VAL_LOSS = {10: 2.0, 20: 1.5, 30: 1.2, 40: 1.0, 50: 1.05, 60: 1.1, 70: 1.2, 80: 1.3}


def make_run(run: Path, losses: dict[int, float], *, pin: int | None = None) -> None:
    """Save every step with its val_loss, keeping the best 2 and the newest (the manager
    records every step in the run's history)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    state = ckpts.TrainState(model=model)
    with ckpts.CheckpointManager(run, keep=[ckpts.KeepBest(2, "val_loss")]) as manager:
        for step, loss in losses.items():
            manager.save(step, state, metrics={"val_loss": loss, "train_loss": loss / step})
            if step == pin:
                manager.pin(step)


def test_curve_marks_kept_best_pinned_and_deleted_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, VAL_LOSS, pin=20)
    checkpoints = list_checkpoints(run)
    assert [c.step for c in checkpoints] == [20, 40, 50, 80]
    curve = metric_curve(run, "val_loss", "min", checkpoints=checkpoints)
    assert [p.step for p in curve.points] == list(VAL_LOSS)
    assert [p.value for p in curve.points] == list(VAL_LOSS.values())
    kept = {p.step: p.markers for p in curve.points if p.kept}
    assert kept == {20: ("pinned",), 40: ("best",), 50: (), 80: ("latest",)}
    assert {p.step for p in curve.points if not p.kept} == {10, 30, 60, 70}


def test_curve_without_a_history_shows_only_kept_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, VAL_LOSS)
    (run / _history.HISTORY).unlink()
    curve = metric_curve(run, "val_loss", "min", checkpoints=list_checkpoints(run))
    assert [p.step for p in curve.points] == [40, 50, 80]


def test_history_skips_a_torn_line_and_keeps_nan(tmp_path: Path) -> None:
    _history.append(LocalStorage(tmp_path), 5, {"loss": 1.0, "acc": math.nan})
    with open(tmp_path / _history.HISTORY, "a") as f:
        f.write('{"step": 6, "metr')  # a crash mid-append
    _history.append(LocalStorage(tmp_path), 7, {"loss": 0.5})
    _history.append(LocalStorage(tmp_path), 5, {"loss": 0.9})
    found = _history.read(tmp_path)
    assert list(found) == [5, 7]
    assert found[5]["loss"] == 0.9 and math.isnan(found[5]["acc"])


def test_recommendation_names_the_best_kept_step_and_the_overfitting(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, VAL_LOSS)
    advice = recommend(run, "val_loss", "min", checkpoints=list_checkpoints(run))
    assert advice is not None and advice.checkpoint.step == 40
    assert advice.reason == ("step 40: lowest val_loss (1) of 3 kept checkpoints; later steps "
                             "overfit by +30% (step 80: 1.3)")


def test_recommendation_skips_a_damaged_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, VAL_LOSS)
    damaged = run / "step-00000040" / "model.safetensors"
    damaged.unlink()  # its bytes are shared (hard links) with the other steps' files
    damaged.write_bytes(b"truncated")
    checkpoints = list_checkpoints(run)
    assert [c.step for c in checkpoints if c.damaged] == [40]
    advice = recommend(run, "val_loss", "min", checkpoints=checkpoints)
    assert advice is not None and advice.checkpoint.step == 50
    assert "damaged step 40 scored better (1); `ckpts verify` says what is wrong" \
        in advice.reason


def test_recommendation_says_when_the_best_is_the_latest_or_was_deleted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run, {10: 3.0, 20: 2.0, 30: 1.0})
    advice = recommend(run, "val_loss", "min", checkpoints=list_checkpoints(run))
    assert advice is not None and advice.checkpoint.step == 30
    assert "it is the latest step, so the metric may still be improving" in advice.reason
    other = tmp_path / "other"
    make_run(other, {10: 1.0, 20: 2.0, 30: 3.0, 40: 4.0})
    _history.append(LocalStorage(other), 5, {"val_loss": 0.5})  # an evaluated step deleted long ago
    advice = recommend(other, "val_loss", "min", checkpoints=list_checkpoints(other))
    assert advice is not None and advice.checkpoint.step == 10
    assert "deleted step 5 scored better (0.5) but its weights are gone" in advice.reason


def test_plot_command_draws_several_runs_on_one_chart(tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    make_run(tmp_path / "a", VAL_LOSS)
    make_run(tmp_path / "b", {step: loss * 1.2 for step, loss in VAL_LOSS.items()})
    out = tmp_path / "curve.png"
    done = CliRunner().invoke(app, ["plot", str(tmp_path / "a"), str(tmp_path / "b"),
                                    "--metric", "val_loss", "-o", str(out)])
    assert done.exit_code == 0, done.output
    pixels = (image.imread(out)[..., :3] * 255).round().astype(int)
    colours = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # matplotlib's C0 and C1
    missing = CliRunner().invoke(app, ["plot", str(tmp_path / "a"), "--metric", "acc"])
    assert missing.exit_code == 2
    assert "no checkpoint has the metric 'acc'" in missing.output


@pytest.mark.parametrize(("metric", "mode", "best"), [
    ("val_accuracy", None, 40),  # higher is better, by its name
    ("val_loss", None, 10),
    ("val_loss", "max", 40),  # --mode wins
    ("samples_per_second", None, None),  # the name does not tell: no star
])
def test_plot_stars_the_best_by_the_metrics_direction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metric: str, mode: str | None,
        best: int | None) -> None:
    drawn: list[object] = []
    monkeypatch.setattr("ckpts.cli.plot.plot_curves", lambda curves, out: drawn.extend(curves))
    with ckpts.CheckpointManager(tmp_path / "run") as manager:
        for step, value in ((10, 0.1), (20, 0.3), (30, 0.2), (40, 0.9)):
            manager.save(step, ckpts.TrainState(model=torch.nn.Linear(1, 1)),
                         metrics={metric: value})
    done = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--metric", metric,
                                    *(["--mode", mode] if mode else [])])
    assert done.exit_code == 0, done.output
    (curve,) = drawn
    starred = [p.step for p in curve.points if "best" in p.markers]
    assert starred == ([best] if best else [])


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(browser: str, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", *args, page.as_uri()],
            capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_chromium_with_table_curves_and_recommendation(
        tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is missing: `make test` installs it "
                        "(apt-get install chromium chromium-driver)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this")
    image = pytest.importorskip("matplotlib.image")
    run = tmp_path / "run"
    make_run(run, VAL_LOSS, pin=20)
    page = tmp_path / "report.html"
    done = CliRunner().invoke(app, ["report", str(run), "-o", str(page)])
    assert done.exit_code == 0, done.output
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched

    dom = render(browser, page, "--dump-dom").stdout
    rows = re.findall(r'<tr class="(kept|kept recommended|deleted)" data-step="(\d+)"', dom)
    assert rows == [("kept", "20"), ("kept recommended", "40"), ("kept", "50"), ("kept", "80"),
                    ("deleted", "10"), ("deleted", "30"), ("deleted", "60"), ("deleted", "70")]
    assert re.search(r'id="recommendation" data-step="40"', dom)
    assert "step 40: lowest val_loss (1) of 4 kept checkpoints; later steps overfit by +30%" in dom
    assert "4 steps deleted by retention" in dom
    assert dom.count("<svg") == 2  # val_loss and train_loss
    assert len(re.findall(r'class="point deleted"', dom)) == 8  # 4 steps x 2 metrics
    assert re.search(r'class="point kept best" data-step="40"', dom)
    assert re.search(r'class="point kept pinned" data-step="20"', dom)
    assert "4 checkpoints kept" in dom and "4 deleted steps known" in dom

    shot = tmp_path / "report.png"
    render(browser, page, f"--screenshot={shot}", "--window-size=1000,900",
           "--hide-scrollbars")
    pixels = (image.imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == (900, 1000)
    colours = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert len(colours) > 50  # text, table, charts: far from a blank page
    assert (245, 158, 11) in colours  # the best checkpoint's star (#f59e0b) is on screen


def test_report_of_a_run_without_checkpoints_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpts.InvalidArgumentError, match="no committed checkpoints"):
        write_report(tmp_path / "empty", tmp_path / "r.html")
    done = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert done.exit_code == 2 and done.output.startswith("error: no checkpoints in")

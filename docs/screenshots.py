"""Generate the README's pictures: ``make screenshots`` writes docs/img/plot.png and report.png.

It trains the demo's tiny language model (about 15 s on 2 cores; it overfits, so
the best checkpoint is not the last), pins one checkpoint, then runs the real
commands: ``ckpts plot`` and ``ckpts report``, and screenshots the report in
headless Chromium. Usage::

    python docs/screenshots.py docs/img
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ckpts
from ckpts.cli import app
from ckpts.cli import demo_training as _demo

WINDOW = "1000,900"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "demo-run"
        for _ in _demo.train(run, steps=_demo.STEPS):
            pass
        manager = ckpts.CheckpointManager(run)
        manager.pin(manager.checkpoints()[1].step, "paper")
        report = Path(scratch) / "report.html"
        for args in (["plot", str(run), "--metric", "val_loss", "-o", str(out / "plot.png")],
                     ["report", str(run), "-o", str(report)]):
            try:
                app(args)
            except SystemExit as e:
                if e.code:
                    raise
        _screenshot(report, out / "report.png")
    for image in ("plot.png", "report.png"):
        print(out / image, f"{(out / image).stat().st_size / 1000:.0f} kB")


def _screenshot(page: Path, image: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is needed for the report screenshot: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
             f"--window-size={WINDOW}", f"--screenshot={image}", page.as_uri()],
            check=True, capture_output=True, timeout=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/img"))

"""A "training" command that never saves a checkpoint: ``ckpts check-resume`` must refuse it.

Usage: python resume_loop_never_saves.py RUN_DIR [SECONDS]

It creates RUN_DIR, writes its pid to ``RUN_DIR/pid`` (so a test can check that a
timed-out run was killed), works for SECONDS (default 0) and exits 0 without
saving anything. No torch: it starts in milliseconds.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> None:
    run = Path(sys.argv[1])
    run.mkdir(parents=True, exist_ok=True)
    (run / "pid").write_text(str(os.getpid()))
    print("training without checkpoints", flush=True)
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
    print("done", flush=True)


if __name__ == "__main__":
    main()

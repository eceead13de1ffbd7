"""A training command that crashes: ``ckpts check-resume`` must say so and show its output.

Usage: python resume_loop_crashes.py RUN_DIR

It prints a line, then raises, as a script with a bug in its setup would. No
torch: it starts in milliseconds.
"""

from __future__ import annotations

import sys


def main() -> None:
    print(f"starting a run in {sys.argv[1]}", flush=True)
    raise RuntimeError("the data file train.bin is missing")


if __name__ == "__main__":
    main()

"""A process that updates a run's metadata, for test_metadata_updates.py.

Usage: python metadata_worker.py RUN MODE PREFIX COUNT

Opens ``CheckpointManager(RUN)`` (a path or URL; S3 is reached through the AWS
variables), prints ``ready`` and waits for a line on stdin, so that two workers start
their updates together. Then, on step 1:

- ``metrics``: ``add_metrics`` COUNT times, the metric ``PREFIX<i>`` = i each time;
- ``tags``: ``pin`` COUNT times, the tag ``PREFIX<i>``;
- ``evaluate``: with ``keep=[KeepBest(1, "val_loss"), KeepLast(1)]``, one
  ``add_metrics(1, {"val_loss": 0.0})`` whose retention deletes step 2; it prints
  ``evaluated`` and waits for another line before closing, as an evaluation job that goes
  on evaluating would.

It prints ``done`` at the end.
"""

from __future__ import annotations

import sys

import ckpts


def main() -> None:
    run, mode, prefix, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    keep = [ckpts.KeepBest(1, "val_loss"), ckpts.KeepLast(1)] if mode == "evaluate" else None
    manager = ckpts.CheckpointManager(run, keep=keep)
    print("ready", flush=True)
    sys.stdin.readline()
    if mode == "evaluate":
        manager.add_metrics(1, {"val_loss": 0.0})
        print("evaluated", flush=True)
        sys.stdin.readline()
    for i in range(count if mode != "evaluate" else 0):
        if mode == "metrics":
            manager.add_metrics(1, {f"{prefix}{i}": float(i)})
        else:
            manager.pin(1, f"{prefix}{i}")
    manager.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()

"""A writer that is frozen past its lease, for test_stale_writer.py.

Usage: python stale_writer_worker.py URL ENDPOINT

Opens the run with a short lease (``LEASE_SECONDS``), saves steps 1 and 2 with
``KeepLast(KEEP)``, prints ``saved 2`` and waits for a line on stdin. The test freezes it
(SIGSTOP) meanwhile, lets another writer take the run over, writes the line and wakes it
(SIGCONT). It then tries to save steps 3 and 4 and prints, for each, ``committed STEP`` or
``refused STEP ERROR-CLASS: MESSAGE``, and closes its manager.
"""

from __future__ import annotations

import sys

import torch

import ckpts
from remote_worker import build, storage_options, train_step

LEASE_SECONDS = 3.0
KEEP = 1  # so that its retention, after a save, would delete everything older


def main() -> None:
    url, endpoint = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    state, model, optimizer = build(0)
    run = ckpts.storage.FsspecStorage(url, storage_options(endpoint), lease_seconds=LEASE_SECONDS)
    manager = ckpts.CheckpointManager(run, keep=[ckpts.KeepLast(KEEP)])
    for step in (1, 2):
        train_step(model, optimizer, step)
        manager.save(step, state)
    manager.wait()  # its retention, which runs after the commit, has deleted step 1
    print("saved 2", flush=True)
    sys.stdin.readline()  # frozen here by the test, then woken
    for step in (3, 4):
        train_step(model, optimizer, step)
        try:
            manager.save(step, state)
            print("committed", step, flush=True)
        except ckpts.CheckpointError as e:
            print("refused", step, f"{type(e).__name__}: {e}", flush=True)
    try:
        manager.close()
    except ckpts.CheckpointError as e:
        print("close", f"{type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()

"""A writer frozen past its lease on an object store deletes and overwrites nothing.

Writer A (``stale_writer_worker.py``, lease 3 s) saves steps 1 and 2, then is frozen with a
real SIGSTOP, as a GC pause or a suspended VM would freeze it. Writer B, in this process,
waits for A's lease to expire, takes the run over and commits steps 3 and 4 (and 5 with
B's own lease still held). A is woken with SIGCONT and tries to save steps 3 and 4: it
must be refused, and everything B committed must still be listed, verify intact and
restore, with B's lease untouched.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ckpts
from remote_worker import build, open_run, train_step
from s3_server import S3Bucket
from stale_writer_worker import LEASE_SECONDS
from test_remote_runs import reach_server_through_environment

WORKER = str(Path(__file__).with_name("stale_writer_worker.py"))


def start_writer_a(bucket: S3Bucket) -> subprocess.Popen[str]:
    worker = subprocess.Popen([sys.executable, WORKER, bucket.url(), bucket.server.endpoint],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent)
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "saved 2"
    return worker


def take_the_run_over(bucket: S3Bucket) -> ckpts.CheckpointManager:
    """Writer B: waits out A's lease (A cannot renew it while frozen), then restores."""
    time.sleep(LEASE_SECONDS + 0.5)
    state, model, optimizer = build(1)
    manager = ckpts.CheckpointManager(open_run(bucket.url(), bucket.server.endpoint))
    assert manager.restore(state) == 2
    for step in (3, 4):
        train_step(model, optimizer, step)
        manager.save(step, state)
    return manager


@pytest.mark.parametrize("b_still_writes", [True, False], ids=["b-holds-the-lease", "b-closed"])
def test_a_writer_frozen_past_its_lease_harms_nothing_the_new_writer_committed(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, b_still_writes: bool) -> None:
    reach_server_through_environment(s3_bucket, monkeypatch)
    writer_a = start_writer_a(s3_bucket)
    writer_a.send_signal(signal.SIGSTOP)
    try:
        writer_b = take_the_run_over(s3_bucket)
        if not b_still_writes:
            writer_b.close()  # the lease is free again when A wakes: still not A's
        assert writer_a.stdin is not None
        writer_a.stdin.write("go\n")
        writer_a.stdin.flush()
    finally:
        writer_a.send_signal(signal.SIGCONT)
    out, _ = writer_a.communicate(timeout=60)
    assert writer_a.returncode == 0, out

    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["refused", "3"], ["refused", "4"]], out
    assert "LockedError" in lines[0] and s3_bucket.url() in lines[0], out
    listed = [c.step for c in ckpts.CheckpointManager(s3_bucket.url()).checkpoints()]
    assert listed == [2, 3, 4], (listed, out)  # A's KeepLast(1) had deleted step 1 itself
    assert ckpts.verify(s3_bucket.url()) == []
    if b_still_writes:  # B's lease was not overwritten: B goes on saving
        writer_b.save(5, build(1)[0])
        writer_b.close()
    fresh, _, _ = build(2)
    with ckpts.CheckpointManager(open_run(s3_bucket.url(), s3_bucket.server.endpoint)) as reader:
        assert reader.restore(fresh) == (5 if b_still_writes else 4)

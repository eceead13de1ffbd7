"""``check_resume`` with the run on an object store: every step of the check goes through
the storage port (S3 on a moto server; the command reaches it through the AWS variables).

memory:// cannot serve here: each process has its own, and the command runs in others.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fsspec
import pytest

from ckpts.storage import MANIFEST, checkpoint_name
from ckpts.testing import check_resume
from s3_server import S3Bucket

LOOP = str(Path(__file__).with_name("resume_loop_on_store.py"))


def test_a_run_on_a_store_is_killed_resumed_and_compared(
        s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = s3_bucket.storage_options["client_kwargs"]
    for variable, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_ENDPOINT_URL": client["endpoint_url"],
                            "AWS_DEFAULT_REGION": client["region_name"]}.items():
        monkeypatch.setenv(variable, value)
    work = tmp_path / "work"

    result = check_resume([sys.executable, LOOP, "{run}"], workdir=work,
                          run=s3_bucket.url("check/run"), timeout=120)

    assert result.exact, result.report()
    assert result.step == 6 and 2 <= result.killed_after < 6
    # the checkpoints compared were taken into the work folder as they were committed (the
    # loop keeps its newest one only); the run was destroyed
    assert (work / "a" / checkpoint_name(6) / MANIFEST).is_file()
    assert len(list((work / "a").glob("step-*/manifest.json"))) >= 2
    assert (work / "b" / checkpoint_name(6) / MANIFEST).is_file()
    assert (work / "b-at-kill" / MANIFEST).is_file()
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options, skip_instance_cache=True)
    assert fs.find(s3_bucket.name) == []


def test_a_run_location_that_holds_checkpoints_is_refused(tmp_path: Path) -> None:
    from ckpts.errors import InvalidArgumentError
    from ckpts.storage import LocalStorage

    run = LocalStorage(tmp_path / "run")
    staged = run.stage(checkpoint_name(1))
    run.commit(staged, b"{}")
    with pytest.raises(InvalidArgumentError, match="already holds checkpoints"):
        check_resume([sys.executable, LOOP, "{run}"], workdir=tmp_path / "work",
                     run=tmp_path / "run")
    assert run.committed()  # untouched

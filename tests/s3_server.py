"""A real S3 server for the tests: moto on loopback, one per session, a fresh bucket per test.

Registered from conftest.py (``pytest_plugins = ["s3_server"]``). Tests ask for
``s3_bucket``: a new bucket and the ``storage_options`` that reach it, with fixed test
credentials; the machine's AWS variables and config files are hidden from the test.
"""

from __future__ import annotations

import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class S3Server:
    """The session's moto server; ``stop()`` and ``start()`` keep its buckets and objects."""

    server: Any  # moto.server.ThreadedMotoServer
    endpoint: str

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()

    def require_credentials(self, required: bool) -> None:
        """Make moto check access keys (none exist, so every request is refused) or not."""
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=b"0" if required else b"inf",
            method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the session's server."""

    server: S3Server
    name: str
    storage_options: dict[str, Any]

    def url(self, run: str = "run") -> str:
        return f"s3://{self.name}/{run}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Server(server, f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory,
              monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    import fsspec

    for variable in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(variable)
    nowhere = tmp_path_factory.mktemp("aws") / "absent"  # no ~/.aws config or credentials
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}
    name = f"test-{uuid.uuid4().hex[:16]}"
    fs = fsspec.filesystem("s3", **options, skip_instance_cache=True)
    fs.call_s3("create_bucket", Bucket=name)
    return S3Bucket(s3_server, name, options)

"""Shared fixtures: a private VISIONPIPE_HOME, and real local servers (moto S3, HTTP) on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import WeightsServer, serve_http


@pytest.fixture()
def vp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state folder; MLflow falls back to SQLite inside it."""
    home = tmp_path / "vphome"
    monkeypatch.setenv("VISIONPIPE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 at the moto server with dummy credentials; yields the endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return s3_server


def pytest_configure(config: pytest.Config) -> None:
    # Tests never use more threads than the machine has cores.
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture()
def http_server() -> Iterator[WeightsServer]:
    """An HTTP server on 127.0.0.1 serving what each test puts on it (``serve``)."""
    with serve_http() as server:
        yield server

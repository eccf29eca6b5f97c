"""``python -m flows``: Prefect's ephemeral API starts before the pipeline imports, and never leaks."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER_APP = "prefect.server.api.server:create_app"


def _servers_of(prefect_home: Path) -> list[int]:
    """Pids of Prefect API server processes whose PREFECT_HOME is ``prefect_home``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        if SERVER_APP.encode() in cmdline and f"PREFECT_HOME={prefect_home}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def _python(code: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    full_env = {**clean, "PREFECT_HOME": str(home), "VISIONPIPE_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", **env}
    # Files, not pipes: a leaked server would hold a pipe open and stall the test until timeout.
    with (home / "out.txt").open("w+") as stdout, (home / "err.txt").open("w+") as stderr:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env,
                              stdout=stdout, stderr=stderr, timeout=300)
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(done.args, done.returncode, stdout.read(), stderr.read())


@pytest.fixture(autouse=True)
def _no_server_left(tmp_path: Path) -> Iterator[None]:
    """Kill what a failing test leaked, after the test has reported it."""
    yield
    for pid in _servers_of(tmp_path):
        os.kill(pid, signal.SIGKILL)


def test_the_flow_runs_on_the_server_started_early_which_stops_at_exit(tmp_path: Path) -> None:
    code = f"""
import sys
import flows.ephemeral_api as early
from tests.integration.test_entry import _servers_of
from pathlib import Path

api = early.start_ephemeral_api()
assert api is not None
api.wait_ready(120)
from prefect import flow
from prefect.client.orchestration import get_client

@flow
def hello() -> str:
    return "hello"

assert hello() == "hello"
with get_client(sync_client=True) as client:
    assert client.api_url.port == api.port, (client.api_url, api.port)
    assert len(client.read_flow_runs()) == 1
# The point of starting it here: this process never imports Prefect's server module.
assert "prefect.server.api.server" not in sys.modules
assert _servers_of(Path({str(tmp_path)!r})) == [api.process.pid]  # one, not two
print("ok", api.port)
"""
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok ")
    assert "View at" not in out.stderr  # no link to a UI that the server does not serve
    assert _servers_of(tmp_path) == [], "the ephemeral API outlived its process"


def test_a_port_taken_before_the_server_binds_it_is_replaced(tmp_path: Path) -> None:
    code = f"""
import socket
import flows.ephemeral_api as early
from tests.integration.test_entry import _servers_of
from pathlib import Path

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
ports = [taken.getsockname()[1]]
choose = early._free_port
early._free_port = lambda: ports.pop() if ports else choose()
api = early.start_ephemeral_api()
first = api.port
api.wait_ready(120)
assert api.port != first and api.attempts == 2, (first, api.port, api.attempts)
assert _servers_of(Path({str(tmp_path)!r})) == [api.process.pid]
print("ok")
"""
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
    assert _servers_of(tmp_path) == []


def test_a_server_that_cannot_start_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    code = """
import sys
sys.argv = ["flows"]
import flows.__main__ as entry
sys.exit(entry.main([]))
"""
    out = _python(code, tmp_path,
                  PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://nobody@127.0.0.1:9/none")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Prefect's ephemeral API server exited with code 3 while starting" in out.stderr
    assert "PREFECT_API_URL" in out.stderr  # the fix is named
    assert "Beginning flow run" not in out.stderr
    assert _servers_of(tmp_path) == []


def test_a_failed_import_stops_the_server_started_before_it(tmp_path: Path) -> None:
    # The pipeline's import fails while the ephemeral API is still starting.
    code = """
import sys
sys.modules["flows.train_image_classifiers"] = None  # its import fails at once
import flows.__main__ as entry
entry.main([])
"""
    out = _python(code, tmp_path)
    assert out.returncode == 1
    assert "import of flows.train_image_classifiers halted" in out.stderr, out.stderr[-2000:]
    assert _servers_of(tmp_path) == [], "the ephemeral API outlived its process"


def test_a_configured_api_starts_no_ephemeral_server(tmp_path: Path) -> None:
    code = """
import flows.ephemeral_api as early
assert early.start_ephemeral_api() is None
print("none")
"""
    out = _python(code, tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "none"
    assert "Starting temporary server" not in out.stderr
    assert not (tmp_path / "prefect.db").exists()  # nor is a database seeded for it


def test_a_new_state_folder_starts_from_the_installs_migrated_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.prefect_database import make_template, seed_database

    # A database the environment configures is never the one migrated into the template.
    for name in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.setenv(name, "postgresql+asyncpg://nobody@127.0.0.1:9/none")

    stale = tmp_path / "share" / "prefect-0.0.1.db"
    stale.parent.mkdir()
    stale.write_bytes(b"another Prefect version's")
    template = make_template(tmp_path / "share" / "prefect-test.db")  # Prefect's own migrations
    assert template.is_file() and not stale.exists()
    monkeypatch.undo()
    with closing(sqlite3.connect(template)) as db:  # a mark that only the template carries
        db.execute("CREATE TABLE visionpipe_mark (x)")
    home = tmp_path / "home"
    code = f"""
from pathlib import Path
import flows.prefect_database as templates
templates.template_path = lambda: Path({str(template)!r})
import flows.ephemeral_api as early
early.start_ephemeral_api().wait_ready(120)
from prefect import flow

@flow
def hello() -> str:
    return "hello"

print(hello())
"""
    home.mkdir()
    out = _python(code, home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("hello")
    with closing(sqlite3.connect(home / "prefect.db")) as db:
        assert db.execute("SELECT count(*) FROM visionpipe_mark").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM flow_run").fetchone() == (1,)
    # A database that exists is never replaced, not even by a newer template.
    before = (home / "prefect.db").read_bytes()
    assert seed_database(home / "prefect.db", template) is False
    assert (home / "prefect.db").read_bytes() == before
    assert not list(home.glob(".prefect.db.*.tmp"))


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite+aiosqlite:////state/prefect/prefect.db", Path("/state/prefect/prefect.db")),
    ("sqlite+aiosqlite:///prefect.db", Path("prefect.db")),
    ("sqlite+aiosqlite:///:memory:", None),
    ("sqlite+aiosqlite:///file.db?mode=ro", None),
    ("postgresql+asyncpg://prefect@127.0.0.1:5432/prefect", None),
    (None, None),
])
def test_only_an_sqlite_file_database_is_seeded(url: str | None, expected: Path | None) -> None:
    from flows.prefect_database import ephemeral_database

    assert ephemeral_database(url) == expected

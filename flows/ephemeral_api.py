"""Prefect's ephemeral API, started by ``python -m flows`` before this process imports Prefect's server.

With no API configured, Prefect starts its ephemeral API at a flow's first call to it:
``SubprocessASGIServer`` runs the server app (``prefect.server.api.server:create_app``) under
uvicorn in a child process, on a free port of 127.0.0.1, and stops it at exit. Reaching that
class imports ``prefect.server.api.server`` into this process too: 3-4 s of one core, which on 2
cores held the other core idle until the child could even be started.

Here the same child is started right after ``prefect.settings`` is imported, with the command
line and environment Prefect gives it, and this process's client is pointed at it through
``PREFECT_API_URL``, as at any Prefect server. The server module is then never imported here.
The server is still Prefect's own, on this state folder's database, stopped at exit; only who
starts it changed. ``python -m flows.train_image_classifiers`` lets Prefect start it as usual.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from flows.prefect_database import ephemeral_database, seed_database
from visionpipe.errors import EphemeralAPIError

log = logging.getLogger("prefect.server")

# What Prefect's SubprocessASGIServer sets for its child: no UI; an ephemeral server, and the
# last one this process creates (Prefect skips some set-up for it).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
              "PREFECT__SERVER_FINAL": "1"}
STARTUP_FAILURE = 3  # uvicorn's exit code when it cannot start, e.g. the port was taken meanwhile
PORT_ATTEMPTS = 3


class EphemeralAPI:
    """One Prefect API server process on 127.0.0.1, owned by this process."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.port = 0
        self.process: subprocess.Popen[Any] | None = None
        self.attempts = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"

    def spawn(self) -> None:
        """Start the server on a free port and point this process's Prefect client at it."""
        import prefect
        from prefect.context import refresh_global_settings_context

        self.attempts += 1
        self.port = _free_port()
        # The command line of Prefect's SubprocessASGIServer._run_uvicorn_command.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=self._env)
        os.environ["PREFECT_API_URL"] = self.api_url
        # The server serves no UI and goes at exit: no "View at" link to it in the logs.
        os.environ.setdefault("PREFECT_UI_URL", "")
        refresh_global_settings_context()  # Prefect's settings read the environment again

    def wait_ready(self, timeout_s: float) -> None:
        """Until the server answers its health check; another port if this one was taken."""
        log.info("Starting temporary server on %s", self.address)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code == STARTUP_FAILURE and self.attempts < PORT_ATTEMPTS and _taken(self.port):
                self.spawn()  # another process bound the port between our choice and uvicorn's
                continue
            if code is not None:
                self.process = None
                raise EphemeralAPIError(
                    f"Prefect's ephemeral API server exited with code {code} while starting "
                    f"(its output is above). Fix: correct the PREFECT_SERVER_* settings it names, "
                    f"or set PREFECT_API_URL to a running Prefect server.")
            if _healthy(f"{self.api_url}/health"):
                return
            time.sleep(0.1)
        self.stop()
        raise EphemeralAPIError(
            f"Prefect's ephemeral API server did not answer within {timeout_s:.0f} s. Fix: raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a "
            "running Prefect server.")

    def exit_code(self) -> int | None:
        """The server's exit code if it has gone; None while it runs (or once stopped)."""
        return self.process.poll() if self.process is not None else None

    def stop(self) -> None:
        if self.process is None:
            return
        log.info("Stopping temporary server on %s", self.address)
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def start_ephemeral_api() -> EphemeralAPI | None:
    """Start Prefect's ephemeral API where Prefect would start one; None otherwise."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    settings = get_current_settings()
    url = settings.server.database.connection_url
    database = ephemeral_database(url.get_secret_value() if url is not None else None)
    if database is not None:
        seed_database(database)  # a new state folder starts from the install's migrated database
    # Prefect passes its child the settings of this process's profile as well.
    env = {**os.environ, **SERVER_ENV, **settings.to_environment_variables(exclude_unset=True)}
    api = EphemeralAPI(env)
    api.spawn()
    atexit.register(api.stop)
    return api


def startup_timeout_s() -> float:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    return float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())


def _free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own server
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False

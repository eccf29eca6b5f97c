"""Stopping the server and worker processes that integration tests start in their own groups."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen[bytes], wait_s: float = 30) -> None:
    """Ctrl-C, as a person stops a server or worker; then SIGTERM and SIGKILL if it lingers."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return

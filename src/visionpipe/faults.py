"""Fault injection for tests of the recovery paths, driven by ``VISIONPIPE_INJECT_FAULT``.

The variable holds comma-separated entries ``<kind>:<where>[@<once-file>]``:

- ``raise:<rank>``: that DDP rank raises ``RuntimeError`` when training starts (transient);
  ``raise:open-tracking-run`` and ``raise:record-scoring`` do the same once their MLflow run exists;
- ``oom:<rank>``: that rank raises ``torch.OutOfMemoryError`` in its first training step;
- ``bug:<stage>``: the stage (e.g. ``register``, or ``node1`` for a multi-node run's node 1) raises an ``AssertionError`` (deterministic);
- ``die:<rank>``: that rank kills itself with SIGKILL when its second epoch starts, after the
  first epoch's checkpoint (a lost host, the out-of-memory killer).

With ``@<once-file>`` an entry fires only while that file does not exist, and creates it, so a
retry or a re-run gets past it. Unset, nothing happens.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from visionpipe.errors import InjectedBugError, InjectedFault


def _armed(kind: str, where: str) -> bool:
    for entry in filter(None, os.environ.get("VISIONPIPE_INJECT_FAULT", "").split(",")):
        spec, _, once = entry.partition("@")
        if spec != f"{kind}:{where}":
            continue
        if not once:
            return True
        token = Path(once)
        if not token.exists():
            token.write_text("fired\n")
            return True
    return False


def inject(kind: str, where: str | int) -> None:
    """Raise the fault ``kind`` at ``where`` if the environment asks for it."""
    if not _armed(kind, str(where)):
        return
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected on rank {where})")
    if kind == "bug":
        raise InjectedBugError(f"injected bug in {where}")
    place = f"on rank {where}" if str(where).isdigit() else f"in {where}"
    raise InjectedFault(f"injected fault {place}")

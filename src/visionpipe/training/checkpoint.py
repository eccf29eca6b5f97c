"""Checkpoints written atomically with a digest beside them, and read back with weights_only."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from visionpipe.digests import (
    DigestError,
    copy_with_digest,
    digest_path,
    load_with_digest,
    save_with_digest,
)
from visionpipe.errors import CheckpointError

log = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Write ``state`` to ``path`` atomically with its sha256 beside it; return the sha256."""
    return save_with_digest(state, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` after checking its digest."""
    try:
        state = load_with_digest(path)
    except DigestError as exc:
        raise CheckpointError(f"checkpoint {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a visionpipe checkpoint (no 'model' entry)")
    return state


def rotate_and_save(state: dict[str, Any], folder: Path, best: bool = False) -> str:
    """Write ``last.pt``, keeping the previous one as ``prev.pt`` so one damaged file loses nothing.

    With ``best``, the same state is also ``best.pt``, written first (a resumed run never records
    a best epoch without its file), serialised once and copied.
    """
    last, prev = folder / "last.pt", folder / "prev.pt"
    digest = save_checkpoint(state, folder / "best.pt") if best else None
    if last.exists() and digest_path(last).exists():
        _keep_as_prev(last, prev)
    if digest is not None:
        return copy_with_digest(folder / "best.pt", digest, last)
    return save_checkpoint(state, last)


def _keep_as_prev(last: Path, prev: Path) -> None:
    """``prev.pt`` and its digest become links to (or copies of) ``last.pt``'s, one at a time.

    ``last.pt`` stays in place until the new one replaces it, so a process killed at any point
    of a rotation leaves one whole pair to resume from: moving ``last.pt`` away first left, for
    a moment, no ``last.pt`` and a ``prev.pt`` beside the digest of the file it replaced.
    """
    for source, target in ((last, prev), (digest_path(last), digest_path(prev))):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def latest_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint in ``folder`` that passes its digest check, or None.

    A damaged or half-written newest file is skipped with a warning in favour of the one before.
    """
    for name in ("last.pt", "prev.pt"):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path)
        except (CheckpointError, RuntimeError, OSError, ValueError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        state["path"] = str(path)
        return state
    return None

"""Checkpoints written atomically with a digest beside them, and read back with weights_only."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or not ours."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingWriter:
    """A file that hashes the bytes written through it, so no checkpoint is read back to hash it."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return int(self._file.write(data))

    def flush(self) -> None:
        self._file.flush()


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Write ``state`` to ``path`` via a temporary name and a rename; return its sha256.

    The digest goes to ``<path>.sha256`` after the file is in place, so a crash between the two
    leaves a checkpoint without a digest, which ``load_checkpoint`` refuses rather than trusts.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
    digest = writer.digest.hexdigest()
    os.replace(tmp, path)
    _write_digest(path, digest)
    return digest


def _copy_checkpoint(source: Path, digest: str, path: Path) -> str:
    """``path`` becomes a copy of the checkpoint ``source`` (whose sha256 is ``digest``).

    A copy, not a link: a file damaged or rewritten in place under one name leaves the other whole.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    _write_digest(path, digest)
    return digest


def _write_digest(path: Path, digest: str) -> None:
    sidecar = path.with_name(path.name + ".sha256")
    tmp_sidecar = sidecar.with_name("." + sidecar.name + ".tmp")
    tmp_sidecar.write_text(json.dumps({"sha256": digest}))
    os.replace(tmp_sidecar, sidecar)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` after checking its digest."""
    sidecar = path.with_name(path.name + ".sha256")
    if not path.exists() or not sidecar.exists():
        raise CheckpointError(f"checkpoint {path} or its digest file is missing")
    expected = json.loads(sidecar.read_text())["sha256"]
    actual = _sha256(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: sha256 {actual} != recorded {expected}")
    state = torch.load(path, map_location="cpu", weights_only=True)
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
    if last.exists() and last.with_name("last.pt.sha256").exists():
        os.replace(last, prev)
        os.replace(last.with_name("last.pt.sha256"), prev.with_name("prev.pt.sha256"))
    if digest is not None:
        return _copy_checkpoint(folder / "best.pt", digest, last)
    return save_checkpoint(state, last)


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

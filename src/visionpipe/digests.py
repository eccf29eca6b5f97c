"""Files written atomically with their sha256 beside them, and read back only when it matches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch

from visionpipe.errors import DigestError

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The full hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_path(path: Path) -> Path:
    """Where the digest of ``path`` is kept: ``<path>.sha256``."""
    return path.with_name(path.name + ".sha256")


class _HashingWriter:
    """A file that hashes the bytes written through it, so nothing is read back to hash it."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return int(self._file.write(data))

    def flush(self) -> None:
        self._file.flush()


def save_with_digest(obj: Any, path: Path, *, private_tmp: bool = False) -> str:
    """``torch.save`` ``obj`` to ``path`` via a temporary name and a rename; return its sha256.

    The digest goes beside it after the file is in place, so a crash between the two leaves a
    file without a digest, which ``load_with_digest`` refuses rather than trusts. With
    ``private_tmp`` the temporary name holds the host and the process id, for files that several
    processes may write at once (each rename then puts a whole file in place).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, private_tmp)
    try:
        with tmp.open("wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = writer.digest.hexdigest()
    _write_digest(path, digest, private_tmp)
    return digest


def copy_with_digest(source: Path, digest: str, path: Path) -> str:
    """``path`` becomes a copy of ``source``, whose sha256 is ``digest``; return the digest.

    A copy, not a link: a file damaged or rewritten in place under one name leaves the other whole.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    _write_digest(path, digest, private_tmp=False)
    return digest


def load_with_digest(path: Path) -> Any:
    """``torch.load`` (weights only, onto the CPU) a file written by ``save_with_digest``,
    after checking its sha256 against the one recorded beside it."""
    sidecar = digest_path(path)
    if not path.exists() or not sidecar.exists():
        raise DigestError(f"{path} or its digest file is missing")
    try:
        expected = json.loads(sidecar.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DigestError(f"the digest file {sidecar} is damaged ({exc})") from exc
    actual = file_sha256(path)
    if actual != expected:
        raise DigestError(f"{path} is damaged: sha256 {actual} != recorded {expected}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_digest(path: Path, digest: str, private_tmp: bool) -> None:
    sidecar = digest_path(path)
    tmp = _tmp_name(sidecar, private_tmp)
    tmp.write_text(json.dumps({"sha256": digest}))
    os.replace(tmp, sidecar)


def _tmp_name(path: Path, private: bool) -> Path:
    owner = f".{socket.gethostname()}.{os.getpid()}" if private else ""
    return path.with_name(f".{path.name}{owner}.tmp")

"""Mirror S3 objects into a local folder, downloading only what changed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from visionpipe.data.paths import confined_path
from visionpipe.data.s3 import S3Client, s3_error

log = logging.getLogger(__name__)

INDEX_NAME = ".s3-index.json"  # hidden, so listing the mirror as an ImageFolder skips it
_THREADS = 8  # downloads wait on the network, not the CPU


@dataclass(frozen=True)
class SyncStats:
    """How many objects were fetched and how many were already up to date."""

    downloaded: int
    reused: int


def sync_objects(
    client: S3Client, bucket: str, root: Path, items: Sequence[tuple[str, dict[str, Any]]]
) -> SyncStats:
    """Download each ``(relpath, listed object)`` to ``root/relpath`` unless ETag and size match.

    The index of what was downloaded lives next to the files, so a copy of the mirror stays valid.
    """
    index = _read_index(root)
    todo = [(rel, obj) for rel, obj in items if not _is_current(root, rel, obj, index)]
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        fetched = list(pool.map(lambda item: _download(client, bucket, root, *item), todo))
    for (rel, _), entry in zip(todo, fetched, strict=True):
        index[rel] = entry
    if todo:
        _write_index(root, index)
    return SyncStats(downloaded=len(todo), reused=len(items) - len(todo))


def _is_current(
    root: Path, rel: str, obj: dict[str, Any], index: dict[str, dict[str, Any]]
) -> bool:
    """Whether the local copy is the listed object: same ETag, same size on record and on disk."""
    path = confined_path(root, rel)
    entry = index.get(rel)
    if entry is None or not path.is_file():
        return False
    same = entry.get("etag") == obj.get("ETag") and entry.get("size") == obj.get("Size")
    return same and path.stat().st_size == obj.get("Size")


def _download(
    client: S3Client, bucket: str, root: Path, rel: str, obj: dict[str, Any]
) -> dict[str, Any]:
    """Fetch one object under a temporary name, then rename it into place."""
    key = obj["Key"]
    path = confined_path(root, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        with open(tmp, "wb") as out:
            shutil.copyfileobj(response["Body"], out)
        os.replace(tmp, path)
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(exc, client, bucket) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return {"etag": response["ETag"], "size": response["ContentLength"]}


def _read_index(root: Path) -> dict[str, dict[str, Any]]:
    """The record of downloaded objects; an unreadable one means downloading everything again."""
    try:
        data = json.loads((root / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_index(root: Path, index: dict[str, dict[str, Any]]) -> None:
    """Replace the index atomically, so a crash leaves the old one or the new one."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{INDEX_NAME}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(index, sort_keys=True, indent=0))
    os.replace(tmp, root / INDEX_NAME)

"""The checkpoint folder of a multi-node stage: storage every node reaches.

Either a mounted volume (a path: NFS, EFS, a ReadWriteMany claim), used in place, or an S3
prefix: global rank 0 writes checkpoints to a local folder and uploads them after each save;
every node downloads the newest ones before it launches, so a retry on other hosts resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from visionpipe.data.s3 import parse_s3_uri, s3_client
from visionpipe.errors import SharedStorageError

log = logging.getLogger(__name__)

# What a stage folder holds that another node or a later attempt needs, in upload order: the
# older checkpoint first, so an upload cut short leaves S3 with a valid pair to fall back to.
CHECKPOINT_FILES = ("prev.pt", "prev.pt.sha256", "best.pt", "best.pt.sha256", "last.pt",
                    "last.pt.sha256")
TOKENS = ".nodes"


class SharedStore:
    """A stage folder on shared storage, addressed as a path or ``s3://bucket/prefix``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.is_s3 = uri.startswith("s3://")
        if self.is_s3:
            self.bucket, self.prefix = parse_s3_uri(self.uri)
        else:
            Path(self.uri).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"SharedStore({self.uri!r})"

    def working_dir(self, local_cache: Path) -> Path:
        """Where the ranks read and write checkpoints: the volume itself, or a local mirror."""
        if not self.is_s3:
            return Path(self.uri)
        local_cache.mkdir(parents=True, exist_ok=True)
        return local_cache

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def push(self, local: Path, names: Iterable[str] = CHECKPOINT_FILES) -> None:
        """Upload the named files of ``local`` that exist (S3 only; a volume is written in place).

        In the order given: the older checkpoint first. Between a checkpoint and its digest a
        reader sees a mismatch, which ``latest_checkpoint`` skips for the pair before it.
        """
        if not self.is_s3:
            return
        client = s3_client()
        for name in names:
            path = local / name
            if path.is_file():
                try:
                    client.upload_file(str(path), self.bucket, self._key(name))
                except (BotoCoreError, ClientError) as exc:
                    raise SharedStorageError(f"cannot upload {name} to {self.uri}: {exc}") from exc

    def pull(self, local: Path, names: Iterable[str] = CHECKPOINT_FILES) -> list[str]:
        """Download the named files present on S3 into ``local``; return their names."""
        if not self.is_s3:
            return []
        client = s3_client()
        local.mkdir(parents=True, exist_ok=True)
        fetched = []
        for name in names:
            try:
                client.download_file(self.bucket, self._key(name), str(local / f".{name}.part"))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey"}:
                    continue
                raise SharedStorageError(f"cannot download {name} from {self.uri}: {exc}") from exc
            except BotoCoreError as exc:
                raise SharedStorageError(f"cannot download {name} from {self.uri}: {exc}") from exc
            (local / f".{name}.part").replace(local / name)
            fetched.append(name)
        return fetched

    def write_token(self, name: str, text: str) -> None:
        """A small marker other nodes look for (node 0 proves the storage is the same one)."""
        if self.is_s3:
            try:
                s3_client().put_object(Bucket=self.bucket, Key=self._key(f"{TOKENS}/{name}"),
                                       Body=text.encode())
            except (BotoCoreError, ClientError) as exc:
                raise SharedStorageError(f"cannot write to {self.uri}: {exc}") from exc
            return
        folder = Path(self.uri) / TOKENS
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / name)

    def read_token(self, name: str) -> str | None:
        if self.is_s3:
            try:
                body = s3_client().get_object(Bucket=self.bucket, Key=self._key(f"{TOKENS}/{name}"))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey"}:
                    return None
                raise SharedStorageError(f"cannot read {self.uri}: {exc}") from exc
            return str(body["Body"].read().decode())
        path = Path(self.uri) / TOKENS / name
        return path.read_text() if path.is_file() else None

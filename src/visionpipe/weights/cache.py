"""The verified weights cache: files named by their sha256, an index of URI -> digest.

Bytes go to a temporary file in the cache while they are hashed, and only a verified file is
renamed to ``<sha256>.pth``, so a half-written or tampered file is never used. The index is
replaced atomically too, so a reader never sees half of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from visionpipe.digests import file_sha256
from visionpipe.redaction import redact
from visionpipe.errors import WeightsError
from visionpipe.weights.sources import Source

log = logging.getLogger(__name__)

_INDEX = "index.json"


class FetchedWeights(BaseModel):
    """Where the verified weights lie in the cache, and where they came from."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    source: str
    random_init: bool
    arch: str


def store_verified(cache: Path, source: Source, uri: str) -> tuple[Path, str]:
    """Download ``source`` to ``cache`` as ``<sha256>.pth`` if its digest checks out; index it."""
    tmp, digest = _stream_to_temp(source.chunks(), cache)
    try:
        _verify_digest(uri, digest, source)
        path = cache / f"{digest}.pth"
        os.replace(tmp, path)  # atomic: readers see no file or the whole verified one
    finally:
        tmp.unlink(missing_ok=True)
    _index_put(cache, source.key, digest)
    return path, digest


def _stream_to_temp(chunks: Iterator[bytes], cache: Path) -> tuple[Path, str]:
    """Write ``chunks`` to a temporary file in the cache, hashing them on the way."""
    fd, name = tempfile.mkstemp(dir=cache, prefix=".partial-", suffix=".pth")
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _verify_digest(uri: str, actual: str, source: Source) -> None:
    """Raise :class:`WeightsError` unless ``actual`` is the digest the source promised."""
    expected, prefix = source.expected, source.prefix
    if expected is not None and actual != expected:
        fix = (f"if the file was replaced on purpose and you trust it, set weights.sha256={actual}"
               if source.pinned_by == "weights.sha256"
               else f"register the intended weights again or correct {source.pinned_by}")
        raise WeightsError(
            f"sha256 mismatch for {uri}: expected {expected} ({source.pinned_by}), got {actual}. "
            f"Fix: {fix}; otherwise point weights.uri at the original file."
        )
    if expected is None and prefix is not None and not actual.startswith(prefix):
        raise WeightsError(
            f"sha256 mismatch for {uri}: its file name promises a digest starting with {prefix}, "
            f"got {actual}. Fix: the download is corrupt or the file was renamed; point "
            "weights.uri at the original file, or set weights.sha256 to the full digest you trust."
        )


def cache_lookup(cache: Path, source: Source) -> tuple[Path, str] | None:
    """The cached file for ``source`` if its digest is known and it still has that digest."""
    digest = source.expected
    if digest is None:
        digest = _read_index(cache).get(source.key)
        # An index entry that breaks the file name's promise is stale: download and verify.
        if digest is None or (source.prefix is not None and not digest.startswith(source.prefix)):
            return None
    path = cache / f"{digest}.pth"
    if not path.is_file():
        return None
    actual = file_sha256(path)
    if actual != digest:
        log.warning("cached weights %s are damaged (sha256 %s); downloading again", path, actual)
        path.unlink(missing_ok=True)
        return None
    log.info("weights for %s found in the cache: %s", redact(source.key), path)
    return path, digest


def _read_index(cache: Path) -> dict[str, str]:
    """The index's ``key -> digest`` entries; a missing or unreadable index is empty."""
    try:
        data = json.loads((cache / _INDEX).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable weights cache index %s", cache / _INDEX)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _index_put(cache: Path, key: str, digest: str) -> None:
    """Record ``key -> digest``, replacing the index atomically so readers never see half of it."""
    index = _read_index(cache)
    index[key] = digest
    fd, name = tempfile.mkstemp(dir=cache, prefix=".index-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(index, out, indent=1, sort_keys=True)
    os.replace(name, cache / _INDEX)

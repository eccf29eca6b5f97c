"""A resized copy of a split, written once per dataset version: one memory-mappable file.

Photos are often much larger than a 224-pixel crop needs, and decoding is what limits a
training loader. As FFCV's ``max_resolution``, prepare-dataset stores each training image once
with its short side at ``short_side`` (upright, RGB, JPEG quality 90), all in one
``<split>-<side>px-q90-v1.bin`` of concatenated JPEG bytes with an ``.offsets.npy`` (N + 1
int64 byte offsets) beside it, and a ``.bin.sha256`` JSON that records the digests of both.
Every epoch, candidate and later run on the version reads it through ``np.memmap`` after
checking the digests; a copy that fails them is refused and written again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from visionpipe.data.images import open_image, short_side_size
from visionpipe.digests import digest_path, file_sha256

log = logging.getLogger(__name__)

QUALITY = 90
COPY_VERSION = 1  # bump when the stored pixels change (resize, encoder settings)


def copy_path(folder: Path, split: str, short_side: int) -> Path:
    """Where a split's copy lives in a dataset version's folder (beside the manifest)."""
    return folder / "prepared" / f"{split}-{short_side}px-q{QUALITY}-v{COPY_VERSION}.bin"


def offsets_path(bin_path: Path) -> Path:
    return bin_path.with_name(bin_path.name.removesuffix(".bin") + ".offsets.npy")


def resized_jpeg(data: bytes, short_side: int) -> bytes:
    """One image upright in RGB with its short side at most ``short_side``, as a JPEG."""
    img = open_image(data, functools.partial(short_side_size, short_side))  # draft: DCT scaling
    if min(img.size) > short_side:
        scale = short_side / min(img.size)
        size = (max(short_side, round(img.width * scale)), max(short_side, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)  # antialiased, as tvf.resize
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def ensure_prepared_copy(folder: Path, root: Path, rows: pd.DataFrame, split: str,
                         short_side: int) -> Path:
    """The verified copy of ``rows`` (a split's manifest rows in path order): reused when its
    digests match, else (missing, damaged, or of other rows) written again."""
    path = copy_path(folder, split, short_side)
    problem = verify_copy(path, len(rows))
    if problem is None:
        log.info("prepared copy %s verified: %d images", path, len(rows))
        return path
    if path.exists():
        log.warning("refusing the prepared copy %s (%s); writing it again", path, problem)
    write_copy(path, root, rows, short_side)
    return path


def verify_copy(path: Path, count: int) -> str | None:
    """Why the copy at ``path`` cannot be used for ``count`` images, or None if it can."""
    sidecar, offsets = digest_path(path), offsets_path(path)
    if not (path.is_file() and offsets.is_file() and sidecar.is_file()):
        return "missing"
    try:
        recorded = json.loads(sidecar.read_text())
        if file_sha256(path) != recorded["sha256"]:
            return "its sha256 does not match its digest file"
        if file_sha256(offsets) != recorded["offsets_sha256"]:
            return "its offsets' sha256 does not match its digest file"
        if recorded["count"] != count:
            return f"it holds {recorded['count']} images, the split {count}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable digest file: {exc}"
    return None


def write_copy(path: Path, root: Path, rows: pd.DataFrame, short_side: int) -> None:
    """Resize every image of ``rows`` (threads: Pillow releases the GIL) into one file.

    Each file is written under a private temporary name and renamed, the digest last, so
    several processes may write at once and a reader only trusts a whole copy.
    """
    from visionpipe.data.loading import read_image_file  # loading imports prepare, which imports us

    def one(relpath: str, digest: str) -> bytes:
        return resized_jpeg(read_image_file(root, relpath, digest), short_side)

    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()}.{os.getpid()}"
    tmp_bin = path.with_name(f".{path.name}.{owner}.tmp")
    offsets = [0]
    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            open(tmp_bin, "wb") as out:
        for encoded in pool.map(one, rows["path"].astype(str), rows["sha256"].astype(str)):
            out.write(encoded)
            digest.update(encoded)
            offsets.append(offsets[-1] + len(encoded))
    tmp_offsets = path.with_name(f".{offsets_path(path).name}.{owner}.tmp.npy")
    np.save(tmp_offsets, np.asarray(offsets, dtype=np.int64))
    record = {"sha256": digest.hexdigest(), "offsets_sha256": file_sha256(tmp_offsets),
              "count": len(rows), "short_side": short_side, "quality": QUALITY}
    os.replace(tmp_bin, path)
    os.replace(tmp_offsets, offsets_path(path))
    tmp_sidecar = path.with_name(f".{digest_path(path).name}.{owner}.tmp")
    tmp_sidecar.write_text(json.dumps(record))
    os.replace(tmp_sidecar, digest_path(path))
    log.info("prepared copy %s: %d images, %.1f MB", path, len(rows), offsets[-1] / 1e6)


class PreparedImages:
    """The JPEG bytes of a copy's images by index, read through a memory map.

    The map is opened on first use in each process (DataLoader workers get the path, not the map).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets = np.load(offsets_path(path))
        self._data: np.memmap | None = None  # type: ignore[type-arg]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self._data[start:end].tobytes()

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "offsets": self.offsets, "_data": None}

"""Decode every candidate image once: keep the good ones, report and exclude the rest."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError

from visionpipe.errors import DatasetError
from visionpipe.data.images import open_image
from visionpipe.data.paths import confined_path
from visionpipe.data.sources import Materialized, SourceFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    """A decodable image with its content hash and size (after EXIF rotation)."""

    relpath: str
    source: str
    class_name: str
    sha256: str
    width: int
    height: int


@dataclass
class ValidationReport:
    """What validation kept and why it excluded the rest."""

    files_seen: int
    images_valid: int
    excluded: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    per_class: dict[str, int] = field(default_factory=dict)
    balance_ratio: float = 0.0  # smallest class / largest class; 1.0 is balanced

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy for report.json."""
        return asdict(self)


def validate_images(
    materialized: Materialized, min_per_class: int
) -> tuple[list[ImageRecord], ValidationReport]:
    """Decode every file, drop the bad and duplicated ones, and check the classes are usable."""
    root, files = materialized.root, materialized.files
    if not files:
        raise DatasetError(f"no files found under {root}. Fix: lay the images out as an "
                           "ImageFolder, <root>/<class>/<image>, with one folder per class.")
    threads = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda f: inspect_image(root, f), files))
    records = [r for r in results if isinstance(r, ImageRecord)]
    excluded = [{"path": f.relpath, "reason": r} for f, r in zip(files, results, strict=True)
                if isinstance(r, str)]
    if not records:
        raise DatasetError(f"none of the {len(files)} files under {root} is a readable image "
                           f"(e.g. {excluded[:3]}). Fix: replace the corrupt files.")
    records, duplicates = drop_duplicates(records)
    report = _report(len(files), records, excluded + duplicates)
    check_classes(report.per_class, min_per_class, root)
    for item in report.excluded:
        log.warning("excluded %s: %s", item["path"], item["reason"])
    return records, report


def inspect_image(root: Path, file: SourceFile) -> ImageRecord | str:
    """A record of the decoded file, or the reason it cannot be used."""
    try:
        data = confined_path(root, file.relpath).read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not data:
        return "empty file"
    try:
        image = open_image(data)
    except UnidentifiedImageError:
        return "not an image (unknown format)"
    # Decoders raise many types (OSError, SyntaxError, ValueError, struct.error...) on bad data;
    # whatever the type, the file cannot be trained on.
    except Exception as exc:  # noqa: BLE001
        return f"corrupt or truncated: {type(exc).__name__}: {exc}"
    digest = hashlib.sha256(data).hexdigest()
    return ImageRecord(file.relpath, file.source, file.class_name, digest, *image.size)


def drop_duplicates(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """Keep one file per content hash, so identical images cannot land in two splits.

    Identical content filed under different classes is ambiguous: every copy is excluded.
    """
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.relpath):
        by_hash[record.sha256].append(record)
    kept: list[ImageRecord] = []
    excluded: list[dict[str, str]] = []
    for group in by_hash.values():
        classes = sorted({r.class_name for r in group})
        if len(classes) > 1:
            excluded += [{"path": r.relpath, "reason": f"same image filed under classes {classes}"}
                         for r in group]
            continue
        kept.append(group[0])
        excluded += [{"path": r.relpath, "reason": f"duplicate of {group[0].relpath}"}
                     for r in group[1:]]
    return sorted(kept, key=lambda r: r.relpath), excluded


def check_classes(per_class: dict[str, int], min_per_class: int, root: Path) -> None:
    """Refuse datasets a classifier cannot be trained and evaluated on."""
    if len(per_class) < 2:
        raise DatasetError(f"found {len(per_class)} class(es) {sorted(per_class)} under {root}; "
                           "a classifier needs at least 2. Fix: put each class's images in its "
                           "own subfolder, <root>/<class>/<image>.")
    small = {name: n for name, n in sorted(per_class.items()) if n < min_per_class}
    if small:
        listed = ", ".join(f"{name!r} has {n}" for name, n in small.items())
        raise DatasetError(f"too few valid images: {listed}; data.min_per_class is "
                           f"{min_per_class} so that every split sees every class. Fix: add "
                           f"images to those folders under {root}, remove the folders, or raise "
                           "data.max_per_class if it is below min_per_class.")


def _report(
    seen: int, records: list[ImageRecord], excluded: list[dict[str, str]]
) -> ValidationReport:
    """Counts per class and the class balance of the kept records."""
    per_class = dict(sorted(Counter(r.class_name for r in records).items()))
    ratio = min(per_class.values()) / max(per_class.values()) if per_class else 0.0
    excluded = sorted(excluded, key=lambda item: item["path"])
    return ValidationReport(seen, len(records), excluded, per_class, round(ratio, 6))

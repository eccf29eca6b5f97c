"""The manifest: one row per image with its split, and the content hash that versions it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from visionpipe.errors import DatasetError
from visionpipe.data.validate import ImageRecord

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "source", "label", "class_name", "split", "sha256", "width", "height"]
# `source` says where a file was found, which differs between two copies of the same data.
VERSION_COLUMNS = [c for c in MANIFEST_COLUMNS if c != "source"]
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.parquet"
REPORT_NAME = "report.json"
_SCHEMA = "visionpipe-manifest/1"  # bump when the meaning of a column changes


def build_manifest(
    records: Sequence[ImageRecord], seed: int, val_fraction: float, test_fraction: float,
    official_test: Callable[[str], bool] | None = None,
) -> pd.DataFrame:
    """Label records (classes sorted by name -> 0..K-1) and split each class by the seed.

    See :func:`split_class`: each class is split on its own (stratified), and an image's split
    depends on its content, its class and the seed, so a new dataset version that adds or
    removes a few images keeps every other image in the split it had. A source with an official
    test set (CIFAR-10) names its files with ``official_test``: those are the test split,
    and only the rest is split into train and val.
    """
    by_class: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.relpath):
        by_class[record.class_name].append(record)
    rows: list[dict[str, Any]] = []
    for label, name in enumerate(sorted(by_class)):
        group = by_class[name]
        if official_test is None:
            splits = split_class(name, group, seed, val_fraction, test_fraction)
        else:
            splits = _split_around_official_test(name, group, seed, val_fraction, official_test)
        rows += [{"path": r.relpath, "source": r.source, "label": label, "class_name": name,
                  "split": split, "sha256": r.sha256, "width": r.width, "height": r.height}
                 for r, split in zip(group, splits, strict=True)]
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("path", ignore_index=True)
    return frame.astype({"label": "int64", "width": "int64", "height": "int64"})


def split_class(
    class_name: str, records: Sequence[ImageRecord], seed: int,
    val_fraction: float, test_fraction: float,
) -> list[str]:
    """Split names ("train", "val" or "test") for the images of one class, in ``records`` order.

    The counts are ``round(n * fraction)`` (halves up) for test and val, at least one each, and
    the rest for train, which must keep one image at least. Which images go where is decided
    by a key per image, sha256 of ``"{seed}/{class_name}/{image sha256}"`` (the path breaks
    ties): in key order, the first ``n_test`` images are test, the next ``n_val`` val, the rest
    train. Adding or removing one image therefore moves only the images next to the two
    boundaries (three at most, and never between train and test), where a permutation of
    ``range(n)`` would reshuffle the whole class and put images an earlier model trained on
    into today's test split.
    """
    n = len(records)
    n_test = _split_size(n, test_fraction)
    n_val = _split_size(n, val_fraction)
    if n - n_test - n_val < 1:
        raise DatasetError(_too_small_message(class_name, n, val_fraction, test_fraction))
    order = sorted(range(n), key=lambda i: (_split_key(seed, class_name, records[i].sha256),
                                            records[i].relpath))
    names = ["train"] * n
    for rank, index in enumerate(order):
        if rank < n_test:
            names[index] = "test"
        elif rank < n_test + n_val:
            names[index] = "val"
    return names


def _split_around_official_test(class_name: str, records: Sequence[ImageRecord], seed: int,
                                val_fraction: float, official_test: Callable[[str], bool]) -> list[str]:
    """The official test files are test; the others are split into train and val by the seed."""
    tests = [official_test(r.relpath) for r in records]
    rest = [r for r, test in zip(records, tests, strict=True) if not test]
    if not any(tests) or len(rest) < 2:
        raise DatasetError(
            f"class {class_name!r} has {sum(tests)} images of the official test set and "
            f"{len(rest)} others: it needs one test image and two others at least. Fix: raise "
            "data.max_per_class (it samples the official train and test files alike).")
    n_val = _split_size(len(rest), val_fraction)
    order = sorted(range(len(rest)), key=lambda i: (_split_key(seed, class_name, rest[i].sha256),
                                                    rest[i].relpath))
    val = {id(rest[i]) for i in order[:min(n_val, len(rest) - 1)]}
    return ["test" if test else "val" if id(r) in val else "train"
            for r, test in zip(records, tests, strict=True)]


def _split_size(n: int, fraction: float) -> int:
    """``n * fraction`` rounded half up, at least one."""
    return max(1, math.floor(n * fraction + 0.5))


def _split_key(seed: int, class_name: str, image_sha256: str) -> bytes:
    """An image's place in its class's split order: stable whatever other images exist."""
    return hashlib.sha256(f"{seed}/{class_name}/{image_sha256}".encode()).digest()


def _too_small_message(class_name: str, n: int, val_fraction: float, test_fraction: float) -> str:
    """Why a class cannot be split, with the counts the fractions give and the fixes."""
    n_val, n_test = _split_size(n, val_fraction), _split_size(n, test_fraction)
    return (f"class {class_name!r} has {n} images: data.val_fraction={val_fraction} gives "
            f"{n_val} val and data.test_fraction={test_fraction} gives {n_test} test (rounded "
            f"half up, at least 1 each), leaving {n - n_val - n_test} for train. Fix: lower "
            f"data.val_fraction and/or data.test_fraction, or add images to {class_name!r}.")


def dataset_digest(manifest: pd.DataFrame) -> str:
    """sha256 of the manifest's content, independent of row order and of where the files lie."""
    frame = manifest.sort_values("path", ignore_index=True)
    columns = [frame[c].astype(str if c in ("path", "class_name", "split", "sha256") else "int64")
               .tolist() for c in VERSION_COLUMNS]
    canonical = {"schema": _SCHEMA, "columns": VERSION_COLUMNS, "rows": list(zip(*columns))}
    blob = json.dumps(canonical, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def dataset_version(manifest: pd.DataFrame) -> str:
    """The dataset version: the first 12 hex digits of :func:`dataset_digest`."""
    return dataset_digest(manifest)[:12]


def write_manifest(
    manifest: pd.DataFrame, report: dict[str, Any], folder: Path
) -> tuple[Path, Path]:
    """Write ``manifest.parquet`` and ``report.json`` into ``folder`` unless already there.

    Each file is written under a temporary name and renamed, the manifest last, so a manifest
    that exists is complete and comes with its report.
    """
    manifest_path, report_path = folder / MANIFEST_NAME, folder / REPORT_NAME
    if manifest_path.is_file() and report_path.is_file():
        log.info("manifest %s already present", manifest_path)
        return manifest_path, report_path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = f".{uuid.uuid4().hex}.tmp"
    report_tmp = folder / f"{REPORT_NAME}{tmp}"
    report_tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    os.replace(report_tmp, report_path)
    manifest_tmp = folder / f"{MANIFEST_NAME}{tmp}"
    manifest.to_parquet(manifest_tmp, engine="pyarrow", index=False)
    os.replace(manifest_tmp, manifest_path)
    return manifest_path, report_path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest and check it has the expected columns."""
    frame = pd.read_parquet(path, engine="pyarrow")
    missing = set(MANIFEST_COLUMNS) - set(frame.columns)
    if missing:
        raise DatasetError(f"{path} is not a visionpipe manifest (missing {sorted(missing)}). "
                           "Fix: run the prepare-dataset flow again.")
    return frame

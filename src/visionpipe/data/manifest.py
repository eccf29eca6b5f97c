"""The manifest: one row per image with its split, and the content hash that versions it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from visionpipe.data.errors import DatasetError
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
    records: Sequence[ImageRecord], seed: int, val_fraction: float, test_fraction: float
) -> pd.DataFrame:
    """Label records (classes sorted by name -> 0..K-1) and split each class by the seed."""
    by_class: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.relpath):
        by_class[record.class_name].append(record)
    rows: list[dict[str, Any]] = []
    for label, name in enumerate(sorted(by_class)):
        group = by_class[name]
        splits = split_class(len(group), _class_seed(seed, name), val_fraction, test_fraction)
        rows += [{"path": r.relpath, "source": r.source, "label": label, "class_name": name,
                  "split": split, "sha256": r.sha256, "width": r.width, "height": r.height}
                 for r, split in zip(group, splits, strict=True)]
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("path", ignore_index=True)
    return frame.astype({"label": "int64", "width": "int64", "height": "int64"})


def split_class(n: int, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Split names for ``n`` items of one class, at least one per split; stratified by design."""
    n_test = max(1, math.floor(n * test_fraction + 0.5))
    n_val = max(1, math.floor(n * val_fraction + 0.5))
    if n - n_test - n_val < 1:
        raise DatasetError(f"a class with {n} images cannot fill train, val and test; "
                           "Fix: raise data.min_per_class to 3 or more.")
    names = np.array(["train"] * n, dtype=object)
    order = np.random.default_rng(seed).permutation(n)
    names[order[:n_test]] = "test"
    names[order[n_test:n_test + n_val]] = "val"
    return [str(name) for name in names]


def _class_seed(seed: int, class_name: str) -> int:
    """A per-class seed, so one class's split does not depend on which other classes exist."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{class_name}".encode()).digest()[:8], "big")


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

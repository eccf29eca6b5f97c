"""The prepare-dataset stage: source -> validated images -> versioned, split manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel

from visionpipe.config import DataConfig
from visionpipe.errors import DatasetError
from visionpipe.data.manifest import SPLITS, build_manifest, dataset_version, write_manifest
from visionpipe.data.prepared import ensure_prepared_copy
from visionpipe.data.sources import listing_fingerprint, materialize_source, official_test_split
from visionpipe.data.transforms import choose_recipe
from visionpipe.data.validate import ValidationReport, validate_images
from visionpipe.settings import cache_dir

log = logging.getLogger(__name__)

# Part of every source fingerprint: bump it when preparation changes what it produces.
PREPARE_VERSION = "4"  # 2: splits by a per-image key; 3: max_per_class keeps files by a key too;
# 4: recipes (the photo recipe may write a prepared copy)


class PreparedDataset(BaseModel):
    """A prepared dataset, small enough to pass between tasks and to a DDP worker as JSON."""

    name: str
    version: str
    root: str  # the ImageFolder root that manifest paths are relative to
    manifest_path: str
    report_path: str
    class_names: list[str]
    num_classes: int
    split_counts: dict[str, int]
    image_size: int
    # The recipe chosen for this data (data.recipe, 'auto' resolved from the image sizes);
    # the defaults are what every dataset prepared before recipes existed was.
    recipe: Literal["small", "photo"] = "small"
    resize_size: int | None = None  # photo: the evaluation short side before the center crop
    prepared_short_side: int | None = None  # photo: the training split's prepared copy, if any

    @property
    def eval_sizes(self) -> tuple[str, int, int | None]:
        """(recipe, image_size, resize_size): the arguments of ``images.preprocess_image``."""
        return self.recipe, self.image_size, self.resize_size

    def is_available(self) -> bool:
        """Whether the manifest and the image root still exist (a cached result may be stale)."""
        return Path(self.manifest_path).is_file() and Path(self.root).is_dir()


def prepare_dataset(cfg: DataConfig) -> PreparedDataset:
    """Materialize, validate, split and version the dataset that ``cfg`` describes."""
    name = safe_name(cfg.dataset_name)
    materialized = materialize_source(cfg.source, cfg.max_per_class, cfg.seed)
    records, validation = validate_images(materialized, cfg.min_per_class)
    recipe = choose_recipe(cfg.recipe, cfg.image_size, [r.width for r in records],
                           [r.height for r in records])
    manifest = build_manifest(records, cfg.seed, cfg.val_fraction, cfg.test_fraction,
                              official_test=official_test_split(cfg.source))
    version = dataset_version(manifest)
    split_counts = {split: int((manifest["split"] == split).sum()) for split in SPLITS}
    report = _report(cfg, name, version, str(materialized.root), validation, manifest)
    report["recipe"] = recipe
    folder = cache_dir("datasets") / name / version
    manifest_path, report_path = write_manifest(manifest, report, folder)
    class_names = sorted(validation.per_class)
    log.info("dataset %s@%s: %d classes, splits %s, %d files excluded, recipe %s", name, version,
             len(class_names), split_counts, len(validation.excluded), recipe)
    short_side = _prepared_copy(cfg, recipe, manifest, folder, materialized.root)
    return PreparedDataset(
        name=name, version=version, root=str(materialized.root),
        manifest_path=str(manifest_path), report_path=str(report_path),
        class_names=class_names, num_classes=len(class_names),
        split_counts=split_counts, image_size=cfg.image_size, recipe=recipe,
        resize_size=cfg.eval_resize_size if recipe == "photo" else None,
        prepared_short_side=short_side,
    )


def wants_prepared_copy(cfg: DataConfig, recipe: str, widths: pd.Series, heights: pd.Series) -> bool:
    """Whether the training images get a resized copy: asked for, or (empty) when the photo
    recipe's originals hold at least twice the pixels of the copy (median short side)."""
    if recipe != "photo" or cfg.prepared_copy is False or widths.empty:
        return False
    side = cfg.prepared_short_side or cfg.eval_resize_size
    median_short = float(pd.concat([widths, heights], axis=1).min(axis=1).median())
    return bool(cfg.prepared_copy) or median_short ** 2 >= 2 * side ** 2


def _prepared_copy(cfg: DataConfig, recipe: str, manifest: pd.DataFrame, folder: Path,
                   root: Path) -> int | None:
    """Write (or verify) the training split's prepared copy; its short side, or None."""
    train = manifest[manifest["split"] == "train"].sort_values("path", ignore_index=True)
    if not wants_prepared_copy(cfg, recipe, train["width"], train["height"]):
        return None
    side = cfg.prepared_short_side or cfg.eval_resize_size
    ensure_prepared_copy(folder, Path(root), train, "train", side)
    return side


def source_fingerprint(cfg: DataConfig) -> str:
    """A cheap fingerprint of the source and the config, without reading any image.

    Used as the cache key of the prepare task: it changes when files are added, removed or
    modified (sizes, mtimes, ETags), when the config changes, or when the state folder moves.
    """
    payload = {
        "prepare": PREPARE_VERSION,
        "source": listing_fingerprint(cfg.source),
        "config": cfg.model_dump(mode="json"),
        "cache": str(cache_dir("datasets")),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def safe_name(name: str) -> str:
    """A dataset name usable as one folder name: [A-Za-z0-9._-], no leading dot or underscore."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip("._-")
    if not cleaned:
        raise DatasetError(f"dataset name {name!r} has no usable characters. Fix: set data.name.")
    return cleaned


def _report(cfg: DataConfig, name: str, version: str, root: str,
            validation: ValidationReport, manifest: pd.DataFrame) -> dict[str, Any]:
    """The report.json content: validation results, split sizes per class, provenance."""
    per_split = manifest.groupby(["split", "class_name"]).size()
    return {
        "name": name,
        "version": version,
        "source": cfg.source,
        "root": root,
        "config": cfg.model_dump(mode="json"),
        "validation": validation.to_dict(),
        "split_counts_per_class": {
            split: {cls: int(n) for cls, n in per_split[split].items()}
            for split in SPLITS if split in per_split.index.get_level_values(0)
        },
    }

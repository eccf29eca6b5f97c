"""Validation of ImageFolder sources: bad files are reported and excluded, bad datasets refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpipe.config import DataConfig
from visionpipe.data import DatasetError, prepare_dataset
from visionpipe.data.sources import Materialized, list_image_folder
from visionpipe.data.validate import validate_images


def _png(seed: int, size: tuple[int, int] = (10, 12)) -> bytes:
    """A distinct small RGB PNG for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _folder(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    """An ImageFolder with ``counts[class]`` distinct PNGs per class."""
    seed = start
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{i:03d}.png").write_bytes(_png(seed))
            seed += 1
    return root


@pytest.fixture()
def dirty_folder(tmp_path: Path) -> Path:
    """Two good classes plus every kind of bad file."""
    root = _folder(tmp_path / "dirty", {"cat": 6, "dog": 6})
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "cat" / "truncated.png").write_bytes(_png(100, (64, 64))[:300])
    (root / "dog" / "truncated.jpg").write_bytes(_jpeg(101)[:400])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image\n")
    (root / "dog" / "copy.png").write_bytes((root / "dog" / "000.png").read_bytes())
    (root / "cat" / "stolen.png").write_bytes((root / "dog" / "001.png").read_bytes())
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: never a candidate
    (root / "stray.png").write_bytes(_png(102))  # not in a class folder: ignored
    return root


def test_bad_files_are_reported_and_excluded(dirty_folder: Path) -> None:
    files = list_image_folder(dirty_folder)
    records, report = validate_images(Materialized(dirty_folder, files), min_per_class=3)
    reasons = {item["path"]: item["reason"] for item in report.excluded}
    assert set(reasons) == {"cat/corrupt.png", "cat/truncated.png", "dog/truncated.jpg",
                            "dog/empty.png", "dog/notes.txt", "dog/copy.png",
                            "cat/stolen.png", "dog/001.png"}
    assert reasons["dog/empty.png"] == "empty file"
    assert reasons["dog/notes.txt"].startswith("not an image")
    assert reasons["cat/truncated.png"].startswith("corrupt or truncated")
    assert reasons["dog/truncated.jpg"].startswith("corrupt or truncated")
    assert reasons["dog/copy.png"] == "duplicate of dog/000.png"
    assert "classes ['cat', 'dog']" in reasons["cat/stolen.png"]
    kept = {r.relpath for r in records}
    assert kept.isdisjoint(reasons) and len(kept) == 11
    assert report.files_seen == 19 and report.images_valid == 11
    assert report.per_class == {"cat": 6, "dog": 5}
    assert report.balance_ratio == pytest.approx(5 / 6)
    assert all(r.width == 10 and r.height == 12 and len(r.sha256) == 64 for r in records)


def test_prepare_excludes_bad_files_from_the_manifest(dirty_folder: Path, vp_home: Path) -> None:
    prepared = prepare_dataset(DataConfig(source=str(dirty_folder), min_per_class=3))
    assert prepared.split_counts["train"] + prepared.split_counts["val"] + \
        prepared.split_counts["test"] == 11
    assert prepared.root == str(dirty_folder.resolve())  # a local folder is used in place
    assert not (vp_home / "datasets" / "_sources").exists()


def test_one_class_is_refused(tmp_path: Path, vp_home: Path) -> None:
    root = _folder(tmp_path / "one", {"only": 8})
    with pytest.raises(DatasetError, match=r"1 class\(es\) \['only'\].*at least 2"):
        prepare_dataset(DataConfig(source=str(root)))


def test_no_images_is_refused(tmp_path: Path, vp_home: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no files found.*<root>/<class>/<image>"):
        prepare_dataset(DataConfig(source=str(tmp_path / "empty")))


def test_only_corrupt_images_is_refused(tmp_path: Path, vp_home: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "bad" / name).mkdir(parents=True)
        (tmp_path / "bad" / name / "x.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="none of the 2 files .* is a readable image"):
        prepare_dataset(DataConfig(source=str(tmp_path / "bad")))


def test_class_below_minimum_is_named(tmp_path: Path, vp_home: Path) -> None:
    root = _folder(tmp_path / "small", {"big": 6, "tiny": 2, "wee": 1})
    with pytest.raises(DatasetError, match="'tiny' has 2, 'wee' has 1.*min_per_class is 5"):
        prepare_dataset(DataConfig(source=str(root)))


def test_unknown_source_is_refused(tmp_path: Path, vp_home: Path) -> None:
    with pytest.raises(DatasetError, match="not 'digits', 'cifar10', s3://"):
        prepare_dataset(DataConfig(source=str(tmp_path / "missing")))


def test_the_task_reports_the_files_validation_excluded(dirty_folder: Path, vp_home: Path) -> None:
    from tasks.data import dataset_report

    prepared = prepare_dataset(DataConfig(source=str(dirty_folder), min_per_class=3))
    excluded, markdown = dataset_report(prepared)
    assert len(excluded) == 8
    assert {"path": "dog/empty.png", "reason": "empty file"} in excluded
    assert "## Excluded files" in markdown
    assert "| cat/truncated.png | corrupt or truncated" in markdown
    assert "| dog/copy.png | duplicate of dog/000.png |" in markdown

"""The prepare-dataset stage end to end: manifests, splits, versions, fingerprints, loading."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from visionpipe.config import DataConfig
from visionpipe.data import (
    DatasetError,
    ManifestImageDataset,
    PreparedDataset,
    build_loader,
    load_split,
    prepare_dataset,
    read_manifest,
    source_fingerprint,
)
from visionpipe.data.manifest import MANIFEST_COLUMNS, build_manifest, dataset_version
from visionpipe.data.loading import decoded_split_path
from visionpipe.data.paths import confined_path
from visionpipe.data.prepare import safe_name
from visionpipe.data.sources import SourceFile, select_per_class
from visionpipe.data.validate import ImageRecord
from visionpipe.digests import load_with_digest, save_with_digest

TINY = DataConfig(source="digits", max_per_class=12, image_size=16)


def _folder(root: Path, counts: dict[str, int]) -> Path:
    """An ImageFolder with distinct PNGs of odd sizes."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (9 + i % 3, 11, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def _records(counts: dict[str, int]) -> list[ImageRecord]:
    return [ImageRecord(f"{c}/{i:04d}.png", f"/data/{c}/{i:04d}.png", c, f"{c}{i:062d}", 8, 8)
            for c, n in counts.items() for i in range(n)]


@pytest.fixture()
def tiny_digits(vp_home: Path) -> PreparedDataset:
    return prepare_dataset(TINY)


def test_digits_prepare_end_to_end(tiny_digits: PreparedDataset, vp_home: Path) -> None:
    p = tiny_digits
    assert (p.name, p.num_classes, p.image_size) == ("digits", 10, 16)
    assert p.class_names == [str(d) for d in range(10)]
    assert len(p.version) == 12 and set(p.version) <= set("0123456789abcdef")
    assert p.split_counts == {"train": 80, "val": 20, "test": 20}
    assert Path(p.manifest_path) == vp_home / "datasets" / "digits" / p.version / "manifest.parquet"
    manifest = read_manifest(p.manifest_path)
    assert dataset_version(manifest) == p.version  # the version is the written manifest's hash
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["label"].dtype == np.int64
    assert (manifest["label"].astype(str) == manifest["class_name"]).all()
    assert all(Path(p.root, path).is_file() for path in manifest["path"])
    assert manifest["source"].str.startswith(p.root).all()
    report = json.loads(Path(p.report_path).read_text())
    assert report["version"] == p.version
    assert report["validation"]["per_class"] == {str(d): 12 for d in range(10)}
    assert PreparedDataset.model_validate_json(p.model_dump_json()) == p


def test_version_is_stable_across_calls_and_cache_locations(
    tiny_digits: PreparedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = os.stat(tiny_digits.manifest_path).st_mtime_ns
    again = prepare_dataset(TINY)
    assert again == tiny_digits
    assert os.stat(again.manifest_path).st_mtime_ns == written  # not rewritten
    monkeypatch.setenv("VISIONPIPE_HOME", str(tmp_path / "elsewhere"))
    moved = prepare_dataset(TINY)
    assert moved.version == tiny_digits.version
    assert moved.root != tiny_digits.root
    assert prepare_dataset(TINY.model_copy(update={"seed": 1})).version != tiny_digits.version


def test_copies_of_a_folder_get_the_same_version(tmp_path: Path, vp_home: Path) -> None:
    first = _folder(tmp_path / "a" / "pets", {"cat": 6, "dog": 7})
    second = shutil.copytree(first, tmp_path / "b" / "pets")
    one = prepare_dataset(DataConfig(source=str(first)))
    two = prepare_dataset(DataConfig(source=str(second)))
    assert one.version == two.version and one.name == two.name == "pets"
    assert one.root != two.root
    Image.new("RGB", (5, 5), (1, 2, 3)).save(second / "dog" / "new.png")
    assert prepare_dataset(DataConfig(source=str(second))).version != one.version


def test_split_is_stratified_and_independent_of_listing_order() -> None:
    records = _records({"a": 20, "b": 9, "c": 3})
    manifest = build_manifest(records, seed=3, val_fraction=0.15, test_fraction=0.2)
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    pd.testing.assert_frame_equal(manifest, build_manifest(shuffled, 3, 0.15, 0.2))
    counts = manifest.groupby(["class_name", "split"]).size().unstack()
    assert counts.loc["a"].to_dict() == {"test": 4, "train": 13, "val": 3}
    assert counts.loc["c"].to_dict() == {"test": 1, "train": 1, "val": 1}  # every split, every class
    assert manifest["label"].tolist() == [0] * 20 + [1] * 9 + [2] * 3
    other = build_manifest(records, seed=4, val_fraction=0.15, test_fraction=0.2)
    assert not other["split"].equals(manifest["split"])
    assert dataset_version(other) != dataset_version(manifest)


def _moved(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Images in both manifests whose split differs, with their two splits."""
    both = before.merge(after, on=["path", "class_name"], suffixes=("_before", "_after"))
    return both[both["split_before"] != both["split_after"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adding_or_removing_one_image_keeps_every_other_image_in_its_split(seed: int) -> None:
    counts = {"a": 40, "b": 23, "c": 11, "d": 7}
    records = _records(counts)
    before = build_manifest(records, seed, 0.15, 0.2)
    added = records + [ImageRecord(f"{c}/new.png", f"/data/{c}/new.png", c, f"new-{c}", 8, 8)
                       for c in counts]
    removed = [r for r in records if not r.relpath.endswith("/0003.png")]
    for after in (build_manifest(versions, seed, 0.15, 0.2) for versions in (added, removed)):
        moved = _moved(before, after)
        # Only the images at the test/val and val/train boundaries can move: the split counts
        # change by one at most each, so at most 1 + 2 images per class; never train <-> test.
        assert (moved.groupby("class_name").size() <= 3).all()
        assert not (moved["split_before"].isin(["train", "test"])
                    & moved["split_after"].isin(["train", "test"])).any()
        assert len(moved) <= 6  # of 77 images the other 71+ keep their split
    # The counts stay those of round-half-up fractions, at least one per split.
    sizes = build_manifest(added, seed, 0.15, 0.2).groupby(["class_name", "split"]).size()
    assert sizes.unstack().loc["d"].to_dict() == {"test": 2, "train": 5, "val": 1}


def test_a_class_too_small_for_the_fractions_is_named_with_its_counts() -> None:
    records = _records({"big": 40, "small": 6})
    with pytest.raises(DatasetError) as raised:
        build_manifest(records, 0, val_fraction=0.45, test_fraction=0.45)
    message = str(raised.value)
    assert "class 'small' has 6 images" in message
    assert "data.val_fraction=0.45 gives 3 val" in message
    assert "data.test_fraction=0.45 gives 3 test" in message
    assert "leaving 0 for train" in message
    assert "lower data.val_fraction and/or data.test_fraction" in message
    assert "min_per_class to 3" not in message


def test_version_ignores_row_order_and_source_location() -> None:
    manifest = build_manifest(_records({"a": 5, "b": 5}), 0, 0.2, 0.2)
    moved = manifest.assign(source=manifest["source"].str.replace("/data", "/mnt/copy"))
    assert dataset_version(moved.iloc[::-1]) == dataset_version(manifest)
    relabelled = manifest.assign(width=manifest["width"] + 1)
    assert dataset_version(relabelled) != dataset_version(manifest)


def test_no_leakage_between_splits(tiny_digits: PreparedDataset) -> None:
    manifest = read_manifest(tiny_digits.manifest_path)
    assert manifest["path"].is_unique
    assert manifest["sha256"].is_unique  # duplicates are dropped before splitting
    by_split = manifest.groupby("split")["class_name"].nunique()
    assert by_split.to_dict() == {"test": 10, "train": 10, "val": 10}


def test_max_per_class_is_seeded_and_order_independent() -> None:
    files = [SourceFile(f"{c}/{i}.png", f"/x/{c}/{i}.png") for c in "ab" for i in range(30)]
    chosen = select_per_class(files, 5, seed=0)
    assert len(chosen) == 10 and {f.class_name for f in chosen} == {"a", "b"}
    assert select_per_class(reversed(files), 5, seed=0) == chosen
    assert select_per_class(files, 5, seed=1) != chosen
    assert select_per_class(files, None, seed=0) == sorted(files, key=lambda f: f.relpath)
    # One file more or less in the source changes at most one file of the selection.
    for changed in (files + [SourceFile("a/new.png", "/x/a/new.png")], files[1:]):
        again = select_per_class(changed, 5, seed=0)
        assert len(set(again) - set(chosen)) <= 1 and len(again) == 10


def test_fingerprint_tracks_listing_and_config(tmp_path: Path, vp_home: Path) -> None:
    root = _folder(tmp_path / "pets", {"cat": 3, "dog": 3})
    cfg = DataConfig(source=str(root))
    first = source_fingerprint(cfg)
    assert source_fingerprint(cfg) == first
    assert source_fingerprint(cfg.model_copy(update={"image_size": 64})) != first
    os.utime(root / "cat" / "000.png", ns=(1, 1))
    touched = source_fingerprint(cfg)
    assert touched != first
    Image.new("RGB", (4, 4)).save(root / "dog" / "new.png")
    assert source_fingerprint(cfg) not in (first, touched)
    digits = source_fingerprint(DataConfig())
    assert digits == source_fingerprint(DataConfig()) and len(digits) == 64


def test_load_split_and_lazy_dataset_agree(tiny_digits: PreparedDataset) -> None:
    images, labels = load_split(tiny_digits, "val")
    assert images.shape == (20, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    lazy = ManifestImageDataset.from_prepared(tiny_digits, "val")
    assert len(lazy) == 20
    image, label = lazy[3]
    assert torch.equal(image, images[3]) and label == labels[3].item()
    with pytest.raises(DatasetError, match="unknown split"):
        load_split(tiny_digits, "holdout")


def test_a_decoded_split_is_kept_and_read_instead_of_decoding_again(
        tiny_digits: PreparedDataset, tmp_path: Path) -> None:
    images, labels = load_split(tiny_digits, "train")
    cache = decoded_split_path(tiny_digits, "train")
    assert cache.is_file() and not list(cache.parent.glob(".*.tmp"))
    # With the image files gone, only the kept tensors can answer.
    shutil.move(tiny_digits.root, tmp_path / "moved")
    again, again_labels = load_split(tiny_digits, "train")
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    shutil.move(tmp_path / "moved", tiny_digits.root)
    # Another image size of the same version is another file.
    other = tiny_digits.model_copy(update={"image_size": 8})
    assert load_split(other, "train")[0].shape[-1] == 8 and decoded_split_path(other, "train") != cache


@pytest.mark.parametrize("damage", ["flipped byte", "other decoder", "other labels"])
def test_an_unusable_decoded_split_is_decoded_again_and_replaced(
        tiny_digits: PreparedDataset, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    images, labels = load_split(tiny_digits, "val")
    cache = decoded_split_path(tiny_digits, "val")
    if damage == "flipped byte":
        data = bytearray(cache.read_bytes())
        data[len(data) // 2] ^= 0xFF
        cache.write_bytes(bytes(data))
    else:
        kept = torch.load(cache, weights_only=True)
        if damage == "other decoder":
            kept["decoder"] = "torchvision 0.1, pillow 1.0"
        else:
            kept["labels"] = kept["labels"].flip(0)
        save_with_digest(kept, cache)
    again, again_labels = load_split(tiny_digits, "val")
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    assert "decoding again" in caplog.text
    assert torch.equal(load_with_digest(cache)["images"], images)  # replaced by a whole one


def test_an_image_changed_after_preparation_is_refused_and_not_kept(
        tiny_digits: PreparedDataset) -> None:
    from visionpipe.data.streaming import StreamingLoader

    rows = read_manifest(tiny_digits.manifest_path)
    changed = rows[rows["split"] == "val"].sort_values("path")["path"].iloc[0]
    target = Path(tiny_digits.root) / changed
    other = rows[rows["path"] != changed]["path"].iloc[0]
    target.write_bytes((Path(tiny_digits.root) / other).read_bytes())  # another valid image
    with pytest.raises(DatasetError, match=f"{changed} .* changed after its dataset version"):
        load_split(tiny_digits, "val")
    assert not decoded_split_path(tiny_digits, "val").exists(), "nothing kept under the version"
    with pytest.raises(DatasetError, match="changed after its dataset version"):
        ManifestImageDataset.from_prepared(tiny_digits, "val")[0]
    for on_device in (False, True):
        stream = StreamingLoader(tiny_digits, "val", 4, shuffle=False, augment=False, seed=0,
                                 device=torch.device("cpu"), num_workers=0,
                                 decode_on_device=on_device)
        with pytest.raises(DatasetError, match="changed after its dataset version"):
            next(iter(stream))


def test_a_folder_that_cannot_keep_decoded_splits_only_costs_the_decoding(
        tiny_digits: PreparedDataset, caplog: pytest.LogCaptureFixture) -> None:
    decoded_split_path(tiny_digits, "test").parent.write_text("not a folder")
    images, _ = load_split(tiny_digits, "test")
    assert images.shape[0] == tiny_digits.split_counts["test"]
    assert "cannot keep the decoded split" in caplog.text


def test_loader_normalises_and_augments_reproducibly() -> None:
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(10)
    plain = list(build_loader(images, labels, 4, shuffle=False, augment=False, seed=0))
    assert [b[0].shape[0] for b in plain] == [4, 4, 2]
    assert plain[0][0].dtype == torch.float32
    assert torch.equal(plain[0][1], torch.arange(4))
    dropped = build_loader(images, labels, 4, shuffle=True, augment=False, seed=0, drop_last=True)
    assert len(dropped) == 2
    first = [b[0] for b in build_loader(images, labels, 4, True, True, seed=5)]
    second = [b[0] for b in build_loader(images, labels, 4, True, True, seed=5)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    whole = next(iter(build_loader(images, labels, 10, False, False, seed=5)))[0]
    cropped = next(iter(build_loader(images, labels, 10, False, True, seed=5, flip=False)))[0]
    assert cropped.shape == whole.shape and not torch.equal(cropped, whole)


def test_loader_accepts_a_distributed_sampler() -> None:
    images = torch.zeros((10, 3, 8, 8), dtype=torch.uint8)
    sampler = DistributedSampler(range(10), num_replicas=2, rank=1, shuffle=False)
    loader = build_loader(images, torch.arange(10), 2, shuffle=True, augment=False, seed=0,
                          sampler=sampler)
    assert torch.cat([b[1] for b in loader]).tolist() == [1, 3, 5, 7, 9]


def test_paths_outside_the_root_are_refused(tmp_path: Path) -> None:
    assert confined_path(tmp_path, "cat/1.png") == tmp_path / "cat" / "1.png"
    for bad in ("../secret.png", "cat/../../secret.png", "/etc/passwd", "", "."):
        with pytest.raises(DatasetError, match="refusing path"):
            confined_path(tmp_path, bad)
    rows = pd.DataFrame({"path": ["../outside.png"], "label": [0]})
    with pytest.raises(DatasetError, match="'..' would leave"):
        ManifestImageDataset(tmp_path, rows, 8)


def test_dataset_names_are_safe_folder_names() -> None:
    assert safe_name("my data/v2") == "my-data-v2"
    assert safe_name("../../etc") == "etc"
    with pytest.raises(DatasetError):
        safe_name("..")


def _cifar10_archive(train_per_class: int, test_per_class: int) -> tuple[bytes, dict[str, str]]:
    """A small CIFAR-10 in torchvision's own format (pickled batches in a tar.gz) and the md5
    of each file, as torchvision checks them."""
    import hashlib
    import io
    import pickle
    import tarfile

    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    for name, per_class in (("data_batch_1", train_per_class), ("test_batch", test_per_class)):
        labels = [c for c in range(10) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        files[name] = pickle.dumps({"data": data, "labels": labels})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    files["batches.meta"] = pickle.dumps({"label_names": names})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    md5 = {name: hashlib.md5(body).hexdigest() for name, body in files.items()}  # noqa: S324
    archive = buffer.getvalue()
    md5["archive"] = hashlib.md5(archive).hexdigest()  # noqa: S324 - torchvision's own check
    return archive, md5


def test_cifar10_is_downloaded_and_keeps_its_official_test_split(
        vp_home: Path, http_server: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's CIFAR-10 code path, against a local server holding a CIFAR-10 in its format
    (with the hashes of those files): the official test set is the test split."""
    from torchvision.datasets import CIFAR10

    archive, md5 = _cifar10_archive(train_per_class=10, test_per_class=3)
    url = http_server.serve("/cifar-10-python.tar.gz", archive)  # type: ignore[attr-defined]
    monkeypatch.setattr(CIFAR10, "url", url)
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5["archive"])
    monkeypatch.setattr(CIFAR10, "train_list", [["data_batch_1", md5["data_batch_1"]]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5["batches.meta"]})
    prepared = prepare_dataset(DataConfig(source="cifar10"))
    manifest = read_manifest(prepared.manifest_path)
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 30 and test["path"].str.contains("/test_").all()
    assert not manifest[manifest["split"] != "test"]["path"].str.contains("/test_").any()
    assert prepared.split_counts == {"train": 80, "val": 20, "test": 30}  # 10 train files a class
    assert prepared.class_names[0] == "airplane" and prepared.num_classes == 10
    fetched = http_server.hits["/cifar-10-python.tar.gz"]  # type: ignore[attr-defined]
    assert fetched >= 1  # torchvision's redirect probe may ask once more
    # Another seed moves images between train and val, never into or out of test; the files
    # written the first time are reused, nothing is downloaded again.
    other = read_manifest(prepare_dataset(DataConfig(source="cifar10", seed=7)).manifest_path)
    assert set(other[other["split"] == "test"]["path"]) == set(test["path"])
    assert http_server.hits["/cifar-10-python.tar.gz"] == fetched  # type: ignore[attr-defined]

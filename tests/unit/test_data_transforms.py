"""The photo recipe: its choice, zero train/serve skew, draft decoding, the prepared copy, batches."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as tvf

from visionpipe.config import DataConfig, FastPathConfig, FinetuneConfig, Phase, PhotoAugmentConfig
from visionpipe.errors import DatasetError
from visionpipe.data.images import decode_image, open_image, preprocess_image, short_side_size
from visionpipe.data.loading import load_split, split_rows
from visionpipe.data.photo import PhotoTrainLoader
from visionpipe.data.prepare import PreparedDataset, prepare_dataset
from visionpipe.data.prepared import copy_path, ensure_prepared_copy, verify_copy
from visionpipe.data.synthetic import CLASS_NAMES, make_photo_folder
from visionpipe.data.transforms import BatchMix, choose_recipe, training_is_deterministic
from visionpipe.models import ModelSpec, build_model, build_backbone
from visionpipe.serving import ImageClassifier
from visionpipe.training.finetune import finetune
from visionpipe.training.loop import train_one_epoch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PreparedDataset]:
    """A prepared photo folder: 500 x 375 JPEGs, one in four 1024 x 768, and the special files
    (made once for the module: tests that damage its prepared copy repair it)."""
    tmp = tmp_path_factory.mktemp("photos")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VISIONPIPE_HOME", str(tmp / "vphome"))
        make_photo_folder(tmp / "photos", classes=2, per_class=12, large_every=4, seed=2)
        yield prepare_dataset(DataConfig(source=str(tmp / "photos"), image_size=64))


def test_auto_recipe_is_photo_from_twice_image_size_and_small_below() -> None:
    widths, heights = [500, 375, 500], [375, 500, 375]  # short sides 375
    assert choose_recipe("auto", 187, widths, heights) == "photo"
    assert choose_recipe("auto", 188, widths, heights) == "small"  # 375 < 2 x 188
    assert choose_recipe("auto", 32, [8] * 3, [8] * 3) == "small"  # digits
    assert choose_recipe("small", 32, widths, heights) == "small"  # asked for: kept


def test_prepared_dataset_records_the_chosen_recipe(photos: PreparedDataset) -> None:
    assert (photos.recipe, photos.resize_size) == ("photo", round(64 / 0.875))
    assert json.loads(Path(photos.report_path).read_text())["recipe"] == "photo"
    old = PreparedDataset.model_validate_json(  # a dataset prepared before recipes existed
        photos.model_copy().model_dump_json(exclude={"recipe", "resize_size", "prepared_short_side"}))
    assert (old.recipe, old.resize_size, old.prepared_short_side) == ("small", None, None)


def test_photo_recipe_on_images_all_smaller_than_image_size_says_so(tmp_path: Path,
                                                                    vp_home: Path) -> None:
    make_photo_folder(tmp_path / "tiny", classes=2, per_class=6, sizes=((48, 40),), seed=1)
    with pytest.raises(DatasetError, match=r"all 12 images are smaller than image_size 64.*Fix"):
        prepare_dataset(DataConfig(source=str(tmp_path / "tiny"), image_size=64, recipe="photo"))


def _classifier(prepared: PreparedDataset, tmp_path: Path) -> ImageClassifier:
    """The registered pyfunc, loaded from the files its model directory holds."""
    spec = ModelSpec(arch="resnet18", num_classes=prepared.num_classes,
                     class_names=prepared.class_names, image_size=prepared.image_size,
                     recipe=prepared.recipe, resize_size=prepared.resize_size)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    torch.save(build_model(spec).state_dict(), tmp_path / "state_dict.pt")
    model = ImageClassifier()
    model.load_context(SimpleNamespace(artifacts={"spec": str(tmp_path / "spec.json"),
                                                  "state_dict": str(tmp_path / "state_dict.pt")}))
    return model


def test_served_preprocessing_is_the_evaluation_transform_bit_for_bit(
        photos: PreparedDataset, tmp_path: Path) -> None:
    model = _classifier(photos, tmp_path)
    kinds = set()
    for split in ("train", "val", "test"):
        images, _ = load_split(photos, split)  # what evaluation scores
        for row, evaluated in zip(split_rows(photos, split).itertuples(), images, strict=True):
            raw = (Path(photos.root) / row.path).read_bytes()
            assert torch.equal(model.preprocess(raw), evaluated), row.path
            with Image.open(io.BytesIO(raw)) as img:
                kinds.add(f"{img.format}-{img.mode}-{img.getexif().get(0x0112, 1)}")
    assert {"PNG-RGBA-1", "JPEG-RGB-1", "JPEG-L-1", "JPEG-CMYK-1", "JPEG-RGB-6"} <= kinds


def test_exif_rotated_photo_is_evaluated_upright(photos: PreparedDataset) -> None:
    rotated = Path(photos.root) / CLASS_NAMES[0] / f"{CLASS_NAMES[0]}_0003.jpg"  # orientation 6
    upright = open_image(rotated.read_bytes())
    assert upright.size == Image.open(rotated).size[::-1]  # turned back: the sides swap
    evaluated = preprocess_image(rotated.read_bytes(), *photos.eval_sizes).float()
    as_stored, turned = io.BytesIO(), io.BytesIO()
    Image.open(rotated).convert("RGB").save(as_stored, "PNG")  # PNGs: no EXIF, no draft
    upright.save(turned, "PNG")
    upright_error = (evaluated - preprocess_image(turned.getvalue(), *photos.eval_sizes)).abs()
    stored_error = (evaluated - preprocess_image(as_stored.getvalue(), *photos.eval_sizes)).abs()
    assert upright_error.mean() < 2.0 < stored_error.mean()


def _full_decode_eval(data: bytes, resize: int, size: int) -> torch.Tensor:
    tensor = tvf.pil_to_tensor(open_image(data))  # no draft: every pixel decoded
    return tvf.center_crop(tvf.resize(tensor, [resize], antialias=True), [size, size])


@pytest.mark.parametrize("turn", [False, True])
def test_draft_decoding_gives_the_same_size_and_close_pixels(photos: PreparedDataset,
                                                             turn: bool) -> None:
    large = next(p for p in Path(photos.root).rglob("*.jpg") if Image.open(p).size == (1024, 768))
    data = large.read_bytes()
    if turn:  # stored portrait, EXIF says turn it back: the draft must size the upright sides
        with Image.open(large) as img:
            exif = Image.Exif()
            exif[0x0112] = 6
            buffer = io.BytesIO()
            img.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif)
        data = buffer.getvalue()
    drafted = open_image(data, lambda w, h: short_side_size(300, w, h))
    assert drafted.size == (512, 384)  # half scale: the smallest at least 300 on the short side
    fast = preprocess_image(data, "photo", 224, 256)
    full = _full_decode_eval(data, 256, 224)
    assert fast.shape == full.shape == (3, 224, 224)
    assert (fast.float() - full.float()).abs().mean() < 2.0


def test_prepared_copy_is_written_once_verified_reused_and_rebuilt_when_damaged(
        photos: PreparedDataset) -> None:
    folder, rows = Path(photos.manifest_path).parent, split_rows(photos, "train")
    path = copy_path(folder, "train", photos.prepared_short_side or 0)
    assert photos.prepared_short_side == photos.resize_size and verify_copy(path, len(rows)) is None
    written = path.stat().st_mtime_ns
    again = prepare_dataset(DataConfig(source=photos.root, image_size=64))  # a later run
    loader = PhotoTrainLoader(again, 4, augment=PhotoAugmentConfig(), seed=0, device=CPU,
                              num_workers=0)
    assert loader.from_copy and path.stat().st_mtime_ns == written  # reused, not rewritten
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "sha256" in (verify_copy(path, len(rows)) or "")
    ensure_prepared_copy(folder, Path(photos.root), rows, "train", photos.prepared_short_side)
    assert verify_copy(path, len(rows)) is None and path.read_bytes() != bytes(data)
    stored = Image.open(io.BytesIO(loader.loader.dataset.images[0]))  # type: ignore[attr-defined]
    assert stored.format == "JPEG" and min(stored.size) == photos.resize_size


def _epoch(loader: PhotoTrainLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_photo_batches_differ_per_epoch_and_repeat_for_the_same_seed_and_epoch(
        photos: PreparedDataset) -> None:
    augment = PhotoAugmentConfig(trivial_augment=True, random_erasing=0.5)
    options = {"augment": augment, "seed": 3, "device": CPU, "drop_last": True}
    in_process = PhotoTrainLoader(photos, 8, num_workers=0, **options)  # type: ignore[arg-type]
    first, second = _epoch(in_process, 1), _epoch(in_process, 2)
    images, labels = first[0]
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and len(first) == photos.split_counts["train"] // 8
    assert not torch.equal(images, second[0][0])
    # A resumed run: new workers (two of them), the same epoch -> the same crops and order.
    resumed = PhotoTrainLoader(photos, 8, num_workers=2, **options)  # type: ignore[arg-type]
    for (x, y), (rx, ry) in zip(first, _epoch(resumed, 1), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_mixup_and_cutmix_give_soft_labels_that_train_one_epoch_accepts(
        photos: PreparedDataset) -> None:
    mix = BatchMix(PhotoAugmentConfig(mixup_alpha=0.2, cutmix_alpha=1.0), num_classes=2)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    mixed, soft = mix(images, labels, seed=5)
    assert soft.shape == (6, 2) and torch.allclose(soft.sum(1), torch.ones(6))
    assert torch.equal(mix(images, labels, seed=5)[0], mixed)  # seeded
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays what it is
    with torch.no_grad():
        expected = int((model(mixed).argmax(1) == soft.argmax(1)).sum())
    stats = train_one_epoch(model, [(mixed, soft)], optimizer, None, nn.CrossEntropyLoss(), CPU)
    assert (stats.count, stats.correct) == (6, expected)
    assert stats.loss_sum > 0


def test_frozen_features_are_cached_only_for_a_deterministic_training_transform() -> None:
    assert training_is_deterministic("small", augment=False)
    assert not training_is_deterministic("small", augment=True)
    assert not training_is_deterministic("photo", augment=False)  # random crops every epoch


def test_a_photo_fine_tune_trains_on_mixed_crops_and_records_the_recipe(
        photos: PreparedDataset, tmp_path: Path) -> None:
    torch.manual_seed(1)
    torch.save(build_backbone("resnet18", 1000).state_dict(), tmp_path / "w.pth")
    cfg = FinetuneConfig(
        arch="resnet18", batch_size=8, fast=FastPathConfig(num_workers=0),
        photo=PhotoAugmentConfig(mixup_alpha=0.2, cutmix_alpha=1.0),
        phases=[Phase(name="head", trainable=["fc"], epochs=1, lr=0.01),
                Phase(name="full", trainable=["*"], epochs=1, lr=0.01)])
    result = finetune(cfg, photos, tmp_path / "w.pth", tmp_path / "out")
    assert result.epochs_run == 2
    assert (result.spec.recipe, result.spec.resize_size) == ("photo", photos.resize_size)
    assert all(0 <= r["train_top1"] <= 1 and r["train_loss"] > 0 for r in result.history)


def test_the_fast_jpeg_decoder_gives_pillows_pixels(photos: PreparedDataset) -> None:
    plain = [p for p in sorted(Path(photos.root).rglob("*.jpg"))
             if Image.open(p).mode == "RGB" and 0x0112 not in Image.open(p).getexif()][:4]
    assert plain
    for path in plain:  # decode_jpeg's path (no draft asked), against Pillow's
        data = path.read_bytes()
        assert torch.equal(decode_image(data), tvf.pil_to_tensor(open_image(data))), path


def test_the_googlenet_worker_trains_on_photo_crops(photos: PreparedDataset, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from visionpipe.config import GoogLeNetConfig
    from visionpipe.training.checkpoint import load_checkpoint
    from visionpipe.training.worker import WorkerJob, main

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = GoogLeNetConfig(epochs=1, batch_size=8, fast=FastPathConfig(num_workers=0),
                          photo=PhotoAugmentConfig(cutmix_alpha=1.0))
    job = WorkerJob(config=cfg, dataset=photos, out_dir=str(tmp_path),
                    result_path=str(tmp_path / "result.json"))
    (tmp_path / "job.json").write_text(job.model_dump_json())
    assert main([str(tmp_path / "job.json")]) == 0
    spec = ModelSpec.model_validate_json(load_checkpoint(tmp_path / "last.pt")["spec"])
    assert (spec.recipe, spec.resize_size) == ("photo", photos.resize_size)

"""The streaming path for large datasets gives the batches, and so the weights, of the in-memory one."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from torch.utils.data import DataLoader

from visionpipe.config import DataConfig, FastPathConfig, FinetuneConfig, GoogLeNetConfig, Phase
from visionpipe.data import PreparedDataset, build_loader, load_split, prepare_dataset
from visionpipe.data.streaming import (
    EncodedImageDataset,
    StreamingLoader,
    collate_encoded,
    decode_batch,
    decoded_bytes,
    device_decodable,
)
from visionpipe.models import build_backbone
from visionpipe.training.checkpoint import load_checkpoint
from visionpipe.training.fastpath import resolve_fast_path, wants_streaming

CPU = torch.device("cpu")


@pytest.fixture()
def tiny_digits(vp_home: Path) -> PreparedDataset:
    return prepare_dataset(DataConfig(max_per_class=12))


def _same(batches: list[tuple[torch.Tensor, torch.Tensor]],
          expected: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(batches) == len(expected) and all(
        torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(batches, expected, strict=True))


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_streamed_batches_equal_the_in_memory_ones_epoch_after_epoch(
        tiny_digits: PreparedDataset, decode_on_device: bool) -> None:
    images, labels = load_split(tiny_digits, "train")
    stream = StreamingLoader(tiny_digits, "train", 16, shuffle=True, augment=True, seed=0,
                             device=CPU, num_workers=2, decode_on_device=decode_on_device)
    assert stream.loader.persistent_workers
    workers = None
    for epoch in (3, 4):  # the in-memory path is rebuilt with seed + epoch every epoch
        stream.set_epoch(epoch)
        got = list(stream)
        assert _same(got, list(build_loader(images, labels, 16, shuffle=True, augment=True, seed=epoch)))
        pids = [w.pid for w in stream.loader._iterator._workers]  # type: ignore[union-attr]
        assert workers is None or pids == workers, "the workers were started again"
        workers = pids


def test_streaming_starts_above_the_memory_limit(tiny_digits: PreparedDataset) -> None:
    size = decoded_bytes(tiny_digits, "train")
    assert size == tiny_digits.split_counts["train"] * 3 * tiny_digits.image_size ** 2
    assert not wants_streaming(FastPathConfig(), size)
    assert wants_streaming(FastPathConfig(memory_limit_gb=size / 2**30 / 2), size)
    assert wants_streaming(FastPathConfig(streaming=True), 1)


def test_a_streamed_finetune_ends_with_the_weights_of_the_in_memory_one(
        tiny_digits: PreparedDataset, tmp_path: Path) -> None:
    from visionpipe.training.finetune import finetune

    torch.manual_seed(1)
    weights = tmp_path / "w.pth"
    torch.save(build_backbone("resnet18", 1000).state_dict(), weights)
    states = []
    for streaming in (False, True):
        cfg = FinetuneConfig(arch="resnet18", batch_size=16, augment=False,
                             fast=FastPathConfig(streaming=streaming, num_workers=1),
                             phases=[Phase(name="head", trainable=["fc"], epochs=1, lr=0.05),
                                     Phase(name="full", trainable=["*"], epochs=1, lr=0.02)])
        result = finetune(cfg, tiny_digits, weights, tmp_path / f"out-{streaming}")
        states.append(load_checkpoint(Path(result.last_checkpoint))["model"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_a_streamed_googlenet_ends_with_the_weights_of_the_in_memory_one(
        tiny_digits: PreparedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionpipe.training.jobs import WorkerJob
    from visionpipe.training.worker import main

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    states = []
    for streaming in (False, True):
        out = tmp_path / f"out-{streaming}"
        cfg = GoogLeNetConfig(epochs=1, batch_size=16, augment=True,
                              fast=FastPathConfig(streaming=streaming, num_workers=1))
        job = WorkerJob(config=cfg, dataset=tiny_digits, out_dir=str(out),
                        result_path=str(out / "result.json"))
        out.mkdir()
        (out / "job.json").write_text(job.model_dump_json())
        assert main([str(out / "job.json")]) == 0
        states.append(load_checkpoint(out / "last.pt")["model"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_each_rank_streams_the_shard_and_crops_it_would_slice_from_memory(
        tiny_digits: PreparedDataset) -> None:
    from visionpipe.training.distributed import DistContext
    from visionpipe.training.core import load_training_data
    from visionpipe.training.worker import rank_batches

    seen: list[torch.Tensor] = []
    for rank in (0, 1):
        ctx = DistContext(rank, 0, 2, CPU, rank == 0)  # a world of 2; no process group needed
        per_path = []
        for streaming in (False, True):
            cfg = GoogLeNetConfig(batch_size=8, augment=True,
                                  fast=FastPathConfig(streaming=streaming, num_workers=0))
            data = load_training_data(tiny_digits, cfg.fast, CPU, resolve_fast_path(cfg.fast, "cpu"))
            epoch_batches, _ = rank_batches(data, cfg, ctx)
            per_path.append(list(epoch_batches(2)))
        assert _same(per_path[1], per_path[0])
        seen.append(torch.cat([y for _, y in per_path[0]]))
    # The two shards together are the split, each image once.
    assert sum(len(s) for s in seen) == tiny_digits.split_counts["train"]


def test_each_rank_validates_its_own_share_streamed_or_from_memory(
        tiny_digits: PreparedDataset) -> None:
    from visionpipe.training.distributed import DistContext
    from visionpipe.training.core import load_training_data
    from visionpipe.training.worker import rank_batches

    count = tiny_digits.split_counts["val"]
    _, whole = load_split(tiny_digits, "val")
    for world in (2, count + 1):  # in the larger world the last rank's share is empty
        shares = []
        for rank in range(world) if world == 2 else (0, count):
            ctx = DistContext(rank, 0, world, CPU, rank == 0)
            per_path = []
            for streaming in (False, True):
                cfg = GoogLeNetConfig(batch_size=4, fast=FastPathConfig(streaming=streaming,
                                                                         num_workers=0))
                data = load_training_data(tiny_digits, cfg.fast, CPU, resolve_fast_path(cfg.fast, "cpu"))
                _, val = rank_batches(data, cfg, ctx)
                per_path.append(list(val))
            assert _same(per_path[1], per_path[0])
            labels = [y for _, y in per_path[0]]
            shares.append(torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64))
        if world == 2:  # image i on rank i % 2: the two shares are the split, each image once
            assert torch.equal(torch.stack([shares[0][:len(shares[1])], shares[1]], 1).reshape(-1),
                               whole[:2 * len(shares[1])])
            assert len(shares[0]) + len(shares[1]) == count
        else:
            assert torch.equal(shares[0], whole[:1]) and len(shares[1]) == 0


def _mixed_folder(root: Path) -> Path:
    """An ImageFolder of every kind of file the device's JPEG decoder gets wrong, and plain JPEGs.

    Odd sizes, so every image is resized; random pixels, so no two files are duplicates.
    """
    rng = np.random.default_rng(0)

    def pixels(height: int, width: int, channels: int = 3) -> np.ndarray:
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)

    for label in ("cat", "dog"):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(2):
            rgba = pixels(20 + i, 13, 4)
            rgba[..., 3] = rng.integers(0, 256, rgba.shape[:2])  # partial transparency
            Image.fromarray(rgba, "RGBA").save(folder / f"rgba{i}.png")
            deep = rng.integers(0, 65536, (17, 23 + i), dtype=np.uint16)
            Image.fromarray(deep).save(folder / f"gray16_{i}.png")  # 16-bit grayscale
            palette = Image.fromarray(pixels(15, 19 + i)).convert("P",
                                                                  palette=Image.Palette.ADAPTIVE)
            palette.save(folder / f"palette{i}.png", transparency=0)
            Image.fromarray(pixels(18, 22 + i)).save(folder / f"photo{i}.jpg", quality=90)
            Image.fromarray(pixels(21 + i, 14)).save(folder / f"progressive{i}.jpg",
                                                     progressive=True)
        Image.fromarray(pixels(19, 17, 1)[..., 0]).save(folder / "gray.jpg")
        Image.fromarray(pixels(16, 24, 4), "CMYK").save(folder / "cmyk.jpg")
        turned = Image.Exif()
        turned[ExifTags.Base.Orientation] = 6
        Image.fromarray(pixels(12, 30)).save(folder / "turned.jpg", exif=turned)
        Image.fromarray(pixels(13, 11)).save(folder / "png_named.jpg", format="PNG")
    return root


@pytest.fixture()
def mixed_formats(vp_home: Path, tmp_path: Path) -> PreparedDataset:
    source = _mixed_folder(tmp_path / "mixed")
    return prepare_dataset(DataConfig(source=str(source), image_size=16, min_per_class=3,
                                      val_fraction=0.2, test_fraction=0.2))


def test_decoding_on_device_gives_every_format_the_in_memory_path_pixels(
        mixed_formats: PreparedDataset) -> None:
    """RGBA and palette transparency composited, 16 bits rescaled, CMYK, gray and EXIF-turned
    JPEGs as ``images.open_image`` makes them: exactly the in-memory batches, every split."""
    for split, augment in (("train", True), ("val", False), ("test", False)):
        images, labels = load_split(mixed_formats, split)
        stream = StreamingLoader(mixed_formats, split, 5, shuffle=augment, augment=augment,
                                 seed=0, device=CPU, num_workers=1, decode_on_device=True)
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            expected = list(build_loader(images, labels, 5, shuffle=augment, augment=augment,
                                         seed=epoch))
            assert _same(list(stream), expected), (split, epoch)


def test_only_upright_8bit_colour_jpegs_go_to_the_device_decoder(
        mixed_formats: PreparedDataset) -> None:
    root = Path(mixed_formats.root)
    verdicts = {path.name: device_decodable(path.read_bytes())
                for path in sorted(root.rglob("*")) if path.is_file()}
    assert {name for name, ok in verdicts.items() if ok} == {
        "photo0.jpg", "photo1.jpg", "progressive0.jpg", "progressive1.jpg"}
    upright = Image.Exif()
    upright[ExifTags.Base.Orientation] = 1
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 99, 199)).save(buffer, format="JPEG", exif=upright)
    assert device_decodable(buffer.getvalue())
    assert not device_decodable(b"\xff\xd8\xff")  # a truncated header


def test_device_decoded_jpegs_take_their_places_among_the_worker_decoded_images(
        mixed_formats: PreparedDataset) -> None:
    """The batch the GPU would get, decoded on the CPU: the JPEGs left encoded come back in
    their places, and every other image is the in-memory one, bit for bit."""
    images, _ = load_split(mixed_formats, "train")
    dataset = EncodedImageDataset(mixed_formats, "train", device_jpegs=True)
    collate = functools.partial(collate_encoded, image_size=mixed_formats.image_size)
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate))
    assert any(b.encoded for b in batches) and any(len(b.decoded) for b in batches)
    decoded = torch.cat([decode_batch(b, mixed_formats.image_size, CPU) for b in batches])
    is_encoded = torch.cat([b.is_encoded for b in batches])
    assert torch.equal(is_encoded, torch.tensor([p.endswith((
        "/photo0.jpg", "/photo1.jpg", "/progressive0.jpg", "/progressive1.jpg"))
        for p in dataset.paths]))
    assert torch.equal(decoded[~is_encoded], images[~is_encoded])
    difference = (decoded[is_encoded].int() - images[is_encoded].int()).abs()
    assert difference.float().mean() < 2  # another decoder's rounding, nothing more

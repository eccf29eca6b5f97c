"""Batches for datasets too large to hold in memory: decoded by DataLoader workers, or on the GPU.

The in-memory path (``loading.build_loader``) keeps a whole split as uint8 tensors. When a split
does not fit (``FastPathConfig.memory_limit_gb``), ``StreamingLoader`` reads it batch by batch:

- DataLoader worker processes decode and resize images to uint8 (``persistent_workers``: they
  live across epochs; ``pin_memory`` on CUDA, so the copy to the GPU is ``non_blocking``);
- or, with ``decode_on_device``, the workers pass the JPEGs the GPU decodes as the CPU does
  (8-bit YCbCr, sequential or progressive, not rotated by EXIF) on undecoded, and the main
  process decodes them on the training device (``torchvision.io.decode_jpeg`` on CUDA: the GPU's
  JPEG decoder takes the work off the CPU, which is the bottleneck at a few thousand images/s);
  every other file (PNG, grayscale or CMYK JPEG, ..., and every file on the CPU) is decoded by
  the workers with the in-memory path's own ``load_image`` functions;
- augmentation and normalisation run on the device, on uint8 batches (4x less to copy than
  float32), exactly as in the in-memory path.

With the same seed the worker-decoded stream gives exactly the batches of the in-memory path, and
so does ``decode_on_device`` on the CPU or for files other than JPEGs. The JPEGs decoded on the
GPU come in the same order and crops, but their pixels differ slightly (another JPEG decoder and
resize), so it is off unless asked for.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as tvf
from PIL import ExifTags, Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg

from visionpipe.data.images import open_image, to_uint8_tensor
from visionpipe.data.loading import (
    BatchTransform,
    ManifestImageDataset,
    manifest_columns,
    read_image_file,
    split_rows,
)
from visionpipe.data.prepare import PreparedDataset

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")


def decoded_bytes(dataset: PreparedDataset, split: str) -> int:
    """What a split takes in memory as uint8 ``3 x S x S`` images."""
    return dataset.split_counts.get(split, 0) * 3 * dataset.image_size ** 2


def default_workers() -> int:
    """Decoding workers per process: this host's cores shared by its ranks (torchrun's
    ``LOCAL_WORLD_SIZE``), at most 8, leaving one core for each training process."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, (os.cpu_count() or 1) // ranks - 1))


class EpochShuffle(Sampler[int]):
    """A seeded permutation, drawn anew for each epoch's seed: the in-memory path's order."""

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


# Frame markers of Huffman-coded DCT JPEGs (baseline, extended sequential, progressive): the
# kinds nvJPEG decodes. Lossless, hierarchical and arithmetic-coded ones go to the CPU.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length
_TURNED = frozenset(range(2, 9))  # the EXIF orientations ``ImageOps.exif_transpose`` applies


def device_decodable(data: bytes) -> bool:
    """Whether the GPU's JPEG decoder makes of ``data`` the image ``images.open_image`` does.

    Only an 8-bit, 3-channel YCbCr JPEG qualifies, and only upright: ``decode_jpeg`` on CUDA
    ignores the EXIF orientation that ``open_image`` applies, and grayscale, CMYK/YCCK or
    RGB-coded files, 12-bit or arithmetic-coded ones, are either refused by nvJPEG or converted
    otherwise than by Pillow. Anything else (PNG, TIFF, a file named .jpg that is not one...)
    is not a JPEG for the device.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    frame: bytes | None = None
    jfif = exif = False
    adobe_transform: int | None = None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False  # not a marker where one belongs: let Pillow make sense of it
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: the header is over
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segment = data[i + 4:i + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # DHT, JPG, DAC
            if frame is not None or marker not in _DEVICE_FRAMES:
                return False
            frame = segment
        elif marker == 0xE0 and segment.startswith(b"JFIF\0"):
            jfif = True
        elif marker == 0xE1 and segment.startswith(b"Exif\0\0"):
            exif = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        i += 2 + length
    if frame is None or len(frame) < 6 + 3 * 3 or frame[0] != 8 or frame[5] != 3:
        return False
    # libjpeg's rule for the colour space of 3 channels: JFIF is YCbCr; else an Adobe marker's
    # transform 0 is RGB; else channels named R, G, B are RGB.
    ids = (frame[6], frame[9], frame[12])
    if not jfif and (adobe_transform == 0 or (adobe_transform is None and ids == (82, 71, 66))):
        return False
    # EXIF, or XMP, may turn the image: read the orientation exactly as exif_transpose does.
    if exif or b"http://ns.adobe.com/xap/1.0/" in data[:i]:
        try:
            with Image.open(io.BytesIO(data)) as img:
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # noqa: BLE001 - whatever Pillow makes of it, it decides on the CPU
            return False
        if orientation in _TURNED:
            return False
    return True


class EncodedImageDataset(Dataset[tuple[bytes | torch.Tensor, int]]):
    """Each image as its encoded bytes, to be decoded later on the device, or decoded here.

    With ``device_jpegs`` the JPEGs ``device_decodable`` accepts stay encoded; every other file
    is decoded and resized exactly as the in-memory path does (``open_image``,
    ``to_uint8_tensor``), so only the device's JPEG decoder can give other pixels. Without it
    (decoding on the CPU) every file is decoded here. Plain ``bytes`` cross from the workers by
    pickling; the decoded images cross as one stacked tensor per batch (``collate_encoded``).
    """

    def __init__(self, prepared: PreparedDataset, split: str, device_jpegs: bool = True) -> None:
        rows = split_rows(prepared, split)
        self.root, self.paths, self.digests, self.labels = manifest_columns(
            Path(prepared.root), rows)
        self.image_size = prepared.image_size
        self.device_jpegs = device_jpegs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[bytes | torch.Tensor, int]:
        data = read_image_file(self.root, self.paths[index], self.digests[index])
        if self.device_jpegs and device_decodable(data):
            return data, self.labels[index]
        # ``loading.load_image``'s functions on the bytes already read.
        return to_uint8_tensor(open_image(data), self.image_size), self.labels[index]


class EncodedBatch(NamedTuple):
    """A batch from ``EncodedImageDataset``: the JPEGs left to the device and the decoded rest."""

    encoded: list[bytes]  # in batch order
    decoded: torch.Tensor  # K x 3 x S x S uint8, in batch order
    is_encoded: torch.Tensor  # N bools: the places of ``encoded`` in the batch
    labels: torch.Tensor  # N int64


def _stack_uint8(samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([image for image, _ in samples]),
            torch.as_tensor([label for _, label in samples], dtype=torch.int64))


def collate_encoded(samples: Sequence[tuple[bytes | torch.Tensor, int]], image_size: int
                    ) -> EncodedBatch:
    """Gather a batch of ``EncodedImageDataset`` samples into an ``EncodedBatch``."""
    is_encoded = [isinstance(image, bytes) for image, _ in samples]
    decoded = [image for image, _ in samples if isinstance(image, torch.Tensor)]
    return EncodedBatch(
        encoded=[image for image, _ in samples if isinstance(image, bytes)],
        decoded=(torch.stack(decoded) if decoded
                 else torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)),
        is_encoded=torch.as_tensor(is_encoded, dtype=torch.bool),
        labels=torch.as_tensor([label for _, label in samples], dtype=torch.int64))


def decode_batch(batch: EncodedBatch, image_size: int, device: torch.device) -> torch.Tensor:
    """The uint8 ``N x 3 x S x S`` images of a batch on ``device``: its JPEGs decoded and resized
    there, in their places among the images the workers decoded."""
    decoded = batch.decoded.to(device, non_blocking=True)
    if not batch.encoded:
        return decoded
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch.encoded]
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:  # a JPEG the device refuses after all: decode them as the CPU does
        log.warning("decoding %d JPEGs on the CPU: the device decoder failed (%s)",
                    len(encoded), exc)
        images = [to_uint8_tensor(open_image(data), image_size).to(device, non_blocking=True)
                  for data in batch.encoded]
    device_decoded = torch.stack([
        image if tuple(image.shape[-2:]) == (image_size, image_size)
        else tvf.resize(image, [image_size, image_size], antialias=True)
        for image in images])
    # Places found on the host: a boolean mask on the GPU would wait for it (``nonzero``).
    encoded_at = batch.is_encoded.nonzero().view(-1).to(device, non_blocking=True)
    decoded_at = (~batch.is_encoded).nonzero().view(-1).to(device, non_blocking=True)
    out = torch.empty((len(batch.is_encoded), 3, image_size, image_size), dtype=torch.uint8,
                      device=device)
    return out.index_copy_(0, encoded_at, device_decoded).index_copy_(0, decoded_at, decoded)


class StreamingLoader:
    """Batches of one split, read from disk every epoch; yields normalised float batches on
    ``device``. Create it once and call ``set_epoch`` before each epoch: the workers persist."""

    def __init__(self, prepared: PreparedDataset, split: str, batch_size: int, *, shuffle: bool,
                 augment: bool, seed: int, device: torch.device,
                 sampler: Iterable[int] | None = None, num_workers: int | None = None,
                 decode_on_device: bool = False, flip: bool = True, drop_last: bool = False) -> None:
        self.device, self.seed, self.image_size = device, seed, prepared.image_size
        self.decode_on_device = decode_on_device
        dataset: Dataset[tuple[torch.Tensor, int]] | EncodedImageDataset
        if decode_on_device:
            # Only the GPU decodes JPEGs (in batches); on the CPU the workers decode every file.
            encoded = EncodedImageDataset(prepared, split, device_jpegs=device.type == "cuda")
            if encoded.device_jpegs and not all(p.lower().endswith(JPEG_SUFFIXES)
                                                for p in encoded.paths):
                log.info("%s split has files other than JPEGs: the workers decode them", split)
            dataset = encoded
        else:
            dataset = ManifestImageDataset.from_prepared(prepared, split)
        # ``is None``: an empty share (a rank of a world larger than the split) stays empty.
        self.sampler: Iterable[int] = (EpochShuffle(len(dataset), seed, shuffle)  # type: ignore[arg-type]
                                       if sampler is None else sampler)
        workers = default_workers() if num_workers is None else num_workers
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=(functools.partial(collate_encoded, image_size=self.image_size)
                        if decode_on_device else _stack_uint8),
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            drop_last=drop_last)
        self.transform = BatchTransform(augment, seed, flip)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Seed the epoch's shuffle and crops with ``seed`` (default ``seed + epoch``), as the
        in-memory path seeds its loader; a given sampler (DistributedSampler) gets the epoch."""
        current = self.seed + epoch if seed is None else seed
        if isinstance(self.sampler, EpochShuffle):
            self.sampler.seed = current
        elif hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.transform.generator.manual_seed(current)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for loaded in self.loader:
            if self.decode_on_device:
                images = decode_batch(loaded, self.image_size, self.device)
                labels = loaded.labels
            else:
                images, labels = loaded
                images = images.to(self.device, non_blocking=True)
            yield self.transform.batch(images, labels.to(self.device, non_blocking=True))

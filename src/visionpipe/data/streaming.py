"""Batches for datasets too large to hold in memory: decoded by DataLoader workers, or on the GPU.

The in-memory path (``loading.build_loader``) keeps a whole split as uint8 tensors. When a split
does not fit (``FastPathConfig.memory_limit_gb``), ``StreamingLoader`` reads it batch by batch:

- DataLoader worker processes decode and resize images to uint8 (``persistent_workers``: they
  live across epochs; ``pin_memory`` on CUDA, so the copy to the GPU is ``non_blocking``);
- or, with ``decode_on_device``, the workers only read the encoded files and the main process
  decodes the batch on the training device (``torchvision.io.decode_jpeg`` on CUDA: the GPU's
  JPEG decoder takes the work off the CPU, which is the bottleneck at a few thousand images/s);
- augmentation and normalisation run on the device, on uint8 batches (4x less to copy than
  float32), exactly as in the in-memory path.

With the same seed the worker-decoded stream gives exactly the batches of the in-memory path.
Decoding on the device gives the same order and crops, but its pixels differ slightly (another
JPEG decoder and resize; an alpha channel is dropped, not composited on black), so it is off
unless asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as tvf
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from visionpipe.data.loading import BatchTransform, ManifestImageDataset, split_rows
from visionpipe.data.paths import confined_path
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


class EncodedImageDataset(Dataset[tuple[bytes, int]]):
    """The encoded bytes of each image, decoded later on the device.

    Plain ``bytes`` cross from the workers by pickling; thousands of tiny tensors per batch
    would each need a shared-memory file descriptor.
    """

    def __init__(self, prepared: PreparedDataset, split: str) -> None:
        rows = split_rows(prepared, split)
        self.root = Path(prepared.root)
        self.paths = [str(confined_path(self.root, p)) for p in rows["path"].astype(str)]
        self.labels: list[int] = rows["label"].astype(int).tolist()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        return Path(self.paths[index]).read_bytes(), self.labels[index]


def _stack_uint8(samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([image for image, _ in samples]),
            torch.as_tensor([label for _, label in samples], dtype=torch.int64))


def _keep_encoded(samples: Sequence[tuple[bytes, int]]) -> tuple[list[bytes], torch.Tensor]:
    return ([data for data, _ in samples],
            torch.as_tensor([label for _, label in samples], dtype=torch.int64))


def decode_batch(files: list[bytes], image_size: int, device: torch.device,
                 all_jpeg: bool) -> torch.Tensor:
    """Decode and resize a batch of encoded images to uint8 ``N x 3 x S x S`` on ``device``."""
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    if device.type == "cuda" and all_jpeg:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device,
                             apply_exif_orientation=True)
    else:
        images = [decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True).to(device)
                  for data in encoded]
    return torch.stack([
        image if tuple(image.shape[-2:]) == (image_size, image_size)
        else tvf.resize(image, [image_size, image_size], antialias=True)
        for image in images]).contiguous()


class StreamingLoader:
    """Batches of one split, read from disk every epoch; yields normalised float batches on
    ``device``. Create it once and call ``set_epoch`` before each epoch: the workers persist."""

    def __init__(self, prepared: PreparedDataset, split: str, batch_size: int, *, shuffle: bool,
                 augment: bool, seed: int, device: torch.device,
                 sampler: Iterable[int] | None = None, num_workers: int | None = None,
                 decode_on_device: bool = False, flip: bool = True, drop_last: bool = False) -> None:
        self.device, self.seed, self.image_size = device, seed, prepared.image_size
        self.decode_on_device = decode_on_device
        dataset: Dataset[tuple[torch.Tensor, int]] | Dataset[tuple[bytes, int]]
        if decode_on_device:
            dataset = EncodedImageDataset(prepared, split)
            self.all_jpeg = all(p.lower().endswith(JPEG_SUFFIXES) for p in dataset.paths)  # type: ignore[attr-defined]
            if device.type == "cuda" and not self.all_jpeg:
                log.warning("%s split has non-JPEG files: they are decoded on the CPU", split)
        else:
            dataset = ManifestImageDataset.from_prepared(prepared, split)
            self.all_jpeg = False
        # ``is None``: an empty share (a rank of a world larger than the split) stays empty.
        self.sampler: Iterable[int] = (EpochShuffle(len(dataset), seed, shuffle)  # type: ignore[arg-type]
                                       if sampler is None else sampler)
        workers = default_workers() if num_workers is None else num_workers
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_keep_encoded if decode_on_device else _stack_uint8,
            pin_memory=device.type == "cuda" and not decode_on_device,
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
        for images, labels in self.loader:
            if self.decode_on_device:
                batch = decode_batch(images, self.image_size, self.device, self.all_jpeg)
            else:
                batch = images.to(self.device, non_blocking=True)
            yield self.transform.batch(batch, labels.to(self.device, non_blocking=True))

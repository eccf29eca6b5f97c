"""Images of a prepared dataset as tensors and DataLoaders; normalisation happens per batch."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from visionpipe.data.errors import DatasetError
from visionpipe.data.images import normalize, open_image, to_uint8_tensor
from visionpipe.data.manifest import SPLITS, read_manifest
from visionpipe.data.paths import confined_path
from visionpipe.data.prepare import PreparedDataset

log = logging.getLogger(__name__)

CROP_PADDING = 4  # pixels, as in the classic CIFAR recipe


def split_rows(prepared: PreparedDataset, split: str) -> pd.DataFrame:
    """The manifest rows of one split, in manifest (path) order."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    manifest = read_manifest(prepared.manifest_path)
    return manifest[manifest["split"] == split].sort_values("path", ignore_index=True)


def load_image(root: Path, relpath: str, image_size: int) -> torch.Tensor:
    """One manifest image as a uint8 ``3 x S x S`` tensor."""
    return to_uint8_tensor(open_image(confined_path(root, relpath)), image_size)


def load_split(prepared: PreparedDataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory: uint8 images ``N x 3 x S x S`` and int64 labels ``N``."""
    rows = split_rows(prepared, split)
    root, size = Path(prepared.root), prepared.image_size
    # Decoding releases the GIL for most of its work, so threads speed it up.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda rel: load_image(root, rel, size), rows["path"]))
    stacked = torch.stack(images) if images else torch.empty((0, 3, size, size), dtype=torch.uint8)
    labels = torch.as_tensor(rows["label"].to_numpy(), dtype=torch.int64)
    return stacked, labels


class ManifestImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Lazily decoded images of one split, for datasets too large to hold in memory."""

    def __init__(self, root: str | Path, rows: pd.DataFrame, image_size: int) -> None:
        self.root = Path(root)
        self.paths: list[str] = rows["path"].astype(str).tolist()
        self.labels: list[int] = rows["label"].astype(int).tolist()
        self.image_size = image_size
        for relpath in self.paths:
            confined_path(self.root, relpath)  # refuse a tampered manifest before training starts

    @classmethod
    def from_prepared(cls, prepared: PreparedDataset, split: str) -> ManifestImageDataset:
        """The dataset of one split of a prepared dataset."""
        return cls(prepared.root, split_rows(prepared, split), prepared.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image(self.root, self.paths[index], self.image_size), self.labels[index]


class BatchTransform:
    """Collate ``(uint8 image, label)`` samples, augment the batch, normalise it to float."""

    def __init__(self, augment: bool, seed: int, flip: bool = True) -> None:
        self.augment = augment
        self.flip = flip
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, samples: Sequence[tuple[torch.Tensor, int | torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in samples])  # N x 3 x S x S, uint8
        labels = torch.as_tensor([int(label) for _, label in samples], dtype=torch.int64)
        if self.augment:
            images = random_crop(images, CROP_PADDING, self.generator)
            if self.flip:
                images = random_hflip(images, self.generator)
        return normalize(images), labels


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each image with black by ``padding`` and crop it back at a random offset."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)  # N x 3 x (S + 2p) x (S + 2p)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).tolist()
    crops = [padded[i, :, y:y + height, x:x + width] for i, (y, x) in enumerate(offsets)]
    return torch.stack(crops)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left to right."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def build_loader(
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    augment: bool,
    seed: int,
    sampler: Sampler[int] | None = None,
    drop_last: bool = False,
    *,
    flip: bool = True,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (normalised float images ``N x 3 x S x S``, int64 labels) from memory.

    ``augment`` turns on random crops and, unless ``flip`` is False, horizontal flips; flips
    turn some digits and letters into other symbols, so leave them off for those. A given
    ``sampler`` (e.g. DistributedSampler) replaces shuffling; call its ``set_epoch`` yourself.
    """
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
        raise ValueError(f"expected uint8 N x 3 x S x S images, got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    return DataLoader(
        TensorDataset(images_u8, labels),
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=BatchTransform(augment, seed, flip),
        generator=torch.Generator().manual_seed(seed),
        num_workers=0,  # the data is already in memory; workers would only copy it
    )

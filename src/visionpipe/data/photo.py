"""Training batches of the photo recipe: seeded crops decoded by DataLoader workers.

Workers read each image (from the dataset version's prepared copy when there is one, else the
original file, checked against its sha256), crop, flip and augment it as uint8, and the batch
crosses to the device as uint8 (pinned on CUDA), where it is normalised and, if asked, mixed
(MixUp / CutMix). The sampler hands each worker ``(index, seed)`` pairs: an image's crop depends
only on the epoch's seed and its index, so a resumed epoch draws the same crops.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from visionpipe.config import PhotoAugmentConfig
from visionpipe.data.images import normalize
from visionpipe.data.loading import manifest_columns, read_image_file, split_rows
from visionpipe.data.prepare import PreparedDataset
from visionpipe.data.prepared import PreparedImages, ensure_prepared_copy
from visionpipe.data.streaming import EpochShuffle, StreamingLoader, default_workers
from visionpipe.data.transforms import BatchMix, PhotoTrainTransform, sample_seed

log = logging.getLogger(__name__)


class PhotoTrainDataset(Dataset[tuple[torch.Tensor, int]]):
    """One split's images through ``PhotoTrainTransform``, indexed by ``(index, seed)``."""

    def __init__(self, prepared: PreparedDataset, split: str, transform: PhotoTrainTransform,
                 use_copy: bool = True) -> None:
        rows = split_rows(prepared, split)
        self.root, self.paths, self.digests, self.labels = manifest_columns(
            Path(prepared.root), rows)
        self.transform = transform
        self.images: PreparedImages | None = None
        if use_copy and prepared.prepared_short_side is not None and split == "train":
            folder = Path(prepared.manifest_path).parent
            path = ensure_prepared_copy(folder, self.root, rows, split, prepared.prepared_short_side)
            self.images = PreparedImages(path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        data = (self.images[index] if self.images is not None
                else read_image_file(self.root, self.paths[index], self.digests[index]))
        return self.transform(data, seed), self.labels[index]


class SeededIndices(Sampler[tuple[int, int]]):
    """The indices of ``order`` (a shuffle or a DistributedSampler), each with its crop seed."""

    def __init__(self, order: Iterable[int], seed: int) -> None:
        self.order, self.seed = order, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, sample_seed(self.seed, index)) for index in self.order)

    def __len__(self) -> int:
        return len(self.order)  # type: ignore[arg-type]


def _stack(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    # default_collate stacks a worker's batch straight into shared memory: a plain stack would
    # be copied there once more to cross to the main process (10 MB per batch at 224 px).
    images = default_collate([image for image, _ in samples])  # N x 3 x S x S, uint8
    return images, torch.as_tensor([label for _, label in samples], dtype=torch.int64)


class PhotoTrainLoader:
    """Normalised photo-recipe training batches on ``device``; the same interface as
    ``StreamingLoader``: create once (the workers persist), ``set_epoch`` before each epoch."""

    def __init__(self, prepared: PreparedDataset, batch_size: int, *, augment: PhotoAugmentConfig,
                 seed: int, device: torch.device, sampler: Iterable[int] | None = None,
                 num_workers: int | None = None, drop_last: bool = False, split: str = "train",
                 use_copy: bool = True) -> None:
        transform = PhotoTrainTransform(prepared.image_size, augment)
        dataset = PhotoTrainDataset(prepared, split, transform, use_copy)
        self.order: Iterable[int] = (EpochShuffle(len(dataset), seed, True) if sampler is None
                                     else sampler)
        self.indices = SeededIndices(self.order, seed)
        self.device, self.seed = device, seed
        self.mix = BatchMix(augment, prepared.num_classes)
        workers = default_workers() if num_workers is None else num_workers
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.indices, num_workers=workers,
            collate_fn=_stack, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, drop_last=drop_last)

    @property
    def from_copy(self) -> bool:
        """Whether the images come from the prepared copy (else from the original files)."""
        return self.loader.dataset.images is not None  # type: ignore[attr-defined]

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Seed the epoch's shuffle and crops with ``seed`` (default ``seed + epoch``); a given
        sampler (DistributedSampler) gets the epoch."""
        current = self.seed + epoch if seed is None else seed
        if isinstance(self.order, EpochShuffle):
            self.order.seed = current
        elif hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)
        self.indices.seed = current

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (images, labels) in enumerate(self.loader):
            images = normalize(images.to(self.device, non_blocking=True))
            labels = labels.to(self.device, non_blocking=True)
            if self.mix:
                images, labels = self.mix(images, labels, sample_seed(self.indices.seed, -1 - step))
            yield images, labels


def build_stream(prepared: PreparedDataset, split: str, batch_size: int, *, shuffle: bool,
                 augment: bool, seed: int, device: torch.device, photo: PhotoAugmentConfig,
                 sampler: Iterable[int] | None = None, num_workers: int | None = None,
                 decode_on_device: bool = False, flip: bool = True,
                 drop_last: bool = False) -> PhotoTrainLoader | StreamingLoader:
    """The streaming loader of a split for its recipe: the photo recipe's training split gets
    ``PhotoTrainLoader``; everything else ``StreamingLoader`` (whose images, for the photo
    recipe, are the evaluation transform's)."""
    if prepared.recipe == "photo" and shuffle:
        if decode_on_device:
            log.warning("decode_on_device: the photo recipe's training crops are decoded by the "
                        "workers (the device decodes only the small recipe's JPEGs)")
        return PhotoTrainLoader(prepared, batch_size, augment=photo, seed=seed, device=device,
                                sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                                split=split)
    return StreamingLoader(prepared, split, batch_size, shuffle=shuffle, augment=augment,
                           seed=seed, device=device, sampler=sampler, num_workers=num_workers,
                           decode_on_device=decode_on_device and prepared.recipe == "small",
                           flip=flip, drop_last=drop_last)

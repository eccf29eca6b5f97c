"""Images of a prepared dataset as tensors and batches; normalisation happens per batch."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import PIL
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import Dataset, Sampler

from visionpipe.errors import DatasetError
from visionpipe.data.images import normalize, preprocess_image
from visionpipe.data.manifest import SPLITS, read_manifest
from visionpipe.data.paths import confined_path
from visionpipe.data.prepare import PreparedDataset
from visionpipe.digests import DigestError, load_with_digest, save_with_digest

log = logging.getLogger(__name__)

CROP_PADDING = 4  # pixels, as in the classic CIFAR recipe
# Bump when decoding or resizing gives other pixels: decoded splits kept on disk then go stale.
DECODE_VERSION = 1


def split_rows(prepared: PreparedDataset, split: str) -> pd.DataFrame:
    """The manifest rows of one split, in manifest (path) order."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    manifest = read_manifest(prepared.manifest_path)
    return manifest[manifest["split"] == split].sort_values("path", ignore_index=True)


def read_image_file(root: Path, relpath: str, sha256: str | None = None) -> bytes:
    """The bytes of one manifest image, checked against the manifest's sha256 when given.

    A dataset version stands for its files' contents: a file changed in place after the
    dataset was prepared (an edit, a sync of a changed object into the same mirror) would
    train and evaluate on pixels the version does not name, and be kept as that version's.
    """
    data = confined_path(root, relpath).read_bytes()
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise DatasetError(
            f"{relpath} in {root} changed after its dataset version was prepared (sha256 "
            f"{actual[:12]}..., the manifest says {sha256[:12]}...). Fix: prepare the dataset "
            "again (prepare-dataset makes a new version of changed files), and do not change "
            "the files of a prepared version in place.")
    return data


def load_image(root: Path, relpath: str, image_size: int, sha256: str | None = None,
               recipe: str = "small", resize_size: int | None = None) -> torch.Tensor:
    """One manifest image as a uint8 ``3 x S x S`` tensor (its bytes checked if ``sha256``),
    preprocessed for evaluation as the recipe says (``images.preprocess_image``)."""
    return preprocess_image(read_image_file(root, relpath, sha256), recipe, image_size, resize_size)


def load_split(prepared: PreparedDataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory: uint8 images ``N x 3 x S x S`` and int64 labels ``N``.

    The first process to decode a split of a dataset version keeps the tensors beside its
    manifest (``decoded/``); every later one (the other DDP ranks, the other trainer, the
    evaluation, tomorrow's run) reads them instead of decoding every image again.
    """
    rows = split_rows(prepared, split)
    labels = torch.as_tensor(rows["label"].to_numpy(), dtype=torch.int64)
    cache = decoded_split_path(prepared, split)
    images = _read_decoded(cache, labels, prepared.image_size)
    if images is None:
        images = _decode(prepared, rows)
        _write_decoded(cache, images, labels)
    return images, labels


def decoded_split_path(prepared: PreparedDataset, split: str) -> Path:
    """Where the decoded tensors of one split are kept: keyed on the dataset version (a hash of
    every file's content), the recipe and its sizes, and the way images are decoded."""
    name = f"{split}-{prepared.image_size}px-v{DECODE_VERSION}.pt"
    if prepared.recipe == "photo":  # the small recipe's names stay what they were
        name = f"{split}-photo-{prepared.resize_size}to{prepared.image_size}px-v{DECODE_VERSION}.pt"
    return Path(prepared.manifest_path).parent / "decoded" / name


def _decode(prepared: PreparedDataset, rows: pd.DataFrame) -> torch.Tensor:
    root, (recipe, size, resize) = Path(prepared.root), prepared.eval_sizes
    # Decoding releases the GIL for most of its work, so threads speed it up.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda rel, digest: load_image(root, rel, size, digest, recipe, resize),
                               rows["path"], rows["sha256"]))
    return torch.stack(images) if images else torch.empty((0, 3, size, size), dtype=torch.uint8)


def _read_decoded(path: Path, labels: torch.Tensor, size: int) -> torch.Tensor | None:
    """The cached images if they are whole and match the manifest's rows, else None."""
    if not path.exists():
        return None
    try:
        cached = load_with_digest(path)
        images, cached_labels = cached["images"], cached["labels"]
        if cached["decoder"] != _decoder():
            raise DigestError(f"decoded by {cached['decoder']}, not {_decoder()}")
        if (images.dtype != torch.uint8 or tuple(images.shape) != (len(labels), 3, size, size)
                or not torch.equal(cached_labels, labels)):
            raise DigestError("its images do not match the manifest's rows")
    except (DigestError, OSError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        log.warning("decoding again: the decoded split %s is unusable (%s)", path, exc)
        return None
    return images


def _decoder() -> str:
    """What made the pixels: another version of these may resize a little differently."""
    return f"torchvision {torchvision.__version__}, pillow {PIL.__version__}"


def _write_decoded(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Keep the decoded split for the next reader; a folder that cannot be written only costs
    that reader the decoding."""
    try:
        # Several processes (DDP ranks) may decode the same split at once: each writes its own
        # temporary file, and each rename puts a whole one in place.
        save_with_digest({"images": images, "labels": labels, "decoder": _decoder()}, path,
                         private_tmp=True)
    except OSError as exc:
        log.warning("cannot keep the decoded split at %s (%s); it will be decoded again", path, exc)


def manifest_columns(root: Path, rows: pd.DataFrame) -> tuple[Path, list[str], list[str], list[int]]:
    """``root`` and the rows' paths, digests and labels, every path checked to stay in ``root``
    (a tampered manifest is refused before training starts)."""
    paths: list[str] = rows["path"].astype(str).tolist()
    for relpath in paths:
        confined_path(root, relpath)
    return (root, paths, rows["sha256"].astype(str).tolist(),
            rows["label"].astype(int).tolist())


class ManifestImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Lazily decoded images of one split, for datasets too large to hold in memory."""

    def __init__(self, root: str | Path, rows: pd.DataFrame, image_size: int,
                 recipe: str = "small", resize_size: int | None = None) -> None:
        self.root, self.paths, self.digests, self.labels = manifest_columns(Path(root), rows)
        self.image_size, self.recipe, self.resize_size = image_size, recipe, resize_size

    @classmethod
    def from_prepared(cls, prepared: PreparedDataset, split: str) -> ManifestImageDataset:
        """The dataset of one split of a prepared dataset."""
        recipe, size, resize = prepared.eval_sizes
        return cls(prepared.root, split_rows(prepared, split), size, recipe, resize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.root, self.paths[index], self.image_size, self.digests[index],
                           self.recipe, self.resize_size)
        return image, self.labels[index]


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
        return self.batch(images, labels)

    def batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment and normalise a uint8 batch on whatever device it is on."""
        if self.augment:
            images = random_crop(images, CROP_PADDING, self.generator)
            if self.flip:
                images = random_hflip(images, self.generator)
        return normalize(images), labels


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each image with black by ``padding`` and crop it back at a random offset."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (padding,) * 4)  # N x 3 x (S + 2p) x (S + 2p)
    offsets = torch.randint(0, 2 * padding + 1, (images.shape[0], 2), generator=generator)
    if images.device.type == "cpu":  # slices are the cheaper way here
        return crop_by_slices(padded, offsets, height, width)
    # On the GPU one gather does the batch: a slice per image would cost the host more than
    # the GPU's whole crop, and with small images the host is what limits a training step.
    return crop_by_gather(padded, offsets.to(images.device, non_blocking=True), height, width)


def crop_by_slices(padded: torch.Tensor, offsets: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``padded[i, :, y:y + height, x:x + width]`` for each image ``i`` at ``offsets[i] = (y, x)``."""
    return torch.stack([padded[i, :, y:y + height, x:x + width]
                        for i, (y, x) in enumerate(offsets.tolist())])


def crop_by_gather(padded: torch.Tensor, offsets: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The crops of ``crop_by_slices`` in one indexing operation, without reading ``offsets``."""
    n, channels = padded.shape[:2]
    device = padded.device
    rows = (offsets[:, 0, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(width, device=device))[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left to right."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    # non_blocking: a blocking copy to the GPU would wait for every step queued before it.
    flip = flip.view(-1, 1, 1, 1).to(images.device, non_blocking=True)
    return torch.where(flip, images.flip(-1), images)


class BatchIterator:
    """Batches sliced from in-memory uint8 images, augmented and normalised where they live.

    Slicing whole batches replaces a DataLoader's per-sample indexing and collation: on the CPU
    it costs a fraction of that, and with the images on the GPU (small datasets) no host work
    is left in the step at all. Each iteration draws a new shuffle from the seeded generator;
    a ``sampler`` (e.g. DistributedSampler) supplies the indices instead, read at every pass.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool, augment: bool, seed: int, sampler: Sampler[int] | None = None,
                 drop_last: bool = False, flip: bool = True) -> None:
        self.images, self.labels = images, labels.to(images.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.sampler = sampler
        self.transform = BatchTransform(augment, seed, flip)
        self.generator = torch.Generator().manual_seed(seed)

    def _order(self) -> torch.Tensor:
        if self.sampler is not None:
            return torch.as_tensor(list(self.sampler), dtype=torch.int64)
        if self.shuffle:
            return torch.randperm(len(self.labels), generator=self.generator)
        return torch.arange(len(self.labels))

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(self.labels)  # type: ignore[arg-type]
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.images.device, non_blocking=True)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.transform.batch(self.images[index], self.labels[index])


def drops_lone_last(count: int, batch_size: int) -> bool:
    """Whether a training epoch of ``count`` images leaves out its last batch: it would hold one image.

    BatchNorm in training mode cannot normalise a single value per channel, which is what one
    image gives where the feature maps are 1 x 1 (a ResNet's last stage at 32 x 32 pixels). The
    epoch's shuffle leaves out another image each time.
    """
    return batch_size > 1 and count % batch_size == 1


def training_batches(count: int, batch_size: int) -> int:
    """The batches of a training epoch of ``count`` images (see :func:`drops_lone_last`)."""
    if drops_lone_last(count, batch_size):
        return count // batch_size
    return -(-count // batch_size)


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
) -> BatchIterator:
    """Batches of (normalised float images ``N x 3 x S x S``, int64 labels) from memory.

    ``augment`` turns on random crops and, unless ``flip`` is False, horizontal flips; flips
    turn some digits and letters into other symbols, so leave them off for those. A given
    ``sampler`` (e.g. DistributedSampler) replaces shuffling; call its ``set_epoch`` yourself.
    The images may live on the GPU: batches then stay there.
    """
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
        raise ValueError(f"expected uint8 N x 3 x S x S images, got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    return BatchIterator(images_u8, labels, batch_size, shuffle=shuffle, augment=augment, seed=seed,
                         sampler=sampler, drop_last=drop_last, flip=flip)

"""The photo recipe: which recipe a dataset gets, and its seeded training transforms.

Per-image transforms (RandomResizedCrop, flip, TrivialAugmentWide, RandomErasing) run in
DataLoader workers on uint8 tensors; MixUp / CutMix run on the device on normalised batches.
Every random number of an image comes from a generator seeded by (epoch seed, image index), so
a resumed epoch draws the same crops whatever the workers, their number or their lifetime.
The evaluation side is ``images.preprocess_image``, which the served model shares.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
from collections.abc import Sequence
from typing import Literal

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from visionpipe.config import PhotoAugmentConfig
from visionpipe.errors import DatasetError
from visionpipe.data.images import MEAN, ImageSource, decode_image

log = logging.getLogger(__name__)

Recipe = Literal["small", "photo"]
PHOTO_FACTOR = 2  # auto: photo when the median short side is at least this many image_size
# RandomErasing fills with the mean colour: what torchvision's 0 on normalised images is.
_MEAN_U8 = [round(255 * m) for m in MEAN]


def choose_recipe(requested: str, image_size: int, widths: Sequence[int],
                  heights: Sequence[int]) -> Recipe:
    """The recipe for images of these sizes; refuse 'photo' when every image is below image_size."""
    shorts = [min(w, h) for w, h in zip(widths, heights, strict=True)]
    if requested == "auto":
        median = statistics.median(shorts) if shorts else 0
        chosen: Recipe = "photo" if median >= PHOTO_FACTOR * image_size else "small"
        log.info("recipe %s: the median short side is %s px, image_size %d (photo from %d px)",
                 chosen, median, image_size, PHOTO_FACTOR * image_size)
        return chosen
    if requested == "photo" and shorts and max(shorts) < image_size:
        raise DatasetError(
            f"data.recipe is 'photo' but all {len(shorts)} images are smaller than image_size "
            f"{image_size} (the largest short side is {max(shorts)} px): random crops of them "
            "would only be upscaled. Fix: set data.recipe to 'small' (or 'auto'), or lower "
            f"data.image_size to at most {max(shorts)}.")
    if requested not in ("small", "photo"):
        raise ValueError(f"unknown recipe {requested!r}; expected 'auto', 'small' or 'photo'")
    return requested  # type: ignore[return-value]


def training_is_deterministic(recipe: str, augment: bool) -> bool:
    """Whether a training image is the same every epoch (then frozen features may be cached):
    the small recipe without augmentation; never the photo recipe, whose crops are random."""
    return recipe == "small" and not augment


def sample_seed(epoch_seed: int, index: int) -> int:
    """The seed of image ``index``'s transforms in the epoch seeded ``epoch_seed``."""
    digest = hashlib.blake2b(f"{epoch_seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # torch seeds are below 2**63


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, height, width), as ``v2.RandomResizedCrop.make_params``
    draws it (ten tries, then the center crop), but from ``generator``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PhotoTrainTransform:
    """Encoded image + seed -> a uint8 ``3 x S x S`` training crop (runs in the workers).

    The crop is drawn on the upright original size before decoding, so a JPEG is decoded at
    the smallest DCT scale that still leaves the crop ``image_size`` pixels or more.
    """

    def __init__(self, image_size: int, augment: PhotoAugmentConfig) -> None:
        self.image_size, self.augment = image_size, augment
        self.trivial = v2.TrivialAugmentWide() if augment.trivial_augment else None
        self.erasing = (v2.RandomErasing(p=augment.random_erasing, value=_MEAN_U8)
                        if augment.random_erasing > 0 else None)

    def __call__(self, source: ImageSource, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        drawn: dict[str, tuple[int, ...]] = {}  # the box, and the size it was drawn on
        size = self.image_size

        def needed(width: int, height: int) -> tuple[int, int]:
            _, _, h, w = drawn["box"] = self._box(width, height, generator)
            drawn["size"] = (width, height)
            return math.ceil(size * width / w), math.ceil(size * height / h)

        tensor = decode_image(source, needed)  # 3 x H x W, uint8
        height, width = tensor.shape[-2:]
        if "box" not in drawn:  # not a JPEG: no draft, the crop is drawn on the decoded size
            needed(width, height)
        top, left, h, w = drawn["box"]
        sx, sy = width / drawn["size"][0], height / drawn["size"][1]  # the draft's scale
        top, left = min(round(top * sy), height - 1), min(round(left * sx), width - 1)
        # Clamped: a box rounded past the edge would be padded with black.
        h, w = max(1, min(round(h * sy), height - top)), max(1, min(round(w * sx), width - left))
        crop = tvf.resized_crop(tensor, top, left, h, w, [size, size], antialias=True)
        if torch.rand(1, generator=generator).item() < self.augment.hflip:
            crop = crop.flip(-1)
        return self._extra(crop, generator).contiguous()

    def _box(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        return crop_box(width, height, self.augment.scale, self.augment.ratio, generator)

    def _extra(self, crop: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """TrivialAugmentWide and RandomErasing draw from torch's global generator: seed it
        from this image's generator, inside a fork so the caller's stream is left alone."""
        if self.trivial is None and self.erasing is None:
            return crop
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            if self.trivial is not None:
                crop = self.trivial(crop)
            if self.erasing is not None:
                crop = self.erasing(crop)
        return crop


class BatchMix:
    """MixUp or CutMix (one of the two at random, as torchvision's reference) on a normalised
    batch; the labels become soft, ``N x classes`` float32."""

    def __init__(self, augment: PhotoAugmentConfig, num_classes: int) -> None:
        mixes: list[v2.Transform] = []
        if augment.mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
        if augment.cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixes) if mixes else None

    def __bool__(self) -> bool:
        return self.mix is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None:
            return images, labels
        # MixUp and CutMix draw on the CPU (Beta, randint) from the global generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.mix(images, labels)

"""Batch augmentation: the GPU's one-gather crop is the CPU's per-image slicing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visionpipe.data.loading import crop_by_gather, crop_by_slices, random_crop


def test_the_gather_crop_equals_slicing_each_image() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (33, 3, 12, 10), dtype=torch.uint8, generator=gen)
    padded = F.pad(images, (4,) * 4)
    offsets = torch.randint(0, 9, (33, 2), generator=gen)
    offsets[0] = torch.tensor([0, 8])  # both extremes of the padding
    offsets[1] = torch.tensor([8, 0])
    sliced = crop_by_slices(padded, offsets, 12, 10)
    gathered = crop_by_gather(padded, offsets, 12, 10)
    assert gathered.shape == (33, 3, 12, 10) and gathered.dtype == torch.uint8
    assert torch.equal(gathered, sliced)
    assert torch.equal(sliced[0], padded[0, :, 0:12, 8:18])


def test_random_crop_draws_from_the_generator_it_is_given() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    first = random_crop(images, 4, torch.Generator().manual_seed(5))
    again = random_crop(images, 4, torch.Generator().manual_seed(5))
    other = random_crop(images, 4, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)

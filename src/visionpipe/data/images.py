"""Decode and preprocess images identically for training and serving.

The MLflow pyfunc model imports this module at serving time, so it depends only on torch,
torchvision, PIL and numpy: whatever bytes a client sends go through the same conversion as the
training images did.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as tvf

# ImageNet statistics: the pretrained backbones expect inputs normalised with them.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ImageSource = str | os.PathLike[str] | bytes | bytearray | BinaryIO

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads
_SWAPS_SIDES = {5, 6, 7, 8}  # orientations that turn the image by 90 degrees
# (upright width, upright height) -> the smallest (width, height) the caller will use.
NeededSize = Callable[[int, int], tuple[int, int]]


def open_image(source: ImageSource, needed: NeededSize | None = None) -> Image.Image:
    """Decode a file, a byte string or a binary stream into an 8-bit RGB image.

    ``needed`` maps the upright (width, height) to the smallest upright size the caller uses:
    a JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (``Image.draft``, much
    cheaper than a full decode and a resize), never smaller than that. Raises PIL's
    ``UnidentifiedImageError`` / ``OSError`` for data that is not a whole image.
    """
    stream = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else source
    with Image.open(stream) as img:
        if needed is not None and img.format == "JPEG":
            _draft(img, needed)
        img.load()
        # Phone cameras store rotation in EXIF; apply it so a photo looks the same everywhere.
        # (Without a rotation exif_transpose returns a copy, which costs a training loader.)
        turned = img.getexif().get(_ORIENTATION, 1) not in (1, None)
        upright = ImageOps.exif_transpose(img) if turned else img
    return to_rgb(upright)


def _draft(img: Image.Image, needed: NeededSize) -> None:
    """Ask the JPEG decoder for the smallest scale that still gives ``needed`` pixels."""
    width, height = img.size  # as stored: EXIF orientations 5 to 8 swap the sides
    turned = img.getexif().get(_ORIENTATION, 1) in _SWAPS_SIDES
    need_w, need_h = needed(*((height, width) if turned else (width, height)))
    if turned:
        need_w, need_h = need_h, need_w
    if _draft_scale((width, height), (need_w, need_h)) > 1:  # else nothing to gain
        img.draft("RGB", (max(1, need_w), max(1, need_h)))


def decode_image(source: ImageSource, needed: NeededSize | None = None) -> torch.Tensor:
    """``open_image``'s pixels as a uint8 ``3 x H x W`` tensor, decoded the fastest way.

    An upright YCbCr JPEG that a draft would not shrink goes to ``torchvision.io.decode_jpeg``
    (libjpeg-turbo, as Pillow, with the same settings: the same pixels, without Pillow's
    4-byte buffer and its copy into a tensor); everything else to ``open_image``.
    """
    data = _as_bytes(source)
    if needed is not None:
        needed = functools.cache(needed)  # asked once: a caller may draw its crop in it
    with Image.open(io.BytesIO(data)) as img:
        plain = (img.format == "JPEG" and img.mode == "RGB"
                 and img.getexif().get(_ORIENTATION, 1) in (1, None))
        shrinks = needed is not None and plain and _draft_scale(img.size, needed(*img.size)) > 1
    if plain and not shrinks:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=ImageReadMode.RGB)
    return tvf.pil_to_tensor(open_image(data, needed))


def _as_bytes(source: ImageSource) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return f.read()
    return source.read()


def _draft_scale(size: tuple[int, int], need: tuple[int, int]) -> int:
    """The 1/scale a JPEG decoder may shrink ``size`` by and still give ``need`` (PIL's rule)."""
    most = min(size[0] // max(1, need[0]), size[1] // max(1, need[1]))
    return next((scale for scale in (8, 4, 2) if most >= scale), 1)


def preprocess_image(source: ImageSource, recipe: str, image_size: int,
                     resize_size: int | None = None) -> torch.Tensor:
    """The evaluation (and serving) preprocessing: a uint8 ``3 x S x S`` tensor.

    ``small`` stretches the whole image to the square; ``photo`` resizes the short side to
    ``resize_size`` (aspect kept) and crops the center square, as ImageNet models are evaluated.
    Evaluation, the served pyfunc and batch scoring all call this one function.
    """
    if recipe == "small":
        return to_uint8_tensor(open_image(source), image_size)
    if recipe != "photo" or resize_size is None:
        raise ValueError(f"recipe {recipe!r} with resize_size {resize_size}: expected 'small', "
                         "or 'photo' with a resize_size")
    tensor = decode_image(source, functools.partial(short_side_size, resize_size))  # 3 x H x W
    tensor = tvf.resize(tensor, [resize_size], antialias=True)  # short side = resize_size
    return tvf.center_crop(tensor, [image_size, image_size]).contiguous()


def short_side_size(short: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) scaled so that the short side is ``short``, rounded up."""
    scale = short / min(width, height)
    return math.ceil(width * scale), math.ceil(height * scale)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: high bit depths rescaled, transparency composited on black."""
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        img = _to_8bit_gray(img)
    if img.mode == "La":  # premultiplied; Pillow converts it to nothing but LA
        img = img.convert("LA")
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or float image to 8-bit gray instead of clipping at 255.

    Integer images (``I;16*`` and ``I``, which is how several decoders hand over 16-bit data) map
    0..65535 to 0..255; float images (``F``) map 0.0..1.0 to 0..255.
    """
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scaled = np.clip(values, 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(values, 0.0, 65535.0) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def to_uint8_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB image as a ``3 x image_size x image_size`` uint8 tensor, resized with antialiasing.

    The image is stretched to the square rather than cropped, so no part of it is lost.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    tensor = tvf.pil_to_tensor(img)  # 3 x H x W, uint8
    if tuple(tensor.shape[-2:]) != (image_size, image_size):
        tensor = tvf.resize(tensor, [image_size, image_size], antialias=True)
    return tensor.contiguous()


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images (``N x 3 x S x S`` or ``3 x S x S``) to float32 normalised with MEAN and STD."""
    mean, std = _mean_std(batch_uint8.device)
    return (batch_uint8.to(torch.float32) / 255.0 - mean) / std


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: ``torch.tensor(..., device="cuda")`` copies from the host and waits
    # for the GPU to finish all it was given, which would stall every training step.
    return (torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1).to(device),
            torch.tensor(STD, dtype=torch.float32).view(3, 1, 1).to(device))

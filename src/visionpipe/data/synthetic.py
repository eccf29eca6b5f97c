"""Photo-like ImageFolders made on the spot: for benchmarks, tests and trying the photo recipe offline.

Each class is a kind of object (a disc, a box, a triangle, a ring, stripes, a cross) drawn at a
random place, size, angle and colour over a smooth two-colour background, blurred and lightly
grained like a camera picture. Colours say nothing about the class, so a model has to learn
shapes. Files come as JPEGs of the given sizes and qualities, and with ``specials`` one of each
kind a real folder holds: a PNG with transparency, a grayscale JPEG, a CMYK JPEG and a JPEG whose
EXIF orientation tag says "rotate 90 degrees" (its upright content is as well drawn as any other).

    python -m visionpipe.data.synthetic /tmp/photos --classes 6 --per-class 100
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# The last name has a non-ASCII letter: folders of real users do.
CLASS_NAMES = ("disc", "box", "triangle", "ring", "stripes", "croix-é")
PHOTO_SIZES: tuple[tuple[int, int], ...] = ((500, 375), (375, 500))
LARGE_SIZE = (1024, 768)
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF: the stored pixels must turn 90 degrees clockwise to stand upright


def make_photo_folder(
    root: Path,
    classes: int | Sequence[str] = 6,
    per_class: int = 100,
    sizes: Sequence[tuple[int, int]] = PHOTO_SIZES,
    large_every: int = 0,
    quality: tuple[int, int] = (85, 95),
    specials: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write ``classes`` x ``per_class`` images under ``root/<class>/``; return their paths.

    ``classes`` is a number (the first that many of ``CLASS_NAMES``) or the names to draw.
    Sizes cycle through ``sizes`` (width, height); with ``large_every`` every n-th image is
    1024 x 768 instead. With ``specials`` the first four images of the first class are a PNG,
    a grayscale JPEG, a CMYK JPEG and an EXIF-rotated JPEG.
    """
    names = _class_names(classes)
    rng = np.random.default_rng(seed)
    paths = []
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            number = label * per_class + index
            size = LARGE_SIZE if large_every and number % large_every == large_every - 1 \
                else sizes[number % len(sizes)]
            image = draw_photo(CLASS_NAMES.index(name), size, rng)
            kind = _SPECIALS[index] if specials and label == 0 and index < len(_SPECIALS) else "jpeg"
            paths.append(_save(image, folder / f"{name}_{index:04d}", kind,
                               int(rng.integers(quality[0], quality[1] + 1))))
    return paths


def _class_names(classes: int | Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, int):
        if not 1 <= classes <= len(CLASS_NAMES):
            raise ValueError(f"classes must be 1 to {len(CLASS_NAMES)}, got {classes}")
        return CLASS_NAMES[:classes]
    unknown = [name for name in classes if name not in CLASS_NAMES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names among {', '.join(CLASS_NAMES)}; "
                         f"got {list(classes)}")
    return tuple(classes)


def classes_arg(text: str) -> int | list[str]:
    """A command line's ``--classes``: a number, or names separated by commas."""
    return int(text) if text.isdigit() else text.split(",")


def draw_photo(label: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One RGB picture of class ``label`` at ``size`` (width, height)."""
    width, height = size
    image = _background(size, rng)
    shape = Image.new("L", size, 0)
    draw = ImageDraw.Draw(shape)
    short = min(width, height)
    radius = short * rng.uniform(0.18, 0.38)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    _SHAPES[label](draw, cx, cy, radius, rng.uniform(0, math.pi), short)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    image.paste(Image.new("RGB", size, colour), mask=shape.filter(ImageFilter.GaussianBlur(short / 200)))
    image = image.filter(ImageFilter.GaussianBlur(short / 300))
    grain = rng.normal(0, 6, (height, width, 1))  # one grain for all channels, as luminance noise
    pixels = np.asarray(image, dtype=np.float32) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A smooth gradient between two random colours, in a random direction."""
    width, height = size
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / max(width, height)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)  # H x W in 0..1
    start, end = rng.integers(0, 256, (2, 3)).astype(np.float32)
    pixels = start + ramp[..., None] * (end - start)  # H x W x 3
    return Image.fromarray(pixels.astype(np.uint8))


def _polygon(cx: float, cy: float, radius: float, angle: float, corners: int) -> list[tuple[float, float]]:
    step = 2 * math.pi / corners
    return [(cx + radius * math.cos(angle + i * step), cy + radius * math.sin(angle + i * step))
            for i in range(corners)]


def _disc(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, short: int) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)


def _box(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, short: int) -> None:
    draw.polygon(_polygon(cx, cy, r, angle, 4), fill=255)


def _triangle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, short: int) -> None:
    draw.polygon(_polygon(cx, cy, r, angle, 3), fill=255)


def _ring(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, short: int) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=max(2, int(r * 0.3)))


def _stripes(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, short: int) -> None:
    """Parallel bars across a square patch."""
    dx, dy = math.cos(angle), math.sin(angle)
    for offset in np.linspace(-r, r, 5):
        ox, oy = -dy * offset, dx * offset
        draw.line((cx + ox - dx * r, cy + oy - dy * r, cx + ox + dx * r, cy + oy + dy * r),
                  fill=255, width=max(2, int(r * 0.15)))


def _cross(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, short: int) -> None:
    for turn in (angle, angle + math.pi / 2):
        dx, dy = math.cos(turn) * r, math.sin(turn) * r
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=max(2, int(r * 0.3)))


_SHAPES = (_disc, _box, _triangle, _ring, _stripes, _cross)
_SPECIALS = ("png", "gray", "cmyk", "exif-rotated")


def _save(image: Image.Image, stem: Path, kind: str, quality: int) -> Path:
    if kind == "png":
        path = stem.with_suffix(".png")
        rgba = image.convert("RGBA")
        rgba.putalpha(255)  # an alpha channel, fully opaque: the pixels stay what was drawn
        rgba.save(path)
        return path
    path = stem.with_suffix(".jpg")
    if kind == "gray":
        image.convert("L").save(path, quality=quality)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, quality=quality)
    elif kind == "exif-rotated":
        # Stored turned 90 degrees counter-clockwise; the tag tells viewers to turn it back.
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = ROTATE_90_CW
        image.transpose(Image.Transpose.ROTATE_90).save(path, quality=quality, exif=exif)
    else:
        image.save(path, quality=quality)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m visionpipe.data.synthetic",
                                     description="Write a photo-like ImageFolder.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=classes_arg, default=6,
                        help=f"a number, or names separated by commas among {','.join(CLASS_NAMES)}")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--large-every", type=int, default=0,
                        help="every n-th image 1024 x 768 (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_photo_folder(args.root, args.classes, args.per_class,
                              large_every=args.large_every, seed=args.seed)
    print(f"{len(paths)} images in {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Image decoding and preprocessing shared by training and serving."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visionpipe.data as data_package
import visionpipe.data.images as images_module
from visionpipe.data.images import MEAN, STD, normalize, open_image, to_rgb, to_uint8_tensor


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def _gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    """A non-constant image of ``mode``, so conversions have something to get wrong."""
    rgba = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("RGB", "JPEG"),
     ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("1", "PNG"), ("I", "TIFF"), ("F", "TIFF")],
)
@pytest.mark.parametrize("size", [(13, 7), (1, 40), (33, 33)])
def test_every_mode_and_size_becomes_3xSxS_uint8(
    tmp_path: Path, mode: str, fmt: str, size: tuple[int, int]
) -> None:
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(_encoded(_gradient(mode, size), fmt))
    from_path = to_uint8_tensor(open_image(path), 24)
    from_bytes = to_uint8_tensor(open_image(path.read_bytes()), 24)
    assert from_path.shape == (3, 24, 24)
    assert from_path.dtype == torch.uint8
    assert torch.equal(from_path, from_bytes)  # serving gets bytes, training gets paths


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    gray = np.asarray(open_image(path))[0, :, 0]
    assert gray.tolist() == [0, 1, 128, 255]


def test_float_images_map_unit_range_to_bytes() -> None:
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0, 7.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255, 255]


def test_alpha_is_composited_on_black() -> None:
    half = Image.new("RGBA", (2, 2), (200, 100, 50, 128))
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [100, 50, 25]
    clear_gray = Image.new("LA", (2, 2), (200, 0))
    assert np.asarray(to_rgb(clear_gray)).max() == 0


def test_palette_transparency_is_composited_on_black(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 255, 255, 250, 10, 10])
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0  # index 0 (white) is transparent
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert np.asarray(open_image(path))[0].tolist() == [[0, 0, 0], [250, 10, 10]]


def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (4, 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    rotated = open_image(_encoded_with_exif(img, exif))
    assert rotated.size == (2, 4)


def _encoded_with_exif(img: Image.Image, exif: Image.Exif) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def test_normalize_uses_imagenet_statistics() -> None:
    white = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(white)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    expected = [(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected))
    assert torch.equal(normalize(white[0]), out[0])


def _top_level_imports(module_file: str) -> set[str]:
    """Root package names a module imports when it is executed (TYPE_CHECKING blocks skipped)."""
    tree = ast.parse(Path(module_file).read_text())
    names: set[str] = set()
    for node in tree.body:  # only module level: function-level imports run on call, not import
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_serving_path_imports_only_torch_torchvision_pil_numpy() -> None:
    # The pyfunc model imports visionpipe.data.images: the package __init__ and the module
    # must not drag in boto3, pandas or scikit-learn (checked statically: a subprocess that
    # imports torch costs seconds).
    allowed = {"__future__", "collections", "functools", "io", "math", "os", "typing", "importlib",
               "numpy", "torch", "torchvision", "PIL"}
    assert _top_level_imports(images_module.__file__) <= allowed
    assert _top_level_imports(data_package.__file__) <= allowed

"""Style and content images as tensors and back to PNG, and the style image shipped offline."""

from __future__ import annotations

import io
import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvf
from PIL import Image

from visionpipe.data.images import MEAN, STD, open_image


def bundled_style_path() -> Path:
    """``bundled:waves``: a colourful wave pattern shipped with visionpipe (offline default)."""
    return Path(str(resources.files("visionpipe.style") / "assets" / "waves.png"))


def make_waves(size: int = 256) -> Image.Image:
    """The bundled pattern (how ``assets/waves.png`` was made): bands of colour in waves."""
    y, x = np.mgrid[0:size, 0:size] / size
    phase = 2 * math.pi * (3 * x + 0.5 * np.sin(2 * math.pi * 2 * y))
    rgb = np.stack([np.sin(phase), np.sin(phase + 2.1), np.sin(phase + 4.2)], axis=-1)
    stripes = (np.sin(2 * math.pi * 24 * (x + y)) > 0.6)[..., None] * 0.35
    pixels = np.clip((rgb * 0.5 + 0.5) * (1 - stripes), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8), "RGB")


def load_image(source: bytes | Path, short_side: int | None = None) -> torch.Tensor:
    """``1 x 3 x H x W`` RGB in [0, 1] (EXIF rotation applied, as everywhere), its short side
    resized to ``short_side`` when given."""
    data = source.read_bytes() if isinstance(source, Path) else source
    tensor = tvf.pil_to_tensor(open_image(data))
    if short_side is not None:
        tensor = tvf.resize(tensor, [short_side], antialias=True)
    return (tensor.float() / 255.0).unsqueeze(0).contiguous()


def unit_range(batch: torch.Tensor) -> torch.Tensor:
    """A batch as the training loaders deliver it (float, normalised with ImageNet's MEAN and
    STD) or as uint8, back to RGB in [0, 1]: what the stylisation network takes."""
    if batch.dtype == torch.uint8:
        return batch.float() / 255.0
    mean = torch.tensor(MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() * std + mean).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Network output (any range) as ``uint8`` pixels: clamped to [0, 1], rounded."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)


def png_bytes(image: torch.Tensor) -> bytes:
    """One ``3 x H x W`` (or ``1 x 3 x H x W``) image as PNG bytes."""
    pixels = to_uint8(image.reshape(-1, *image.shape[-3:])[0]).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def grid_png(rows: list[torch.Tensor], path: Path) -> Path:
    """Images (each row ``N x 3 x H x W`` in [0, 1], all the same size) as one PNG grid."""
    tiles = torch.cat([torch.cat(list(to_uint8(row.cpu())), dim=2) for row in rows], dim=1)
    Image.fromarray(tiles.permute(1, 2, 0).numpy(), "RGB").save(path, format="PNG")
    return path

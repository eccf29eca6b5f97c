"""The image transformation network of Johnson et al. (2016), with instance normalisation
(Ulyanov et al. 2016) and upsampling by resize-then-convolve (no checkerboard artefacts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn


class StyleSpec(BaseModel):
    """What rebuilds a trained stylisation network, saved with its weights."""

    style: str
    style_sha256: str
    channels: int = 32
    residual_blocks: int = 5
    image_size: int  # the content images' side in training
    loss_network: str = "vgg16"


class _Conv(nn.Sequential):
    """Reflection padding, convolution, instance norm (affine), and a ReLU unless ``last``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, last: bool = False) -> None:
        layers: list[nn.Module] = [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(cin, cout, kernel, stride)]
        if not last:
            layers += [nn.InstanceNorm2d(cout, affine=True), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Upsample(nn.Module):
    """Nearest-neighbour resize to ``size``, then a convolution: no transposed-conv checkerboard."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _Conv(cin, cout, 3)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TransformerNet(nn.Module):
    """RGB in [0, 1] to stylised RGB of the same size (any size: each upsampling returns to the
    size before the matching downsampling, odd sides included). The last layer is a plain
    convolution; outputs are clamped to [0, 1] only when turned into pixels."""

    def __init__(self, channels: int = 32, residual_blocks: int = 5) -> None:
        super().__init__()
        c = channels
        self.down = nn.ModuleList([_Conv(3, c, 9), _Conv(c, 2 * c, 3, stride=2),
                                   _Conv(2 * c, 4 * c, 3, stride=2)])
        self.residual = nn.Sequential(*[_Residual(4 * c) for _ in range(residual_blocks)])
        self.up = nn.ModuleList([_Upsample(4 * c, 2 * c), _Upsample(2 * c, c)])
        self.out = _Conv(c, 3, 9, last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for layer in self.down:
            sizes.append(x.shape[-2:])
            x = layer(x)
        x = self.residual(x)
        for layer, size in zip(self.up, reversed(sizes[1:]), strict=True):
            x = layer(x, tuple(size))
        return self.out(x)  # type: ignore[no-any-return]


def build_style_network(spec: StyleSpec) -> TransformerNet:
    return TransformerNet(spec.channels, spec.residual_blocks)

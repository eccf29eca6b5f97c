"""The perceptual loss: content and style measured on a frozen pretrained VGG's features.

Layers are named as in the papers, ``conv<block>_<n>`` and ``relu<block>_<n>``, over
torchvision's ``vgg16`` / ``vgg19`` ``features``; only the layers up to the deepest one the
loss reads are kept, so nothing past it is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from visionpipe.data.images import MEAN, STD
from visionpipe.weights import load_state_dict_file


_VGG_CONFIGS = {"vgg16": "D", "vgg19": "E"}  # torchvision.models.vgg's names of the two


def vgg_features(network: str) -> nn.Sequential:
    """torchvision's ``<network>.features`` (without building the 100M-parameter classifier)."""
    if network not in _VGG_CONFIGS:
        raise ValueError(f"loss network {network!r}: use vgg16 or vgg19")
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[_VGG_CONFIGS[network]])


@cache
def layer_names(network: str) -> tuple[str, ...]:
    """The name of each module of torchvision's ``<network>.features``, in order."""
    features = vgg_features(network)
    names, block, conv = [], 1, 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        else:  # MaxPool2d ends a block
            names.append(f"pool{block}")
            block, conv = block + 1, 0
    return tuple(names)


def check_layers(network: str, layers: Sequence[str]) -> None:
    """An error that lists the known names when a layer is not one of ``network``'s."""
    known = layer_names(network)
    unknown = [name for name in layers if name not in known]
    if unknown:
        relus = [n for n in known if n.startswith("relu")]
        raise ValueError(f"{network} has no layer {', '.join(map(repr, unknown))}; its ReLU "
                         f"layers are {', '.join(relus)}")


def gram(features: torch.Tensor) -> torch.Tensor:
    """``N x C x C`` Gram matrices of ``N x C x H x W`` features, divided by ``C x H x W``."""
    n, c, h, w = features.shape
    flat = features.float().reshape(n, c, h * w)  # float32 under bf16 autocast too
    with torch.autocast(features.device.type, enabled=False):
        return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertically and horizontally neighbouring pixels."""
    down = (images[:, :, 1:, :] - images[:, :, :-1, :]).pow(2).mean()
    right = (images[:, :, :, 1:] - images[:, :, :, :-1]).pow(2).mean()
    return down + right


class LossNetwork(nn.Module):
    """A frozen VGG cut after the deepest layer asked for; returns those layers' features."""

    def __init__(self, network: str, layers: Sequence[str], state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        check_layers(network, layers)
        names = layer_names(network)
        last = max(names.index(name) for name in layers)
        self.features = vgg_features(network)[: last + 1]
        for module in self.features:  # an in-place ReLU would overwrite a conv layer's output
            if isinstance(module, nn.ReLU):
                module.inplace = False
        if state is not None:
            wanted = self.features.state_dict()
            features = {k.removeprefix("features."): v for k, v in state.items()
                        if k.startswith("features.") and k.removeprefix("features.") in wanted}
            missing = [f"features.{k}" for k in wanted if k not in features]
            if missing:
                raise ValueError(f"the {network} weights have no {', '.join(missing[:3])}: not "
                                 f"a torchvision {network} state dict (features.N.weight, ...)")
            self.features.load_state_dict(features)
        self.wanted = {names.index(name): name for name in layers}
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LossNetwork:
        return super().train(False)  # always eval: a loss network never changes

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of ``images`` (``N x 3 x H x W``, RGB in [0, 1]) at each wanted layer."""
        x = (images - self.mean) / self.std
        out = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.wanted:
                out[self.wanted[index]] = x
        return out


def load_loss_network(network: str, layers: Sequence[str], weights_path: Path,
                      weights_sha256: str | None) -> LossNetwork:
    """The loss network with the fetched weights (verified against ``weights_sha256``)."""
    return LossNetwork(network, layers, load_state_dict_file(weights_path, weights_sha256))


@dataclass(frozen=True)
class LossTerms:
    content: torch.Tensor
    style: torch.Tensor
    tv: torch.Tensor
    total: torch.Tensor

    def detached(self) -> LossTerms:
        return LossTerms(self.content.detach(), self.style.detach(), self.tv.detach(), self.total.detach())

    def as_floats(self) -> dict[str, float]:
        return {"content_loss": float(self.content.detach()), "style_loss": float(self.style.detach()),
                "tv_loss": float(self.tv.detach()), "total_loss": float(self.total.detach())}


class PerceptualLoss(nn.Module):
    """Content (features of one layer), style (Gram matrices of several, against the style
    image's) and total variation, each weighted."""

    def __init__(self, network: LossNetwork, content_layer: str, style_layers: Sequence[str],
                 style_image: torch.Tensor, content_weight: float, style_weight: float,
                 tv_weight: float) -> None:
        super().__init__()
        self.network, self.content_layer = network, content_layer
        self.style_layers = list(style_layers)
        self.weights = (content_weight, style_weight, tv_weight)
        with torch.no_grad():
            targets = network(style_image)
        for name in self.style_layers:
            self.register_buffer(f"gram_{name}", gram(targets[name]), persistent=False)

    def style_target(self, name: str) -> torch.Tensor:
        return getattr(self, f"gram_{name}")  # type: ignore[no-any-return]

    def forward(self, output: torch.Tensor, content: torch.Tensor) -> LossTerms:
        """The loss of ``output`` images for ``content`` images (both RGB in [0, 1])."""
        with torch.no_grad():
            target = self.network(content)[self.content_layer]
        features = self.network(output)
        content_loss = F.mse_loss(features[self.content_layer], target)
        style_loss = sum((F.mse_loss(gram(features[name]),
                                     self.style_target(name).expand(len(output), -1, -1))
                          for name in self.style_layers), torch.zeros((), device=output.device))
        tv = total_variation(output)
        cw, sw, tw = self.weights
        return LossTerms(content_loss, style_loss, tv, cw * content_loss + sw * style_loss + tw * tv)

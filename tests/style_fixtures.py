"""Tiny style-transfer inputs for the tests: digits, the bundled style image, and a randomly
initialised VGG-16 cut after relu2_2 (the layers the tiny loss reads), saved as a file."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from visionpipe.config import DataConfig, StyleLossConfig, StyleTrainConfig
from visionpipe.data import prepare_dataset
from visionpipe.digests import file_sha256
from visionpipe.style.images import bundled_style_path
from visionpipe.style.train import StyleInputs

TINY_LOSS = StyleLossConfig(content_layer="relu2_2", style_layers=["relu1_2", "relu2_2"],
                            style_size=32)
TINY_TRAIN = StyleTrainConfig(epochs=2, batch_size=8, channels=4, residual_blocks=1, lr=5e-3,
                              device="cpu")


def vgg16_features(path: Path) -> Path:
    """The features of a seeded random VGG-16 in torchvision's key names (``features.N.*``)."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    torch.save({f"features.{k}": v for k, v in vgg.features[:9].state_dict().items()}, path)
    return path


def style_inputs(tmp_path: Path, max_per_class: int = 6) -> StyleInputs:
    dataset = prepare_dataset(DataConfig(max_per_class=max_per_class, image_size=32))
    weights = vgg16_features(tmp_path / "vgg16-features.pth")
    style = bundled_style_path()
    return StyleInputs(dataset=dataset, style="waves", style_path=str(style),
                       style_sha256=file_sha256(style), loss_weights_path=str(weights),
                       loss_weights_sha256=file_sha256(weights))

"""Checkpoints the registry and UI tests register: untrained weights, to check plumbing."""

from __future__ import annotations

from pathlib import Path

import torch

from visionpipe.data import PreparedDataset
from visionpipe.models import ModelSpec, build_backbone
from visionpipe.training.checkpoint import save_checkpoint


def untrained_checkpoint(path: Path, dataset: PreparedDataset, seed: int = 0,
                         arch: str = "resnet18") -> Path:
    """A checkpoint of ``arch`` with seeded random weights for ``dataset``'s classes."""
    spec = ModelSpec(arch=arch, num_classes=dataset.num_classes, class_names=dataset.class_names,
                     image_size=dataset.image_size)
    torch.manual_seed(seed)
    save_checkpoint({"model": build_backbone(arch, dataset.num_classes).state_dict(),
                     "spec": spec.model_dump_json()}, path)
    return path

"""Model builders, freezing and the spec that lets a consumer rebuild a registered model.

Only torch and torchvision are imported here: the MLflow pyfunc ships this module to consumers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torchvision
from pydantic import BaseModel
from torch import nn

# The module that a new task replaces, per family; everything else is the backbone.
HEAD_MODULES: dict[str, tuple[str, ...]] = {"resnet": ("fc",), "googlenet": ("fc", "aux1", "aux2")}


class ModelSpec(BaseModel):
    """Everything needed to rebuild a trained network for inference, saved next to its weights."""

    arch: str
    num_classes: int
    class_names: list[str]
    image_size: int
    small_input_stem: bool = False
    # How serving preprocesses (``data.images.preprocess_image``); specs saved before recipes
    # existed were the small recipe's.
    recipe: Literal["small", "photo"] = "small"
    resize_size: int | None = None


def head_modules(arch: str) -> tuple[str, ...]:
    return HEAD_MODULES["googlenet" if arch == "googlenet" else "resnet"]


def build_resnet(arch: str, num_classes: int) -> nn.Module:
    """A torchvision ResNet with ImageNet's 1000-way head replaced by a fresh ``num_classes`` one.

    The new head is a plain Linear: no activation after it, the logits must stay unclipped.
    """
    model = torchvision.models.get_model(arch, weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_googlenet(num_classes: int, small_input_stem: bool, aux_logits: bool = True) -> nn.Module:
    """torchvision's Inception v1, its auxiliary classifiers on, initialised explicitly.

    ``small_input_stem`` swaps the first max-pool for an identity. It holds no weights, so the
    state dict still loads into ``torchvision.models.googlenet``; a 32x32 image then reaches
    inception5 as 2x2 instead of 1x1.
    """
    model = torchvision.models.GoogLeNet(
        num_classes=num_classes, aux_logits=aux_logits, transform_input=False, init_weights=True
    )
    if small_input_stem:
        model.maxpool1 = nn.Identity()
    return model


def strip_aux_heads(model: nn.Module) -> nn.Module:
    """Drop GoogLeNet's auxiliary classifiers: they only shape the training loss."""
    model.aux_logits = False
    model.aux1 = None
    model.aux2 = None
    return model


def inference_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training state dict without GoogLeNet's auxiliary heads (no-op for other networks)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2."))}


def build_model(spec: ModelSpec) -> nn.Module:
    """Rebuild an inference network (no auxiliary heads) from its spec."""
    if spec.arch == "googlenet":
        return build_googlenet(spec.num_classes, spec.small_input_stem, aux_logits=False)
    return build_resnet(spec.arch, spec.num_classes)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(p == "*" or name == p or name.startswith(p + ".") or fnmatch.fnmatch(name, p)
               for p in patterns)


def set_trainable(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Freeze every parameter whose name is not under ``patterns``; return the trainable names.

    >>> set_trainable(resnet, ["fc"])  # head only
    ['fc.weight', 'fc.bias']
    """
    patterns = list(patterns)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad = _matches(name, patterns)
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"no parameter matches trainable={patterns}; check the phase's module names")
    return trainable


def train_mode(model: nn.Module) -> None:
    """``model.train()``, except BatchNorm layers whose parameters are frozen stay in eval mode.

    A frozen BatchNorm in train mode would still update its running statistics from the new data,
    silently changing the backbone the head is trained on.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def is_frozen_module(module: nn.Module) -> bool:
    """True if a module has parameters and none of them trains."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def param_groups(
    model: nn.Module, arch: str, lr: float, backbone_lr_fraction: float
) -> list[dict[str, object]]:
    """Optimizer groups: the head at ``lr``, the trainable backbone at ``lr * fraction``."""
    heads = head_modules(arch)
    head, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if _matches(name, heads) else backbone).append(param)
    groups: list[dict[str, object]] = [{"params": head, "lr": lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_fraction, "name": "backbone"})
    return [g for g in groups if g["params"]]


def load_backbone(model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str) -> None:
    """Load pretrained weights into everything but the new head (check the keys first)."""
    heads = head_modules(arch)
    backbone = {k: v for k, v in state_dict.items() if not _matches(k, heads)}
    model.load_state_dict(backbone, strict=False)

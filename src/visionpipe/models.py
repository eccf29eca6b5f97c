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

# The phase pattern that names the new head, whatever the architecture calls it ("fc",
# "classifier.1", "heads.head", ...): ``Phase(trainable=[HEAD])``.
HEAD = "@head"
GOOGLENET_HEADS = ("fc", "aux1", "aux2")
# Where torchvision's classification models keep their classifier, in the order looked at.
_CLASSIFIER_ATTRIBUTES = ("fc", "classifier", "heads", "head")
# Families whose residual branches end in a BatchNorm that a random init may start at zero.
_RESIDUAL_FAMILIES = ("resnet", "resnext", "wide_resnet")


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


def classifier_name(model: nn.Module) -> str:
    """The dotted name of the model's final Linear classifier (``fc``, ``classifier.1``,
    ``classifier.2``, ``heads.head``, ...): the layer a new task replaces."""
    for attribute in _CLASSIFIER_ATTRIBUTES:
        module = getattr(model, attribute, None)
        if isinstance(module, nn.Linear):
            return attribute
        if isinstance(module, nn.Module):
            linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                return f"{attribute}.{linears[-1]}"
    raise ValueError(f"{type(model).__name__} has no Linear classifier under "
                     f"{', '.join(_CLASSIFIER_ATTRIBUTES)}; choose a torchvision classification "
                     "model whose head is a Linear layer, e.g. resnet50, efficientnet_b0, "
                     "convnext_tiny or vit_b_16")


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """The modules a new task trains from scratch; everything else is the backbone."""
    if isinstance(model, torchvision.models.GoogLeNet):
        return GOOGLENET_HEADS
    return (classifier_name(model),)


def _builder_kwargs(arch: str, image_size: int | None) -> dict[str, object]:
    # Vision transformers learn a position embedding per patch: they are built for their size
    # (pretrained ones are interpolated to it when loaded).
    return {"image_size": image_size} if arch.startswith("vit_") and image_size else {}


def check_backbone(arch: str, image_size: int | None = None) -> None:
    """Refuse, with the fix, an arch that is no torchvision classification model with a Linear
    head (built on the meta device: no memory, no time)."""
    known = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in known or arch in ("googlenet", "inception_v3"):
        raise ValueError(f"finetune.arch {arch!r} is not a torchvision classification backbone "
                         "for fine-tuning; use one of torchvision.models.list_models(), e.g. "
                         "resnet50, efficientnet_b0, convnext_tiny or vit_b_16 (GoogLeNet and "
                         "Inception v3 train with auxiliary heads: googlenet.* trains GoogLeNet)")
    if arch.startswith("vit_") and image_size:
        patch = int(arch.rsplit("_", 1)[-1])
        if image_size % patch:
            raise ValueError(f"{arch} cuts images into {patch}-px patches: data.image_size "
                             f"{image_size} must be a multiple of {patch}, e.g. "
                             f"{max(patch, image_size - image_size % patch)}")
    with torch.device("meta"):
        classifier_name(torchvision.models.get_model(arch, **_builder_kwargs(arch, image_size)))


def build_backbone(arch: str, num_classes: int, image_size: int | None = None,
                   zero_init_residual: bool = False) -> nn.Module:
    """A torchvision classification model with ImageNet's 1000-way classifier replaced by a
    fresh ``num_classes`` one, wherever the architecture keeps it.

    The new head is a plain Linear: no activation after it, the logits must stay unclipped.
    ``zero_init_residual`` (ResNets, a random init) starts each residual branch's last
    BatchNorm at zero, so that the untrained network begins as a shallow one.
    """
    kwargs = _builder_kwargs(arch, image_size)
    if zero_init_residual and arch.startswith(_RESIDUAL_FAMILIES):
        kwargs["zero_init_residual"] = True
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    name = classifier_name(model)
    old = model.get_submodule(name)
    assert isinstance(old, nn.Linear)
    model.set_submodule(name, nn.Linear(old.in_features, num_classes))
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
    return build_backbone(spec.arch, spec.num_classes, spec.image_size)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(p == "*" or name == p or name.startswith(p + ".") or fnmatch.fnmatch(name, p)
               for p in patterns)


def set_trainable(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Freeze every parameter whose name is not under ``patterns``; return the trainable names.

    ``HEAD`` stands for the model's classifier, whatever its name (``head_modules``).

    >>> set_trainable(resnet, [HEAD])  # head only
    ['fc.weight', 'fc.bias']
    """
    patterns = list(patterns)
    if HEAD in patterns:
        patterns = [p for p in patterns if p != HEAD] + list(head_modules(model))
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


def backbone_frozen(model: nn.Module) -> bool:
    """True if no parameter outside the head trains (the head-only phase)."""
    heads = head_modules(model)
    return all(not p.requires_grad for n, p in model.named_parameters() if not _matches(n, heads))


def param_groups(
    model: nn.Module, lr: float, backbone_lr_fraction: float
) -> list[dict[str, object]]:
    """Optimizer groups: the head at ``lr``, the trainable backbone at ``lr * fraction``."""
    heads = head_modules(model)
    head, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if _matches(name, heads) else backbone).append(param)
    groups: list[dict[str, object]] = [{"params": head, "lr": lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_fraction, "name": "backbone"})
    return [g for g in groups if g["params"]]


def backbone_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` without the head's entries, a ViT's position embedding interpolated to
    the model's image size."""
    heads = head_modules(model)
    backbone = {k: v for k, v in state_dict.items() if not _matches(k, heads)}
    embedding = "encoder.pos_embedding"
    if isinstance(model, torchvision.models.VisionTransformer) and embedding in backbone \
            and backbone[embedding].shape != model.state_dict()[embedding].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        backbone = interpolate_embeddings(model.image_size, model.patch_size, backbone)
    return backbone

"""One picture stylised by optimising its pixels (Gatys et al. 2016), with the same loss module
the feed-forward network trains against."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from visionpipe.config import GatysConfig
from visionpipe.style.images import load_image, png_bytes
from visionpipe.style.loss import LossTerms, PerceptualLoss
from visionpipe.style.train import perceptual_loss
from visionpipe.training.loop import pick_device

log = logging.getLogger(__name__)


def stylize_by_optimisation(content: torch.Tensor, criterion: PerceptualLoss, cfg: GatysConfig,
                            on_step: Callable[[int, LossTerms], None] | None = None) -> torch.Tensor:
    """``content`` (``1 x 3 x H x W`` in [0, 1]) optimised ``cfg.steps`` steps from itself
    towards the style ``criterion`` holds; returns the image (clamped to [0, 1])."""
    torch.manual_seed(cfg.seed)
    content = content.detach().contiguous()
    image = content.clone().requires_grad_(True)  # L-BFGS views the gradient flat: contiguous
    last: list[LossTerms] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        terms = criterion(image, content)
        terms.total.backward()
        last[:] = [terms.detached()]
        return terms.total

    if cfg.optimizer == "lbfgs":
        optimizer: torch.optim.Optimizer = torch.optim.LBFGS([image], lr=cfg.lr, max_iter=1)
    else:
        optimizer = torch.optim.Adam([image], lr=cfg.lr)
    for step in range(1, cfg.steps + 1):
        optimizer.step(closure)
        with torch.no_grad():
            image.clamp_(0, 1)
        if on_step is not None and last:
            on_step(step, last[0])
    return image.detach()


def stylize_file(content: Path, style: Path, weights_path: Path, weights_sha256: str | None,
                 cfg: GatysConfig, output: Path,
                 on_step: Callable[[int, LossTerms], None] | None = None) -> dict[str, float]:
    """The ``stylize-image`` flow's work: ``content`` (its short side at ``cfg.image_size``)
    optimised against ``style``, written to ``output`` as PNG; returns the final loss terms."""
    device = pick_device(cfg.device)
    content_image = load_image(content, cfg.image_size).to(device)
    style_image = load_image(style, cfg.loss.style_size or cfg.image_size)
    criterion = perceptual_loss(cfg.loss, style_image, weights_path, weights_sha256, device)
    image = stylize_by_optimisation(content_image, criterion, cfg, on_step)
    with torch.no_grad():
        final = criterion(image, content_image).as_floats()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(png_bytes(image))
    return final

"""evaluate-style: the candidate's losses on held-out content images, how fast it stylises,
and a grid of held-out images before and after."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import BaseModel

from visionpipe.data import PreparedDataset, load_split
from visionpipe.style.images import grid_png, unit_range
from visionpipe.style.loss import PerceptualLoss
from visionpipe.style.network import TransformerNet


class StyleEvaluation(BaseModel):
    metrics: dict[str, float]
    grid_png: str
    heldout_images: int


def heldout_images(dataset: PreparedDataset, limit: int) -> torch.Tensor:
    """``limit`` test-split images as the dataset serves them (``N x 3 x S x S``, uint8),
    evenly spread over the split (sorted by path, so by class): always the same ones."""
    images, _ = load_split(dataset, "test")
    return images[torch.linspace(0, len(images) - 1, min(limit, len(images))).round().long()]


@torch.no_grad()
def heldout_losses(stylize: torch.nn.Module, criterion: PerceptualLoss, images: torch.Tensor,
                   batch_size: int = 16) -> dict[str, float]:
    """Mean content, style, total variation and total loss of ``stylize`` over ``images``."""
    device = next(criterion.network.parameters()).device
    sums: dict[str, float] = {}
    for start in range(0, len(images), batch_size):
        content = unit_range(images[start:start + batch_size].to(device))
        for key, value in criterion(stylize(content), content).as_floats().items():
            sums[key] = sums.get(key, 0.0) + value * len(content)
    return {f"heldout_{k}": v / max(len(images), 1) for k, v in sums.items()}


@torch.no_grad()
def images_per_second(net: TransformerNet, images: torch.Tensor, device: torch.device,
                      batch_size: int = 16, rounds: int = 3) -> float:
    """Stylisation throughput of ``net`` on ``images`` (the best of ``rounds`` passes)."""
    net = net.to(device).eval()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            net(unit_range(images[i:i + batch_size].to(device))).clamp(0, 1).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def evaluate_style(net: TransformerNet, criterion: PerceptualLoss, dataset: PreparedDataset,
                   limit: int, out_dir: Path, grid: int = 8) -> StyleEvaluation:
    """Held-out losses, images/s, and ``grid`` held-out images (spread over the split) above
    their stylised versions."""
    device = next(criterion.network.parameters()).device
    net = net.to(device).eval()
    images = heldout_images(dataset, limit)
    metrics = heldout_losses(net, criterion, images)
    metrics["stylize_images_per_s"] = images_per_second(net, images, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Spread over the split (sorted by path, so by class), not its first few images.
    picked = torch.linspace(0, len(images) - 1, min(grid, len(images))).round().long()
    shown = unit_range(images[picked].to(device))
    with torch.no_grad():
        path = grid_png([shown, net(shown)], out_dir / "style-grid.png")
    return StyleEvaluation(metrics=metrics, grid_png=str(path), heldout_images=len(images))

"""The pictures an engineer looks at before trusting a model, drawn from the evaluation's numbers.

Every function writes one PNG (matplotlib, no display) and returns its path; none computes a
metric of its own: they draw what ``evaluation`` measured, so a picture and the logged metrics
cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless workers have no display
    import matplotlib.pyplot as plt

    return plt


def per_class_bars(per_class: Mapping[str, Mapping[str, float]], title: str, path: Path) -> Path:
    """Precision, recall and F1 of each class, grouped bars."""
    plt = _pyplot()
    names = list(per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2), 3.6))
    for offset, key in zip((-0.27, 0.0, 0.27), ("precision", "recall", "f1-score"), strict=True):
        ax.bar(x + offset, [per_class[n][key] for n in names], width=0.27, label=key)
    ax.set_xticks(x, names, rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confident_errors(images: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor,
                     class_names: Sequence[str], title: str, path: Path, count: int = 16) -> Path:
    """The ``count`` test images the model got wrong with the highest probability, with their
    true and predicted class (``images``: N x 3 x S x S uint8, as the model saw them)."""
    plt = _pyplot()
    confidence, predicted = probabilities.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    chosen = wrong[confidence[wrong].argsort(descending=True)][:count].tolist()
    columns = 4
    rows = max(1, math.ceil(len(chosen) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, chosen, strict=False):
        ax.imshow(images[index].permute(1, 2, 0).numpy())
        ax.set_title(f"{class_names[int(labels[index])]} -> {class_names[int(predicted[index])]}\n"
                     f"p={float(confidence[index]):.2f}", fontsize=8)
    if not chosen:
        axes.flat[0].text(0.5, 0.5, "no error on the test split", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curves(history: Sequence[Mapping[str, Any]], title: str, path: Path) -> Path:
    """Train and val loss, val top-1 and the learning rate per epoch, phases marked."""
    plt = _pyplot()
    epochs = [int(r["epoch"]) for r in history]
    fig, (loss_ax, top1_ax, lr_ax) = plt.subplots(1, 3, figsize=(12, 3.4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val")
    loss_ax.set_title("loss")
    loss_ax.legend(fontsize="small")
    top1_ax.plot(epochs, [r["train_top1"] for r in history], marker="o", label="train")
    top1_ax.plot(epochs, [r["val_top1"] for r in history], marker="o", label="val")
    top1_ax.set_title("top-1")
    top1_ax.set_ylim(0, 1.02)
    top1_ax.legend(fontsize="small")
    lr_ax.plot(epochs, [r.get("lr", float("nan")) for r in history], marker="o")
    lr_ax.set_title("learning rate at the epoch's end")
    for ax in (loss_ax, top1_ax, lr_ax):
        ax.set_xlabel("epoch")
        for start in [r["epoch"] for r in history if r.get("phase_epoch") == 1][1:]:
            ax.axvline(start - 0.5, color="grey", linestyle=":")  # a new phase begins
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def first_conv_weight(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The first convolution over the image's 3 channels: out x 3 x k x k."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    for name, tensor in state.items():
        if name.endswith("weight") and tensor.dim() == 4 and tensor.shape[1] == 3:
            return tensor.detach().float().cpu()
    raise ValueError("no convolution over 3 input channels in these weights")


def filter_grids(weights: Mapping[str, torch.Tensor], path: Path, limit: int = 64) -> Path:
    """Side by side, each model's first-layer filters as a grid of colour patches (the study
    notes' picture of what early layers learn: edges and colours when trained, noise when not)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(weights), figsize=(4.2 * len(weights), 4.4), squeeze=False)
    for ax, (label, weight) in zip(axes.flat, weights.items(), strict=True):
        ax.imshow(_grid(weight[:limit]))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _grid(filters: torch.Tensor) -> np.ndarray:
    """out x 3 x k x k filters, each scaled to [0, 1] on its own, tiled with a 1-px border."""
    count, _, k, _ = filters.shape
    low = filters.amin(dim=(1, 2, 3), keepdim=True)
    high = filters.amax(dim=(1, 2, 3), keepdim=True)
    scaled = ((filters - low) / (high - low).clamp_min(1e-8)).permute(0, 2, 3, 1).numpy()
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.ones((rows * (k + 1) + 1, columns * (k + 1) + 1, 3))
    for index in range(count):
        r, c = divmod(index, columns)
        grid[1 + r * (k + 1):1 + r * (k + 1) + k, 1 + c * (k + 1):1 + c * (k + 1) + k] = scaled[index]
    return grid


def histogram(values: Sequence[float], title: str, path: Path, bins: int = 20) -> Path:
    """A histogram of ``values`` in [0, 1] (prediction confidences)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(list(values), bins=bins, range=(0, 1))
    ax.set_xlabel("probability of the predicted class")
    ax.set_ylabel("images")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

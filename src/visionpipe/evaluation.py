"""Score a trained checkpoint on the held-out test split: metrics, confusion matrix, throughput."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel
from sklearn.metrics import classification_report, confusion_matrix, f1_score

from visionpipe import figures
from visionpipe.config import FastPathConfig
from visionpipe.data import PreparedDataset, build_loader, load_split
from visionpipe.models import ModelSpec, build_model, inference_weights
from visionpipe.training.checkpoint import load_checkpoint
from visionpipe.training.fastpath import resolve_fast_path
from visionpipe.training.loop import apply_fast_path, pick_device, predict_logits

log = logging.getLogger(__name__)


class Evaluation(BaseModel):
    """One candidate's scores on the test split and where its reports were written."""

    candidate: str
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion_csv: str
    confusion_png: str
    report_json: str
    # Pictures of the same evaluation: per-class bars, the most confident errors, training
    # curves (when the history is given), each a PNG path.
    figures: dict[str, str] = {}
    errors_shown: int = 0  # images in the most-confident-errors grid


def load_trained_model(checkpoint: Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the inference network of a checkpoint (auxiliary heads dropped) in eval mode."""
    state = load_checkpoint(checkpoint)
    spec = ModelSpec.model_validate_json(state["spec"])
    model = build_model(spec)
    weights = inference_weights(state["model"])  # auxiliary heads exist only in training
    model.load_state_dict(weights)
    return model.eval(), spec


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    topk = logits.topk(k, dim=1).indices
    return float((topk == labels[:, None]).any(dim=1).float().mean())


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]
) -> tuple[dict[str, float], dict[str, dict[str, float]], np.ndarray]:
    """Top-1, top-5 (five classes or more), macro-F1, per-class P/R/F1 and the confusion matrix."""
    preds = logits.argmax(1).numpy()
    y = labels.numpy()
    ids = list(range(len(class_names)))
    metrics = {"top1": top_k_accuracy(logits, labels, 1),
               "macro_f1": float(f1_score(y, preds, labels=ids, average="macro", zero_division=0))}
    if len(class_names) >= 5:
        metrics["top5"] = top_k_accuracy(logits, labels, 5)
    report = classification_report(y, preds, labels=ids, target_names=class_names,
                                   output_dict=True, zero_division=0)
    per_class = {name: {k: float(report[name][k]) for k in ("precision", "recall", "f1-score")}
                 for name in class_names}
    return metrics, per_class, confusion_matrix(y, preds, labels=ids)


def evaluate_checkpoint(
    candidate: str, checkpoint: Path, dataset: PreparedDataset, batch_size: int, out_dir: Path,
    device: str = "auto", history: list[dict[str, Any]] | None = None,
) -> Evaluation:
    """Score ``checkpoint`` on ``dataset``'s test split and write CSV, PNG and JSON reports,
    and the pictures of the same numbers (training curves too, given the run's ``history``)."""
    dev = pick_device(device)
    model, spec = load_trained_model(checkpoint)
    # Scored in float32 (no bf16 autocast), in the device's memory format for convolutions.
    fast = resolve_fast_path(FastPathConfig(autocast_bf16=False, compile=False), dev.type)
    model = apply_fast_path(model.to(dev), fast)
    images, targets = load_split(dataset, "test")  # N x 3 x S x S uint8, as the model sees them
    loader = build_loader(images, targets, batch_size=batch_size, shuffle=False,
                          augment=False, seed=0)
    start = time.perf_counter()
    logits, labels = predict_logits(model, loader, dev, fast)
    seconds = time.perf_counter() - start
    metrics, per_class, matrix = classification_metrics(logits, labels, spec.class_names)
    metrics["images_per_s"] = len(labels) / seconds if seconds > 0 else 0.0
    metrics["eval_seconds"] = seconds
    metrics["test_images"] = float(len(labels))
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = _write_confusion(matrix, spec.class_names, candidate, out_dir)
    report = out_dir / f"{candidate}-metrics.json"
    report.write_text(json.dumps({"metrics": metrics, "per_class": per_class}, indent=2))
    pictures = {"per_class": figures.per_class_bars(
        per_class, f"{candidate}: per class on the test split", out_dir / f"{candidate}-per-class.png")}
    probabilities = torch.softmax(logits, dim=1)
    errors_shown = min(16, int((probabilities.argmax(1) != labels).sum()))
    pictures["errors"] = figures.confident_errors(
        images, labels, probabilities, spec.class_names,
        f"{candidate}: the {errors_shown} most confident errors", out_dir / f"{candidate}-errors.png")
    if history:
        pictures["curves"] = figures.training_curves(
            history, f"{candidate}: training", out_dir / f"{candidate}-curves.png")
    return Evaluation(candidate=candidate, metrics=metrics, per_class=per_class,
                      confusion_csv=str(csv_path), confusion_png=str(png_path), report_json=str(report),
                      figures={k: str(v) for k, v in pictures.items()}, errors_shown=errors_shown)


def filters_figure(starts: dict[str, Path], checkpoints: dict[str, Path], path: Path) -> Path:
    """First-layer filters side by side: each starting point (``starts``, state dict files:
    pretrained weights or a random init) and each trained candidate (``checkpoints``)."""
    weights = {label: figures.first_conv_weight(torch.load(p, map_location="cpu", weights_only=True))
               for label, p in starts.items()}
    for label, checkpoint in checkpoints.items():
        weights[label] = figures.first_conv_weight(load_checkpoint(checkpoint)["model"])
    return figures.filter_grids(weights, path)


def _write_confusion(matrix: np.ndarray, names: list[str], candidate: str,
                     out_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless workers have no display
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    csv_path = out_dir / f"{candidate}-confusion.csv"
    pd.DataFrame(matrix, index=names, columns=names).to_csv(csv_path)
    png_path = out_dir / f"{candidate}-confusion.png"
    side = max(4.0, 0.5 * len(names))
    fig, ax = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=ax, colorbar=False)
    ax.set_title(f"{candidate}: test split")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path

"""Metrics on known logits, and the reports written for a checkpoint."""

from __future__ import annotations

import pytest
import torch

from visionpipe.evaluation import classification_metrics, top_k_accuracy


def test_top_k_and_macro_f1_on_known_predictions() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    logits = torch.full((6, 5), -1.0)
    for row, (first, second) in enumerate([(0, 1), (1, 0), (3, 2), (3, 1), (0, 4), (0, 2)]):
        logits[row, first], logits[row, second] = 2.0, 1.0
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(4 / 6)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(1.0)
    metrics, per_class, matrix = classification_metrics(logits, labels, list("abcde"))
    assert metrics["top1"] == pytest.approx(4 / 6) and "top5" in metrics
    assert per_class["c"]["recall"] == 0.0 and per_class["a"]["recall"] == 1.0
    assert matrix.sum() == 6 and matrix[2, 3] == 1 and matrix[4, 0] == 1
    assert 0 < metrics["macro_f1"] < 1


def test_top5_only_with_five_classes_or_more() -> None:
    metrics, _, _ = classification_metrics(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), list("abc"))
    assert "top5" not in metrics

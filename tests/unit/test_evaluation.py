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


def _png_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_the_pictures_draw_the_evaluations_own_numbers(vp_home: object, tmp_path: object) -> None:
    from pathlib import Path

    import pandas as pd

    from visionpipe.config import DataConfig, FinetuneConfig, Phase
    from visionpipe.data import load_split, prepare_dataset
    from visionpipe.evaluation import evaluate_checkpoint, filters_figure
    from visionpipe.models import build_backbone
    from visionpipe.training.finetune import finetune

    out = Path(str(tmp_path))
    dataset = prepare_dataset(DataConfig(max_per_class=8, image_size=32))
    torch.manual_seed(0)
    torch.save(build_backbone("resnet18", 1000).state_dict(), out / "start.pth")
    cfg = FinetuneConfig(arch="resnet18", batch_size=16, phases=[
        Phase(name="head", trainable=["fc"], epochs=1, lr=0.05),
        Phase(name="full", trainable=["*"], epochs=1, lr=0.01)])
    result = finetune(cfg, dataset, out / "start.pth", out / "run")
    evaluation = evaluate_checkpoint("resnet18", Path(result.best_checkpoint), dataset, 64,
                                     out / "eval", history=result.history)
    test_count = len(load_split(dataset, "test")[1])
    confusion = pd.read_csv(evaluation.confusion_csv, index_col=0)
    assert int(confusion.to_numpy().sum()) == test_count == evaluation.metrics["test_images"]
    wrong = test_count - round(evaluation.metrics["top1"] * test_count)
    assert evaluation.errors_shown == min(16, wrong)
    assert set(evaluation.figures) == {"per_class", "errors", "curves"}
    widths = {name: _png_size(path)[0] for name, path in evaluation.figures.items()}
    assert widths["curves"] == 1200 and widths["errors"] == 960  # 12 and 9.6 inches at 100 dpi
    # Each record holds the rate its epoch ended at: a one-epoch phase's cosine ends at zero.
    assert [r["lr"] for r in result.history] == [pytest.approx(0.0, abs=1e-12)] * 2
    filters = filters_figure({"start": out / "start.pth"}, {"trained": Path(result.best_checkpoint)},
                             out / "filters.png")
    assert _png_size(str(filters)) == (840, 440)  # two panels of 4.2 x 4.4 inches


def test_the_model_card_says_random_init_loudly_and_what_the_gate_decided() -> None:
    from visionpipe.data import PreparedDataset
    from visionpipe.registry import GateDecision, Registration, model_card

    dataset = PreparedDataset(name="photos", version="abc123", root="/r", manifest_path="/m",
                              report_path="/p", class_names=["a", "b"], num_classes=2,
                              split_counts={"train": 10, "val": 2, "test": 4}, image_size=64,
                              recipe="photo")
    decision = GateDecision(promoted=True, metric="top1", candidate="finetune-resnet50",
                            candidate_version="4", candidate_score=0.75, champion_version="2",
                            champion_score=0.5, reason="candidate top1 0.7500 beats champion",
                            rule="beats")
    mine = Registration(candidate="finetune-resnet50", model_name="m", version="4",
                        model_uri="models:/m/4", run_id="r")
    card = model_card(mine, {"top1": 0.75, "macro_f1": 0.7}, dataset,
                      {"arch": "resnet50", "weights_source": "random-init"}, decision)
    assert "`photos` version `abc123`" in card and "10 train, 2 val, 4 test" in card
    assert "photo recipe at 64 px" in card and "**RANDOM INIT" in card
    assert "top1 0.7500, macro_f1 0.7000" in card
    assert "promoted (rule `beats`)" in card and "champion before 0.5000 (v2)" in card
    other = mine.model_copy(update={"candidate": "scratch-googlenet", "version": "5"})
    card = model_card(other, {"top1": 0.6}, dataset, {"weights_source": "scratch"}, decision)
    assert "trained from scratch" in card and "not the gate's candidate: version 4" in card


def test_the_scoring_report_counts_every_scored_image_once() -> None:
    import pandas as pd

    from visionpipe.scoring import _summary, report_markdown

    scored = pd.DataFrame({
        "path": [f"x/{i}.png" for i in range(6)], "folder": ["a", "a", "b", "b", "b", "x"],
        "label": [0, 0, 1, 1, 0, -1], "class_name": ["a", "a", "b", "b", "a", ""],
        "probability": [0.95, 0.55, 0.99, 0.31, 0.42, 0.0], "error": [""] * 5 + ["broken"]})
    summary = _summary(scored, "models:/m@champion", "/src", "/out.parquet")
    assert sum(summary.confidence_histogram) == 5 and summary.confidence_histogram[9] == 2
    assert [r["path"] for r in summary.least_confident][:3] == ["x/3.png", "x/4.png", "x/1.png"]
    report = report_markdown(summary)
    assert "| 0.9-1.0 | 2 |" in report and "| `x/3.png` | b | 0.310 |" in report
    assert "- unreadable: 1" in report

"""The report printed at the end of a run, and the champion decision artifact, name the
configured alias; the report names a real image."""

from __future__ import annotations

from visionpipe.registry import GateDecision
from visionpipe.summary import PipelineSummary


def _summary(**changes: object) -> PipelineSummary:
    decision = GateDecision(promoted=True, metric="top1", candidate="scratch-googlenet",
                            candidate_version="3", candidate_score=0.9, champion_version="2",
                            champion_score=0.8, reason="beats", rule="beats")
    values: dict[str, object] = {
        "model_name": "digits-classifier", "dataset_version": "abc", "decision": decision,
        "metrics": {"scratch-googlenet": {"top1": 0.9}}, "champion_version": "3",
        "mlflow_ui": "mlflow ui", "tracking_uri": "sqlite:///x.db", "random_init": False,
        "alias": "production", "example_image": "/state/datasets/digits/3/0003.png"}
    return PipelineSummary.model_validate({**values, **changes})


def test_the_summary_names_the_configured_alias_and_an_image_the_run_left() -> None:
    text = _summary().render()
    assert "production: version 3 (promoted v3: beats)" in text
    assert 'models:/digits-classifier@production' in text and "@champion" not in text
    assert 'open("/state/datasets/digits/3/0003.png", "rb")' in text


def test_with_no_champion_the_summary_offers_nothing_to_load() -> None:
    text = _summary(champion_version=None).render()
    assert "No version holds the 'production' alias yet" in text
    assert "pyfunc.load_model" not in text


def test_the_champion_decision_artifact_names_the_configured_alias() -> None:
    from tasks.register import decision_markdown

    text = decision_markdown(_summary().decision, "digits-classifier", "production")
    assert text.startswith("# `digits-classifier`: @production moved to version 3")
    assert "| @production before | 2 | 0.8000 |" in text and "champion" not in text

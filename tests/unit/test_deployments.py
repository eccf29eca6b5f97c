"""The deployments carry the schedule and the parameters their users expect."""

from __future__ import annotations

from deployments.serve import deployments
from visionpipe.config import PipelineConfig


def test_nightly_is_scheduled_in_a_timezone_and_on_demand_runs_offline() -> None:
    by_name = {(d.flow_name, d.name): d for d in deployments()}
    nightly = by_name[("train-image-classifiers", "nightly")]
    schedule = nightly.schedules[0].schedule
    assert schedule.cron == "0 2 * * *" and schedule.timezone == "Europe/Berlin"
    config = PipelineConfig.model_validate(nightly.parameters["config"])
    assert config.data.source.startswith("s3://") and config.weights.on_unavailable == "fail"
    on_demand = by_name[("train-image-classifiers", "on-demand")]
    assert not on_demand.schedules
    assert PipelineConfig.model_validate(on_demand.parameters["config"]).weights.on_unavailable == "random-init"
    # The UI form comes from the pydantic model: enums and bounds are in the schema.
    schema = on_demand._parameter_openapi_schema.model_dump()
    assert "FinetuneConfig" in str(schema["definitions"]) and "resnet50" in str(schema)
    assert ("score-images", "on-demand") in by_name

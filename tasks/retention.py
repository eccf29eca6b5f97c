"""retention: the flow run is over; old checkpoints and unused dataset versions go."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.common import retry_transient, run_logger
from visionpipe import retention
from visionpipe.config import RetentionConfig
from visionpipe.tracking import TrackingContext


@task(name="retention", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def apply_retention(cfg: RetentionConfig, context: TrackingContext) -> retention.RetentionReport | None:
    """Mark this flow run finished, then remove what ``cfg`` no longer keeps."""
    retention.mark_run_finished(context.flow_run_id)
    if not cfg.enabled:
        return None
    report = retention.apply_retention(cfg)
    run_logger().info("retention: %s", report.render().splitlines()[0])
    create_markdown_artifact(key="retention", description=report.render().splitlines()[0],
                             markdown="```\n" + report.render() + "\n```")
    return report

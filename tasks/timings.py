"""record-timings: where the run's wall time went, per stage and inside the loops."""

from __future__ import annotations

from datetime import datetime, timezone
from uuid import UUID

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from visionpipe import tracking
from visionpipe.evaluation import Evaluation
from visionpipe.summary import RunTimings
from visionpipe.tracking import TrackingContext
from visionpipe.training.result import Candidate


@task(name="record-timings", retries=2, retry_delay_seconds=[2, 10])
def record_timings(candidates: list[Candidate], evaluations: list[Evaluation],
                   context: TrackingContext) -> RunTimings:
    """Stage wall times from Prefect's task runs, loop time from the stages' own clocks."""
    start, stages = _stage_seconds(context.flow_run_id)
    loops = (sum(c.result.loop_seconds for c in candidates)
             + sum(e.metrics.get("eval_seconds", 0.0) for e in evaluations))
    flow_seconds = (datetime.now(timezone.utc) - start).total_seconds() if start else sum(stages.values())
    timings = RunTimings(stages=stages, loop_seconds=loops, flow_seconds=flow_seconds)
    tracking.log_metrics(context.parent_run_id, {
        **{f"stage_seconds.{name}": s for name, s in stages.items()},
        "loop_seconds": loops, "flow_seconds": flow_seconds})
    create_table_artifact(
        key="stage-timings", description="wall time per stage of this flow run",
        table=[{"stage": name, "seconds": round(s, 1)} for name, s in stages.items()]
        + [{"stage": "(training and evaluation loops)", "seconds": round(loops, 1)},
           {"stage": "(flow run)", "seconds": round(flow_seconds, 1)}])
    return timings


def _stage_seconds(flow_run_id: str) -> tuple[datetime | None, dict[str, float]]:
    """The flow run's start and the summed wall time of each task's runs."""
    with get_client(sync_client=True) as client:
        start = client.read_flow_run(UUID(flow_run_id)).start_time
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    stages: dict[str, float] = {}
    for run in runs:
        if run.start_time and run.end_time:
            name = run.name.rsplit("-", 1)[0]
            stages[name] = stages.get(name, 0.0) + (run.end_time - run.start_time).total_seconds()
    return start, stages

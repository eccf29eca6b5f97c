"""Open and close the MLflow parent run of one flow run."""

from __future__ import annotations

from prefect import runtime, task
from prefect.client.schemas.objects import Flow, FlowRun, State

from tasks.common import per_flow_run
from visionpipe import faults, tracking
from visionpipe.config import PipelineConfig, StyleConfig
from visionpipe.tracking import TrackingContext


@task(name="open-tracking-run", retries=3, retry_delay_seconds=[2, 10, 30],
      cache_key_fn=per_flow_run, persist_result=True)
def open_tracking_run(config: PipelineConfig | StyleConfig) -> TrackingContext:
    """One MLflow parent run per flow run (named after the flow and the flow run), tagged with
    the flow run and the git commit."""
    flow_run_id = str(runtime.flow_run.id or "local")
    experiment_id = tracking.ensure_experiment(config.experiment)
    name = f"{runtime.flow_run.flow_name or 'local'}/{runtime.flow_run.name or 'local'}"
    tags = {"prefect.flow_run_id": flow_run_id, "git_commit": tracking.git_commit()}
    if runtime.flow_run.id:  # a retry continues the run its first attempt created
        run_id = tracking.find_or_start_run(experiment_id, name, tags, "prefect.flow_run_id")
    else:
        run_id = tracking.start_run(experiment_id, name, tags=tags)
    faults.inject("raise", "open-tracking-run")  # test hook: a failure once the run exists
    tracking.log_config(run_id, config)
    return TrackingContext(experiment_id=experiment_id, parent_run_id=run_id, flow_run_id=flow_run_id)


@task(name="close-tracking-run", retries=3, retry_delay_seconds=[2, 10, 30])
def close_tracking_run(context: TrackingContext, failed: bool = False) -> None:
    tracking.end_run(context.parent_run_id, failed=failed)


def fail_tracking_runs(flow_: Flow, flow_run: FlowRun, state: State) -> None:
    """A flow's on_failure / on_crashed hook: its MLflow runs still open are marked failed."""
    tracking.fail_runs_of_flow_run(str(flow_run.id))

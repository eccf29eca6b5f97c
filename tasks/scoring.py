"""Tasks of the score-images flow."""

from __future__ import annotations

import uuid

from prefect import runtime, task
from prefect.artifacts import create_markdown_artifact

from tasks.common import retry_transient
from visionpipe import faults, tracking
from visionpipe.scoring import ScoringSummary, report_markdown, score_images


@task(name="score-images", retries=3, retry_delay_seconds=[5, 30, 120],
      retry_condition_fn=retry_transient)
def score_images_task(model_uri: str, source: str, output: str, batch_size: int) -> ScoringSummary:
    """Predict every image of the source with the registered model; retried on I/O errors."""
    return score_images(model_uri, source, output, batch_size)


@task(name="record-scoring", retries=3, retry_delay_seconds=[2, 10, 30])
def record_scoring(summary: ScoringSummary, experiment: str) -> str:
    """One MLflow run per scoring job, and a Prefect artifact with the same summary."""
    experiment_id = tracking.ensure_experiment(experiment)
    # Tagged with this task run: a retry (the same task run) continues its first attempt's run.
    run_id = tracking.find_or_start_run(experiment_id, "score-images", {
        "model_uri": summary.model_uri, "source": summary.source, "output": summary.output,
        "prefect.task_run_id": str(runtime.task_run.id or uuid.uuid4())}, "prefect.task_run_id")
    metrics = {"images": summary.images, "unreadable": summary.unreadable,
               "mean_probability": summary.mean_probability}
    if summary.folder_accuracy is not None:
        metrics["folder_accuracy"] = summary.folder_accuracy
    tracking.log_metrics(run_id, metrics)
    tracking.end_run(run_id)
    faults.inject("raise", "record-scoring")  # test hook: a failure once the run is complete
    create_markdown_artifact(key="scoring-summary", markdown=report_markdown(summary),
                             description=f"{summary.images} images scored")
    return run_id

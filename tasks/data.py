"""prepare-dataset: ingest, validate, split and version the images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from tasks.common import retry_transient, run_logger
from visionpipe import retention, tracking
from visionpipe.config import DataConfig
from visionpipe.data import PreparedDataset, prepare_dataset, source_fingerprint
from visionpipe.tracking import TrackingContext


def _dataset_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    # The source's cheap fingerprint (listing, sizes, ETags) stands for its content: a changed
    # folder or bucket gets a new key, an unchanged one reuses the prepared manifest.
    return f"prepare-dataset-{source_fingerprint(parameters['cfg'])}"


@task(name="prepare-dataset", cache_key_fn=_dataset_cache_key, persist_result=True,
      retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def prepare_dataset_task(cfg: DataConfig) -> PreparedDataset:
    """Materialise the source, validate every image, split it and write a versioned manifest."""
    dataset = prepare_dataset(cfg)
    excluded, markdown = dataset_report(dataset)
    run_logger().info("dataset %s version %s: %s; %d file(s) excluded", dataset.name,
                      dataset.version, dataset.split_counts, len(excluded))
    create_markdown_artifact(key="dataset-report", markdown=markdown,
                             description=f"{dataset.name} {dataset.version}")
    return dataset


def prepare_dataset_cached(cfg: DataConfig) -> PreparedDataset:
    """prepare-dataset, cached; prepared anew if the cached result's files were deleted since."""
    dataset = prepare_dataset_task(cfg)
    if not dataset.is_available():
        run_logger().warning("the cached dataset %s is gone from %s; preparing it again",
                             dataset.version, dataset.root)
        dataset = prepare_dataset_task.with_options(refresh_cache=True)(cfg)
    return dataset


@task(name="log-dataset", retries=3, retry_delay_seconds=[2, 10, 30])
def log_dataset(dataset: PreparedDataset, context: TrackingContext) -> None:
    """Record the manifest as the parent run's input (``mlflow.log_input``) and its report."""
    tracking.log_dataset_input(context.parent_run_id, pd.read_parquet(dataset.manifest_path),
                               source=dataset.manifest_path, name=f"{dataset.name}@{dataset.version}")
    tracking.set_tags(context.parent_run_id, {"dataset_version": dataset.version,
                                              "dataset_name": dataset.name})
    tracking.log_artifact(context.parent_run_id, Path(dataset.report_path), "dataset")
    # Retention keeps this version and this flow run's checkpoints while the run is in progress.
    retention.mark_dataset_used(dataset.name, dataset.version)
    retention.mark_run_started(context.flow_run_id, dataset.version)


def dataset_report(dataset: PreparedDataset) -> tuple[list[dict[str, str]], str]:
    """The files validation excluded, read from the dataset's report.json, and its markdown.

    prepare_dataset writes them under ``report["validation"]["excluded"]`` (one
    ``{"path", "reason"}`` per file), not at the top level.
    """
    report = json.loads(Path(dataset.report_path).read_text())
    excluded = list(report.get("validation", {}).get("excluded", []))
    return excluded, _report_markdown(dataset, excluded)


def _report_markdown(dataset: PreparedDataset, excluded: list[Any]) -> str:
    lines = [f"# Dataset `{dataset.name}` version `{dataset.version}`", "",
             f"Classes: {dataset.num_classes}; splits: {dataset.split_counts}", ""]
    if excluded:
        lines += ["## Excluded files", "", "| file | reason |", "|---|---|"]
        lines += [f"| {e.get('path', e)} | {e.get('reason', '')} |" for e in excluded[:50]
                  if isinstance(e, dict)]
    return "\n".join(lines)

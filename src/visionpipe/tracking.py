"""MLflow runs addressed by id, so concurrent tasks and DDP ranks never share hidden state."""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from visionpipe import settings, templates
from visionpipe.redaction import redact
from visionpipe.errors import TrackingUnavailable

log = logging.getLogger(__name__)


class TrackingContext(BaseModel):
    """Ids every stage of one flow run needs to log into the right place."""

    experiment_id: str
    parent_run_id: str
    flow_run_id: str


def configure_tracking() -> str:
    """Point the fluent MLflow API at the configured server or the embedded SQLite database."""
    uri = settings.tracking_uri()
    if uri == settings.embedded_tracking_uri():
        # A new state folder's database starts from the install's migrated one.
        templates.seed_file(settings.embedded_tracking_db(), _mlflow_template())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@functools.cache
def _mlflow_template() -> Path:
    return templates.mlflow_template_path()


def client() -> MlflowClient:
    uri = configure_tracking()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "postgresql", "mysql", "file:")) or "://" not in uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it; on a local database its artifacts go to the state folder.

    This is the first call a flow run makes to MLflow: an unreachable server fails here, named.
    """
    uri = settings.tracking_uri()
    try:
        return _ensure_experiment(name)
    except (MlflowException, OSError) as exc:
        if _is_local_store(uri):
            raise
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise TrackingUnavailable(
            f"cannot reach the MLflow tracking server at {redact(uri)} ({redact(reason)}); start "
            "it, fix MLFLOW_TRACKING_URI, or unset it to use the embedded SQLite store"
        ) from exc


def _ensure_experiment(name: str) -> str:
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        eid = experiment.experiment_id
        # A deleted experiment keeps its name but takes no runs; deleting it was someone's choice.
        raise ValueError(
            f"the MLflow experiment {name!r} (id {eid}) is deleted, so no run can be logged to "
            f"it. Fix: restore it (mlflow experiments restore --experiment-id {eid}, or in the "
            f"MLflow UI), remove it for good (mlflow gc --experiment-ids {eid}), or choose "
            "another experiment name")
    if experiment is not None:
        return str(experiment.experiment_id)
    location = None
    if _is_local_store(settings.tracking_uri()):
        # Without a tracking server, MLflow would write artifacts to ./mlruns of whatever folder
        # the process started in; keep them under VISIONPIPE_HOME instead.
        location = (settings.artifact_root() / name).as_uri()
    return str(mlflow_client.create_experiment(name, artifact_location=location))


def start_run(experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    """Create a run (nested under ``parent_run_id`` if given) and return its id; it stays open."""
    all_tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client().create_run(experiment_id, run_name=name, tags=all_tags)
    return str(run.info.run_id)


def resume_or_start_run(experiment_id: str, name: str, parent_run_id: str,
                        tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The nested run ``name`` of this parent (a retried task continues it), or a new one."""
    found = _reopen(experiment_id,
                    f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.mlflow.runName = '{name}'")
    if found:
        return found, True
    return start_run(experiment_id, name, parent_run_id, tags), False


def find_or_start_run(experiment_id: str, name: str, tags: Mapping[str, str], key: str) -> str:
    """The run of ``experiment_id`` tagged ``key`` = ``tags[key]``, reopened, or a new one.

    A retried task whose first attempt created its run and then failed continues that run
    instead of leaving it RUNNING beside a second one.
    """
    return (_reopen(experiment_id, f"tags.`{key}` = '{tags[key]}'")
            or start_run(experiment_id, name, tags=tags))


def _reopen(experiment_id: str, filter_string: str) -> str | None:
    """The id of the run that ``filter_string`` finds, marked RUNNING again; None if none."""
    found = client().search_runs([experiment_id], filter_string, max_results=1)
    if not found:
        return None
    client().update_run(found[0].info.run_id, status="RUNNING")
    return str(found[0].info.run_id)


def end_run(run_id: str, failed: bool = False) -> None:
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    client().set_terminated(run_id, status=status)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as dotted MLflow params, with URL secrets redacted."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = redact(json.dumps(value) if isinstance(value, (list, dict)) else str(value))[:6000]
    return flat


def log_config(run_id: str, config: BaseModel, name: str = "config") -> None:
    """Record a stage config as params and as a JSON artifact."""
    mlflow_client = client()
    params = flatten(config.model_dump(mode="json"))
    items = list(params.items())
    for start in range(0, len(items), 100):
        batch = [mlflow.entities.Param(k, v) for k, v in items[start:start + 100]]
        mlflow_client.log_batch(run_id, params=batch)
    mlflow_client.log_text(run_id, redact(config.model_dump_json(indent=2)), f"{name}.json")


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics in one batch."""
    now = int(time.time() * 1000)
    batch = [mlflow.entities.Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    client().log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, redact(str(value)))


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_dataset_input(run_id: str, frame: Any, source: str, name: str) -> None:
    """``mlflow.log_input`` for a manifest DataFrame, addressed by run id."""
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    dataset = from_pandas(frame, source=source, name=name, targets="label")
    entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
    client().log_inputs(run_id, datasets=[entry])


def git_commit() -> str:
    """The commit of the working tree this code runs from, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_ui_command() -> str:
    """The command that opens the MLflow UI on the configured store (secrets redacted)."""
    uri = settings.tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)}"
    return f"mlflow ui --backend-store-uri {redact(uri)} --port 5000"


def fail_runs_of_flow_run(flow_run_id: str) -> None:
    """Mark every still-running MLflow run of a Prefect flow run as failed."""
    mlflow_client = client()
    parents = mlflow_client.search_runs(
        experiment_ids=[e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    for parent in parents:
        children = mlflow_client.search_runs(
            experiment_ids=[parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        )
        for run in [parent, *children]:
            if run.info.status == "RUNNING":
                end_run(run.info.run_id, failed=True)


def log_params(run_id: str, params: Mapping[str, str]) -> None:
    batch = [mlflow.entities.Param(k, redact(str(v))) for k, v in params.items()]
    client().log_batch(run_id, params=batch)

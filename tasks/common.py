"""Helpers shared by the tasks: which failures are worth a retry, and Prefect-side logging."""

from __future__ import annotations

import logging
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.utilities.hashing import hash_objects

from visionpipe.errors import is_transient


def retry_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only failures that a second attempt can fix (``visionpipe.errors.is_transient``)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified, not handled
        return is_transient(exc)
    return False


def per_flow_run(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key: this flow run and the task's inputs (dataset version, weights digest, config).

    A retried or re-run flow run skips the stages it already finished; a new flow run (tonight's
    schedule) trains anew.
    """
    return f"{context.task.name}-{context.task_run.flow_run_id}-{hash_objects(parameters)}"


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    return get_run_logger()

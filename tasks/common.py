"""Helpers shared by the tasks: which failures are worth a retry, and Prefect-side logging."""

from __future__ import annotations

import logging
from typing import Any

import torch
from prefect import Task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.utilities.hashing import hash_objects

# Errors that come from the input or the code: a retry would fail the same way.
DETERMINISTIC: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, LookupError,
                                                  NotImplementedError, AssertionError,
                                                  # handled once inside the task (half the batch)
                                                  torch.OutOfMemoryError)


def _deterministic_types() -> tuple[type[BaseException], ...]:
    from visionpipe.data import DatasetError
    from visionpipe.training.checkpoint import CheckpointError
    from visionpipe.weights import WeightsError, WeightsUnavailable

    # Unreachable weight sources were already retried with backoff inside the fetch.
    return (*DETERMINISTIC, DatasetError, WeightsError, WeightsUnavailable, CheckpointError)


def retry_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only failures that a second attempt can fix (network, storage, killed processes)."""
    from tasks.multinode import NodeRunFailed
    from visionpipe.training.launch import LaunchError

    try:
        state.result()
    except (LaunchError, NodeRunFailed) as exc:
        return exc.transient  # a killed or preempted rank yes; a rank's ValueError no
    except _deterministic_types():
        return False
    except Exception:  # noqa: BLE001 - anything else (OSError, S3, rendezvous) may be transient
        return True
    return False


def per_flow_run(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key: this flow run and the task's inputs (dataset version, weights digest, config).

    A retried or re-run flow run skips the stages it already finished; a new flow run (tonight's
    schedule) trains anew.
    """
    return f"{context.task.name}-{context.task_run.flow_run_id}-{hash_objects(parameters)}"


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    return get_run_logger()

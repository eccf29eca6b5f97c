"""What a training task holds while it runs: its compute, and the stop its flow run may set."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency

from visionpipe.training.jobs import has_cuda

_CPU_TRAINING = threading.Lock()

# The stop of the GoogLeNet launch started by each flow run, by flow run id: what the flow sets
# when a stage it waits for fails while GoogLeNet trains. Not a task parameter: those are hashed
# into the cache key. Each start of the flow run (a retry too) gets a new, unset one; a task
# called on its own finds none.
_STOPS: dict[str, threading.Event] = {}


@contextmanager
def compute_slots(count: int) -> Iterator[None]:
    """Hold the compute a training needs while it runs.

    On GPUs: ``count`` slots of the Prefect global concurrency limit ``gpu``, when it exists.
    On the CPU: this process's one training slot, since two trainings on a few cores only make
    each other's threads wait (OpenMP spins), and together finish later than one after the other.
    """
    if has_cuda():
        with concurrency("gpu", occupy=count, strict=False):
            yield
        return
    with _CPU_TRAINING:
        yield


def new_stop(flow_run_id: str) -> threading.Event:
    """A new, unset stop for the launches of this flow run."""
    stop = _STOPS[flow_run_id] = threading.Event()
    return stop


def launch_stop(flow_run_id: str) -> threading.Event | None:
    """The stop a launch of this flow run polls; None when the flow set none."""
    return _STOPS.get(flow_run_id)


def forget_stop(flow_run_id: str) -> None:
    """The flow run's trainings are over: its stop is no longer needed."""
    _STOPS.pop(flow_run_id, None)

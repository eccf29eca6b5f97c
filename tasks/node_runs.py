"""The parent's view of a multi-node launch's node runs: wait for them, name a failure, cancel.

Node runs are flow runs of the ``ddp-node`` deployment (``flows/ddp_node.py``); this module
reads and sets their states through the Prefect client, which the library never imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelled, Cancelling

from tasks.common import run_logger
from visionpipe.errors import (
    NODE_FAILED_DETERMINISTIC,
    NODE_FAILED_TRANSIENT,
    LaunchTimeout,
    NodeRunFailed,
)

_FAILED = {StateType.FAILED, StateType.CRASHED, StateType.CANCELLED, StateType.CANCELLING}
_NOT_STARTED = {StateType.SCHEDULED, StateType.PENDING, StateType.PAUSED}
# After cancelling: longer than a worker's grace period (30 s) plus torchrun's teardown (20 s).
CANCEL_WAIT_S = 90.0


def wait_for_nodes(runs: list[FlowRun], min_nodes: int, finished: Callable[[], bool], deadline: float,
          poll_s: float = 2.0) -> None:
    """Until every node run completed; raise as soon as one fails.

    In an elastic range, once at least ``min_nodes`` completed and global rank 0's result is
    there (``finished``), the node runs still waiting or starting late are cancelled: the world
    trained without them.
    """
    logger = run_logger()
    reported: dict[UUID, StateType] = {}
    with get_client(sync_client=True) as client:
        while True:
            current = [client.read_flow_run(run.id) for run in runs]
            for run in current:
                kind = run.state.type if run.state else StateType.SCHEDULED
                if reported.get(run.id) != kind:
                    reported[run.id] = kind
                    logger.info("node run %s: %s", run.name, kind.value)
            failed = [r for r in current if r.state and r.state.type in _FAILED]
            if failed:
                raise node_runs_failure(failed)
            done = [r for r in current if r.state and r.state.type == StateType.COMPLETED]
            if len(done) == len(runs):
                return
            if len(done) >= min_nodes and finished():
                late = [r for r in current if r not in done]
                logger.warning("%d node run(s) did not join; the world trained with %d node(s)",
                               len(late), len(done))
                cancel_node_runs(late)
                return
            if time.monotonic() > deadline:
                raise LaunchTimeout(
                    "the node runs did not finish within googlenet.launch.timeout_s + "
                    "rdzv_timeout_s; they were cancelled")
            time.sleep(poll_s)


def node_runs_failure(failed: list[FlowRun]) -> NodeRunFailed:
    """The error of the failed node runs: deterministic if any of them failed deterministically
    (the others usually died of it: a closed connection), else transient."""
    first = next((r for r in failed if not _failed_transiently(r)), failed[0])
    state = first.state
    message = (state.message or state.name) if state else "unknown state"
    return NodeRunFailed(f"node run {first.name} ended {state.type.value if state else '?'}: "
                         f"{message}; the other node runs were cancelled",
                         transient=all(_failed_transiently(r) for r in failed))


def _failed_transiently(run: FlowRun) -> bool:
    """What the node run's final state says (``flows/ddp_node.py`` names it by ``is_transient``).

    A run cancelled or crashed (its infrastructure, not its code) may pass on retry; one that
    failed without a named state never ran its task: its parameters or its code were refused.
    """
    state = run.state
    if state is None or state.type != StateType.FAILED:
        return True
    if state.name in (NODE_FAILED_TRANSIENT, NODE_FAILED_DETERMINISTIC):
        return state.name == NODE_FAILED_TRANSIENT
    return False


def cancel_node_runs(runs: list[FlowRun], wait_s: float = 0.0) -> None:
    """Cancel node runs that are not final: running ones through the runner or worker that
    watches them (it terminates the process, and torchrun's ranks with it). With ``wait_s``,
    wait that long for them to be final, so a retry never overlaps the attempt it replaces."""
    if not runs:
        return
    message = "cancelled by the parent: the world is over (a node failed, or it finished)"
    with get_client(sync_client=True) as client:
        for run in runs:
            current = client.read_flow_run(run.id)
            if current.state is None or current.state.is_final():
                continue
            state: Any = (Cancelled(message=message) if current.state.type in _NOT_STARTED
                          else Cancelling(message=message))
            client.set_flow_run_state(run.id, state, force=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            pending = [r.name for r in runs if not _is_final(client.read_flow_run(r.id))]
            if not pending:
                return
            time.sleep(1.0)
        if wait_s:
            run_logger().warning("node runs %s were not final %.0f s after cancelling them",
                                 pending, wait_s)


def _is_final(run: FlowRun) -> bool:
    return run.state is None or run.state.is_final()

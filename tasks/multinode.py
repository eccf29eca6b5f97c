"""Multi-node GoogLeNet: one flow run of the ``ddp-node`` deployment per node, watched together.

The GoogLeNet task calls ``train_on_nodes`` when ``googlenet.launch.nnodes`` allows more than one
node. Each node run is placed by its work pool on a GPU host and launches torchrun there with
the c10d rendezvous that node 0 hosts; torch forms the world. This side only starts the node
runs, fails fast when one fails (cancelling the others) and returns global rank 0's result.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling, Failed

from tasks.common import run_logger
from visionpipe import settings
from visionpipe.config import GoogLeNetConfig
from visionpipe.errors import (
    NODE_FAILED_DETERMINISTIC,
    NODE_FAILED_TRANSIENT,
    LaunchTimeout,
    NodeRunFailed,
    NodeTrainingError,
    is_transient,
)
from visionpipe.data import PreparedDataset
from visionpipe.tracking import TrackingContext
from visionpipe.training import launch
from visionpipe.training.multinode import (
    NodeJob,
    NodeOutcome,
    read_result,
    render_job_variables,
    rendezvous_id,
    resolve_endpoint,
    run_node,
)
from visionpipe.training.result import TrainResult
from visionpipe.training.shared import SharedStore

_FAILED = {StateType.FAILED, StateType.CRASHED, StateType.CANCELLED, StateType.CANCELLING}
_NOT_STARTED = {StateType.SCHEDULED, StateType.PENDING, StateType.PAUSED}
# After cancelling: longer than a worker's grace period (30 s) plus torchrun's teardown (20 s).
CANCEL_WAIT_S = 90.0


@task(name="launch-node")
def launch_node(job: NodeJob) -> NodeOutcome:
    """Pre-flight checks, then torchrun for this node; the rank lines go to the run's log."""
    logger = run_logger()
    local = settings.cache_dir("nodes") / job.rdzv_id / f"node{job.node_index}"
    try:
        return run_node(job, local, lambda rank, line: logger.info(
            "[node %d rank %s] %s", job.node_index, "-" if rank is None else rank, line))
    except launch.LaunchError as exc:
        if is_transient(exc):
            raise
        raise NodeTrainingError(str(exc)) from exc


def node_failed(exc: Exception) -> State[Any]:
    """The node run's final state: Failed, named by ``is_transient`` for the parent to read."""
    run_logger().error("node failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    name = NODE_FAILED_TRANSIENT if is_transient(exc) else NODE_FAILED_DETERMINISTIC
    return Failed(name=name, message=f"Flow run encountered an exception: "
                                     f"{type(exc).__name__}: {exc}")


def shared_stage_dir(cfg: GoogLeNetConfig, context: TrackingContext, stage: str) -> str:
    """The stage's checkpoint folder on the configured shared storage (or the state folder)."""
    root = cfg.launch.shared_dir or str(settings.cache_dir("runs"))
    return f"{root.rstrip('/')}/{context.flow_run_id}/{stage}"


def train_on_nodes(cfg: GoogLeNetConfig, dataset: PreparedDataset, context: TrackingContext,
                   stage: str, mlflow_run_id: str, local_dir: Path) -> TrainResult:
    """Start a node run per node, wait for all of them, return global rank 0's result with
    its checkpoints reachable from this process (downloaded into ``local_dir`` from S3)."""
    logger = run_logger()
    task_run = TaskRunContext.get().task_run  # type: ignore[union-attr]
    # A new id per task run and attempt, also with a configured base: a retry never meets the
    # old world, and a later run never reuses an earlier one's node runs.
    rdzv_id = rendezvous_id(str(task_run.id), max(1, task_run.run_count), base=cfg.launch.rdzv_id)
    endpoint = resolve_endpoint(cfg.launch.rdzv_endpoint, rdzv_id)
    shared = shared_stage_dir(cfg, context, stage)
    low, high = cfg.launch.node_range
    downloads = settings.cache_dir("nodes") / rdzv_id / "parent"
    logger.info("starting %d node run(s) of %s (world of %s nodes), rendezvous %s at %s, "
                "checkpoints in %s", high, cfg.launch.node_deployment, cfg.launch.nnodes,
                rdzv_id, endpoint, shared)
    runs: list[FlowRun] = []
    try:
        for index in range(high):
            job = NodeJob(config=cfg, dataset=dataset, node_index=index, node_count=high,
                          rdzv_id=rdzv_id, rdzv_endpoint=endpoint, shared_dir=shared,
                          mlflow_run_id=mlflow_run_id)
            runs.append(run_deployment(
                cfg.launch.node_deployment, parameters={"job": job.model_dump(mode="json")},
                timeout=0, flow_run_name=f"{stage}-{rdzv_id}-node{index}",
                idempotency_key=f"{rdzv_id}-node{index}",
                job_variables=render_job_variables(cfg.launch.node_job_variables, rdzv_id, index)
                or None))
        store = SharedStore(shared)
        _wait(runs, low, lambda: read_result(store, downloads, rdzv_id) is not None,
              deadline=time.monotonic() + cfg.launch.timeout_s + cfg.launch.rdzv_timeout_s)
    except BaseException:
        # Cancelled, timed out or failed: leave no node holding GPUs, and let no retry start
        # while an old rank may still write its preemption checkpoint.
        _cancel(runs, wait_s=CANCEL_WAIT_S)
        _remove_downloads(downloads)
        raise
    try:
        result = read_result(store, downloads, rdzv_id)
    finally:
        _remove_downloads(downloads)
    if result is None:
        raise NodeRunFailed(f"every node run completed but global rank 0 left no result in "
                            f"{shared}; see the node runs' logs", transient=True)
    return localize_checkpoints(result, store, local_dir)


def _remove_downloads(downloads: Path) -> None:
    """The parent's downloaded copies of the result file; the attempt's folder too, once empty
    (the node runs remove their own)."""
    shutil.rmtree(downloads, ignore_errors=True)
    with contextlib.suppress(OSError):
        downloads.parent.rmdir()


def _wait(runs: list[FlowRun], min_nodes: int, finished: Callable[[], bool], deadline: float,
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
                raise _failure(failed)
            done = [r for r in current if r.state and r.state.type == StateType.COMPLETED]
            if len(done) == len(runs):
                return
            if len(done) >= min_nodes and finished():
                late = [r for r in current if r not in done]
                logger.warning("%d node run(s) did not join; the world trained with %d node(s)",
                               len(late), len(done))
                _cancel(late)
                return
            if time.monotonic() > deadline:
                raise LaunchTimeout(
                    "the node runs did not finish within googlenet.launch.timeout_s + "
                    "rdzv_timeout_s; they were cancelled")
            time.sleep(poll_s)


def _failure(failed: list[FlowRun]) -> NodeRunFailed:
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


def _cancel(runs: list[FlowRun], wait_s: float = 0.0) -> None:
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


def localize_checkpoints(result: TrainResult, store: SharedStore, local_dir: Path) -> TrainResult:
    """Point the result at checkpoints this process can open: downloaded from S3 into
    ``local_dir``, or on the shared volume, which this host must mount at the same path."""
    if store.is_s3:
        names = ["best.pt", "best.pt.sha256", "last.pt", "last.pt.sha256"]
        store.pull(local_dir, names)
        return result.model_copy(update={"best_checkpoint": str(local_dir / "best.pt"),
                                         "last_checkpoint": str(local_dir / "last.pt")})
    for path in (result.best_checkpoint, result.last_checkpoint):
        if not Path(path).is_file():
            raise NodeRunFailed(
                f"global rank 0 wrote {path}, which this host cannot see: the flow run that "
                "evaluates and registers must mount googlenet.launch.shared_dir at the same "
                "path as the nodes, or use an s3:// prefix", transient=False)
    return result


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
from pathlib import Path
from typing import Any

from prefect import task
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.states import Failed

from tasks.common import run_logger
from tasks.node_runs import CANCEL_WAIT_S, cancel_node_runs, wait_for_nodes
from visionpipe import settings
from visionpipe.config import GoogLeNetConfig
from visionpipe.data import PreparedDataset
from visionpipe.errors import (
    NODE_FAILED_DETERMINISTIC,
    NODE_FAILED_TRANSIENT,
    NodeRunFailed,
    NodeTrainingError,
    is_transient,
)
from visionpipe.tracking import TrackingContext
from visionpipe.training import launch
from visionpipe.training.multinode import (
    NodeJob,
    NodeOutcome,
    localize_checkpoints,
    read_result,
    render_job_variables,
    rendezvous_id,
    resolve_endpoint,
    run_node,
    shared_stage_dir,
)
from visionpipe.training.result import TrainResult
from visionpipe.training.shared import SharedStore


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
    shared = shared_stage_dir(cfg, context.flow_run_id, stage)
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
        wait_for_nodes(runs, low, lambda: read_result(store, downloads, rdzv_id) is not None,
              deadline=time.monotonic() + cfg.launch.timeout_s + cfg.launch.rdzv_timeout_s)
    except BaseException:
        # Cancelled, timed out or failed: leave no node holding GPUs, and let no retry start
        # while an old rank may still write its preemption checkpoint.
        cancel_node_runs(runs, wait_s=CANCEL_WAIT_S)
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



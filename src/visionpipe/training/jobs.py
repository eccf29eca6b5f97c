"""The DDP workers' job files, and one node's launch of them: write the job, run torchrun,
read rank 0's result. Single-node GoogLeNet runs call ``launch_on_this_node``, a fine-tune on
several GPUs ``launch_finetune``; a node of a multi-node run builds its job with the same
``write_worker_job`` (``training.multinode``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from visionpipe.config import FinetuneConfig, GoogLeNetConfig, LaunchConfig
from visionpipe.data import PreparedDataset
from visionpipe.errors import LaunchError, LaunchPreempted, LaunchStopped, LaunchTimeout
from visionpipe.training import launch
from visionpipe.training.result import TrainResult

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", what a preempted rank exits with
PREEMPTED_MARKER = "PREEMPTED"  # rank 0 leaves it beside the checkpoint it wrote on SIGTERM

Logger = logging.Logger | logging.LoggerAdapter[Any]


class WorkerJob(BaseModel):
    """Everything a rank needs, written as JSON by whoever launches torchrun."""

    config: GoogLeNetConfig
    dataset: PreparedDataset
    out_dir: str
    result_path: str
    mlflow_run_id: str | None = None
    # Multi-node: the S3 prefix rank 0 uploads checkpoints to (a mounted volume is out_dir
    # itself), and the node run this launch belongs to.
    shared_dir: str | None = None
    node_index: int | None = None


class FinetuneJob(BaseModel):
    """What each rank of a multi-GPU fine-tune needs (``training.finetune_worker``)."""

    config: FinetuneConfig
    dataset: PreparedDataset
    weights_path: str
    weights_sha256: str | None = None
    random_init: bool = False
    out_dir: str
    result_path: str
    mlflow_run_id: str | None = None


def finetune_processes(cfg: FinetuneConfig) -> int:
    """Ranks of a fine-tune on this host: as configured, else one per visible GPU; one on a
    host without GPUs (or asked for the CPU), where a plain process trains."""
    return processes_per_gpu(cfg.launch, cfg.device)


def processes_per_gpu(launch_cfg: LaunchConfig, device: str) -> int:
    """``launch_cfg.nproc_per_node``, else one process per visible GPU, one without any."""
    if launch_cfg.nproc_per_node:
        return launch_cfg.nproc_per_node
    if device == "cpu" or launch_cfg.backend == "gloo":
        return 1
    return max(1, torch.cuda.device_count())


def has_cuda() -> bool:
    """Whether this process sees a CUDA device (for callers that do not import torch)."""
    return torch.cuda.is_available()


def write_worker_job(job_path: Path, cfg: GoogLeNetConfig, dataset: PreparedDataset,
                     out_dir: Path, result_path: Path, mlflow_run_id: str | None,
                     shared_dir: str | None = None, node_index: int | None = None) -> WorkerJob:
    """Write the worker's job file to ``job_path``; checkpoints go to ``out_dir``."""
    job = WorkerJob(config=cfg, dataset=dataset, out_dir=str(out_dir),
                    result_path=str(result_path), mlflow_run_id=mlflow_run_id,
                    shared_dir=shared_dir, node_index=node_index)
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(job.model_dump_json(indent=2))
    return job


def launch_on_this_node(cfg: GoogLeNetConfig, dataset: PreparedDataset, out_dir: Path,
                        mlflow_run_id: str | None, rdzv_id: str,
                        on_line: Callable[[int | None, str], None], *,
                        hold_compute: Callable[[int], AbstractContextManager[Any]] = lambda n: nullcontext(),
                        stop: threading.Event | None = None,
                        logger: Logger = log) -> TrainResult:
    """Train GoogLeNet with torchrun on this host; return rank 0's result.

    ``hold_compute(nproc)`` is held while the ranks run (the orchestrator's GPU slots);
    ``stop``, once set, kills the launch. A launch that fails after rank 0 checkpointed on
    SIGTERM raises ``LaunchPreempted``: a retry resumes from that checkpoint.
    """
    job_path, result_path = out_dir / "job.json", out_dir / "result.json"
    write_worker_job(job_path, cfg, dataset, out_dir, result_path, mlflow_run_id)
    launch_job("train-googlenet", cfg.launch, launch.default_nproc(cfg.launch), job_path,
               launch.WORKER_MODULE, rdzv_id, on_line, hold_compute, stop, logger)
    return TrainResult.model_validate_json(result_path.read_text())


def launch_finetune(cfg: FinetuneConfig, dataset: PreparedDataset, weights_path: Path,
                    out_dir: Path, mlflow_run_id: str | None, rdzv_id: str,
                    on_line: Callable[[int | None, str], None], *,
                    random_init: bool = False, weights_sha256: str | None = None,
                    hold_compute: Callable[[int], AbstractContextManager[Any]] = lambda n: nullcontext(),
                    stop: threading.Event | None = None,
                    logger: Logger = log) -> TrainResult:
    """Fine-tune on ``finetune_processes(cfg)`` ranks of this host with torchrun; return rank
    0's result (the arguments are ``finetune``'s, and ``launch_on_this_node``'s)."""
    job = FinetuneJob(config=cfg, dataset=dataset, weights_path=str(weights_path),
                      weights_sha256=weights_sha256, random_init=random_init,
                      out_dir=str(out_dir), result_path=str(out_dir / "result.json"),
                      mlflow_run_id=mlflow_run_id)
    result = run_job("finetune-backbone", job, cfg.launch, finetune_processes(cfg), out_dir,
                     launch.FINETUNE_WORKER_MODULE, rdzv_id, on_line, hold_compute, stop, logger)
    return TrainResult.model_validate_json(result)


def run_job(stage: str, job: BaseModel, launch_cfg: LaunchConfig, nproc: int, out_dir: Path,
            module: str, rdzv_id: str, on_line: Callable[[int | None, str], None],
            hold_compute: Callable[[int], AbstractContextManager[Any]],
            stop: threading.Event | None, logger: Logger) -> str:
    """Write ``job`` to ``out_dir/job.json``, run ``module`` on it with torchrun
    (``launch_job``), and return the text of the ``result.json`` rank 0 wrote beside it."""
    job_path = out_dir / "job.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path.write_text(job.model_dump_json(indent=2))
    launch_job(stage, launch_cfg, nproc, job_path, module, rdzv_id, on_line, hold_compute, stop,
               logger)
    return (out_dir / "result.json").read_text()


def launch_job(stage: str, launch_cfg: LaunchConfig, nproc: int, job_path: Path, module: str,
               rdzv_id: str, on_line: Callable[[int | None, str], None],
               hold_compute: Callable[[int], AbstractContextManager[Any]],
               stop: threading.Event | None, logger: Logger) -> None:
    """Run ``module`` on ``nproc`` ranks of this host with torchrun on the job file at
    ``job_path`` (``hold_compute``, ``stop``: as in ``launch_on_this_node``); rank 0 leaves
    its result beside the job file."""
    out_dir = job_path.parent
    cmd = launch.torchrun_command(launch_cfg, job_path, nproc, rdzv_id=rdzv_id, module=module)
    logger.info("launching %d process(es) per node: %s", nproc, " ".join(cmd))
    marker = out_dir / PREEMPTED_MARKER
    marker.unlink(missing_ok=True)
    with hold_compute(nproc):
        if stop is not None and stop.is_set():  # asked while it waited for the compute
            raise LaunchStopped(f"{stage} was stopped before its launch: another stage of the "
                                "run failed (its error is the run's)")
        try:
            launch.run_torchrun(cmd, launch_cfg.timeout_s, on_line,
                                env=launch.worker_env(nproc), stop=stop)
        except LaunchError as exc:
            if marker.exists() and not isinstance(exc, LaunchTimeout):
                raise LaunchPreempted(
                    f"training was preempted ({marker.read_text().strip()}); a retry resumes "
                    "from its checkpoint") from exc
            raise

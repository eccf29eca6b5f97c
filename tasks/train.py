"""Training tasks: fine-tune a pretrained backbone (and, next to it, GoogLeNet from scratch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import threading

import torch
from prefect import Task, task
from prefect.concurrency.sync import concurrency
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from pydantic import BaseModel

from tasks.common import per_flow_run, retry_transient, run_logger
from tasks.multinode import train_on_nodes
from tasks.tracking import TrackingContext
from visionpipe import settings, tracking
from visionpipe.config import FinetuneConfig, GoogLeNetConfig
from visionpipe.data import PreparedDataset
from visionpipe.training import launch
from visionpipe.training.finetune import finetune
from visionpipe.training.result import TrainResult
from visionpipe.training.worker import PREEMPTED_MARKER, WorkerJob
from visionpipe.weights import FetchedWeights


C = TypeVar("C", FinetuneConfig, GoogLeNetConfig)


class Candidate(BaseModel):
    """A trained model waiting for evaluation and registration."""

    name: str
    run_id: str
    result: TrainResult
    lineage: dict[str, str]


def stage_dir(context: TrackingContext, stage: str) -> Path:
    """Checkpoints of one stage of one flow run: a retry finds its predecessor's files here."""
    path = settings.cache_dir("runs") / context.flow_run_id / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


class EpochReporter:
    """Per-epoch progress to the Prefect log, a progress artifact and the candidate's MLflow run."""

    def __init__(self, candidate: str, run_id: str, total_epochs: int) -> None:
        self.candidate, self.run_id, self.total = candidate, run_id, total_epochs
        self.logger = run_logger()
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=f"{candidate}-progress", description=f"{candidate} training epochs")

    def __call__(self, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        self.logger.info(
            "%s epoch %d/%d [%s] train loss %.4f top-1 %.3f | val top-1 %.3f (%.0f img/s)",
            self.candidate, epoch, self.total, record.get("phase", "train"), record["train_loss"],
            record["train_top1"], record["val_top1"], record["train_images_per_s"])
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))
                   and k not in ("epoch", "phase_epoch")}
        tracking.log_metrics(self.run_id, metrics, step=epoch)
        update_progress_artifact(self.artifact_id, progress=min(100.0, 100.0 * epoch / self.total))

    def done(self) -> None:
        """Full bar at the end, also when early stopping or skipped phases ran fewer epochs."""
        update_progress_artifact(self.artifact_id, progress=100.0)


@task(name="finetune-backbone", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient, cache_key_fn=per_flow_run, persist_result=True)
def finetune_backbone(cfg: FinetuneConfig, dataset: PreparedDataset, weights: FetchedWeights,
                      context: TrackingContext) -> Candidate:
    """Phase by phase transfer learning of ``cfg.arch`` from the fetched weights."""
    name = f"finetune-{cfg.arch}"
    lineage = {"arch": cfg.arch, "dataset_version": dataset.version,
               "weights_source": weights.source, "weights_sha256": weights.sha256,
               "random_init": str(weights.random_init).lower()}
    run_id, existing = tracking.resume_or_start_run(context.experiment_id, name,
                                                    context.parent_run_id, tags=lineage)
    if not existing:
        tracking.log_config(run_id, cfg)
    total = sum(p.epochs for p in cfg.phases)
    reporter = EpochReporter(name, run_id, total)
    with compute_slots(1):
        result = with_oom_fallback(cfg, lambda c: finetune(
            c, dataset, Path(weights.path), stage_dir(context, name), on_epoch=reporter,
            random_init=weights.random_init, weights_sha256=weights.sha256))
    reporter.done()
    return _finish(name, run_id, result, lineage)


# The stop of the GoogLeNet launch started by each flow run, by flow run id: what the flow sets
# when a stage it waits for fails while GoogLeNet trains. Not a task parameter: those are hashed
# into the cache key. Each start of the flow run (a retry too) gets a new, unset one.
_STOPS: dict[str, threading.Event] = {}


@dataclass(frozen=True)
class Started:
    """A training task submitted to run alongside what the flow does next."""

    task_: Task[..., Candidate]
    args: tuple[Any, ...]
    future: PrefectFuture[Candidate]
    stop: threading.Event | None = None

    def candidate(self) -> Candidate:
        """Its result; trained again here if the cached result's checkpoint is not on this host.

        That happens when a flow run is retried on another worker with ``VISIONPIPE_HOME`` on
        local disk (``refresh_cache``): evaluation and registration read that file.
        """
        candidate: Candidate = self.future.result()
        if not Path(candidate.result.best_checkpoint).is_file():
            run_logger().warning("%s: the cached result's checkpoint %s is not on this host; "
                                 "training it again", candidate.name, candidate.result.best_checkpoint)
            candidate = self.task_.with_options(refresh_cache=True)(*self.args)
        return candidate


def start_googlenet(cfg: GoogLeNetConfig, dataset: PreparedDataset,
                    context: TrackingContext) -> list[Started]:
    """train-googlenet submitted now (it needs no pretrained weights); nothing when disabled."""
    if not cfg.enabled:
        return []
    args = (cfg, dataset, context)
    stop = _STOPS[context.flow_run_id] = threading.Event()
    return [Started(task_=train_googlenet, args=args, future=train_googlenet.submit(*args),
                    stop=stop)]


@contextmanager
def stopped_on_error(started: list[Started]) -> Iterator[None]:
    """Stop the trainings already started if the block fails.

    A weights error should fail the run at once, not once GoogLeNet has trained to the end
    (Prefect waits for running tasks before it ends a failed flow run).
    """
    try:
        yield
    except BaseException:
        for run in started:
            if run.stop is not None:
                run.stop.set()
        raise


def train_candidates(cfg: FinetuneConfig, dataset: PreparedDataset, weights: FetchedWeights,
                     context: TrackingContext, alongside: list[Started]) -> list[Candidate]:
    """finetune-backbone, next to the trainings already started; the fine-tune's candidate first."""
    args = (cfg, dataset, weights, context)
    runs = [Started(task_=finetune_backbone, args=args, future=finetune_backbone.submit(*args)),
            *alongside]
    candidates = [run.candidate() for run in runs]
    _STOPS.pop(context.flow_run_id, None)
    return candidates


def _finish(name: str, run_id: str, result: TrainResult, lineage: dict[str, str]) -> Candidate:
    """Record the outcome on the candidate's run and close it."""
    if result.skipped_phases:
        tracking.set_tags(run_id, {"skipped_phases": ",".join(result.skipped_phases)})
    if len(result.rank_weight_digests) > 1:
        identical = len(set(result.rank_weight_digests)) == 1
        tracking.set_tags(run_id, {"ranks_identical_weights": str(identical).lower()})
        if not identical:
            run_logger().warning("%s: the ranks ended with different weights: %s", name,
                                 result.rank_weight_digests)
    metrics = {"best_val_top1": result.best_val_top1, "epochs_run": result.epochs_run}
    if result.resumed_from_epoch is not None:
        metrics["resumed_from_epoch"] = result.resumed_from_epoch
        run_logger().warning("%s resumed from epoch %d of an earlier attempt", name,
                             result.resumed_from_epoch)
    tracking.log_metrics(run_id, metrics)
    tracking.end_run(run_id)
    return Candidate(name=name, run_id=run_id, result=result, lineage=lineage)


@task(name="train-googlenet", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient, cache_key_fn=per_flow_run, persist_result=True)
def train_googlenet(cfg: GoogLeNetConfig, dataset: PreparedDataset,
                    context: TrackingContext) -> Candidate:
    """GoogLeNet from scratch: torchrun starts the DDP worker module in its own processes."""
    name = "scratch-googlenet"
    lineage = {"arch": "googlenet", "dataset_version": dataset.version,
               "weights_source": "scratch", "weights_sha256": "", "random_init": "true"}
    run_id, existing = tracking.resume_or_start_run(context.experiment_id, name,
                                                    context.parent_run_id, tags=lineage)
    if not existing:
        tracking.log_config(run_id, cfg)
    out_dir = stage_dir(context, name)
    if cfg.launch.multinode:  # one flow run of the ddp-node deployment per node
        result = train_on_nodes(cfg, dataset, context, name, run_id, out_dir)
    else:
        stop = _STOPS.get(context.flow_run_id)  # None when the task is called on its own
        result = with_oom_fallback(cfg, lambda c: _launch_worker(
            c, dataset, out_dir, run_id, context.flow_run_id[:12], stop))
    return _finish(name, run_id, result, lineage)


def _launch_worker(cfg: GoogLeNetConfig, dataset: PreparedDataset, out_dir: Path, run_id: str,
                   rdzv_id: str, stop: threading.Event | None = None) -> TrainResult:
    """Write the job, run torchrun, read rank 0's result; a preempted run says so."""
    job = WorkerJob(config=cfg, dataset=dataset, out_dir=str(out_dir),
                    result_path=str(out_dir / "result.json"), mlflow_run_id=run_id)
    job_path = out_dir / "job.json"
    job_path.write_text(job.model_dump_json(indent=2))
    nproc = launch.default_nproc(cfg.launch)
    cmd = launch.torchrun_command(cfg.launch, job_path, nproc, rdzv_id=rdzv_id)
    logger = run_logger()
    logger.info("launching %d process(es) per node: %s", nproc, " ".join(cmd))
    marker = out_dir / PREEMPTED_MARKER
    marker.unlink(missing_ok=True)
    with compute_slots(nproc):
        if stop is not None and stop.is_set():  # asked while it waited for the compute
            raise launch.LaunchStopped("train-googlenet was stopped before its launch: another "
                                       "stage of the run failed (its error is the run's)")
        try:
            launch.run_torchrun(
                cmd, cfg.launch.timeout_s,
                lambda rank, line: logger.info("[rank %s] %s", "-" if rank is None else rank, line),
                env=launch.worker_env(nproc), stop=stop)
        except launch.LaunchError as exc:
            if marker.exists() and not isinstance(exc, launch.LaunchTimeout):
                raise launch.LaunchPreempted(f"training was preempted ({marker.read_text().strip()}); "
                                       "a retry resumes from its checkpoint") from exc
            raise
    return TrainResult.model_validate_json(Path(job.result_path).read_text())


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, launch.LaunchError) and exc.exception == "OutOfMemoryError"


def split_batch(batch: int) -> int | None:
    """The smallest factor that splits ``batch`` into equal per-device batches of 2 or more.

    2 for an even batch; 5 for 65 (13 x 5); None where there is none (a prime, or 2 or 3).
    """
    return next((f for f in range(2, batch // 2 + 1) if batch % f == 0), None)


def with_oom_fallback(cfg: C, train: Callable[[C], TrainResult]) -> TrainResult:
    """Train; after an out-of-memory error, once more with a smaller per-device batch.

    The batch is split by its smallest factor (halved when even) and the gradient accumulation
    multiplied by it, so the global batch, and with it the schedule and the checkpoints of the
    failed attempt, stay valid. A batch that cannot be split evenly, or a second out-of-memory
    error, fails the task: an out-of-memory error is not among the errors Prefect retries.
    """
    try:
        return train(cfg)
    except Exception as exc:
        batch = cfg.batch_size  # type: ignore[attr-defined]
        if not is_out_of_memory(exc):
            raise
        factor = split_batch(batch)
        if factor is None:
            raise RuntimeError(
                f"out of memory at a per-device batch of {batch}, which cannot be split into "
                "equal smaller batches with the same global batch. Fix: set batch_size to an "
                "even number (the retry halves it), or a smaller one with grad_accumulation "
                "keeping batch_size x grad_accumulation") from exc
    # Out of the except block: its traceback would keep the failed attempt's tensors alive.
    torch.compiler.reset()  # a compiled attempt's graphs (and CUDA graph pools) go too
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    smaller = cfg.model_copy(update={"batch_size": batch // factor,
                                     "grad_accumulation": cfg.grad_accumulation * factor})  # type: ignore[attr-defined]
    run_logger().warning(
        "out of memory at a per-device batch of %d: retrying once with batch %d and %d "
        "gradient accumulation steps (same global batch)", batch, smaller.batch_size,
        smaller.grad_accumulation)
    return train(smaller)


_CPU_TRAINING = threading.Lock()


@contextmanager
def compute_slots(count: int) -> Iterator[None]:
    """Hold the compute a training needs while it runs.

    On GPUs: ``count`` slots of the Prefect global concurrency limit ``gpu``, when it exists.
    On the CPU: this process's one training slot, since two trainings on a few cores only make
    each other's threads wait (OpenMP spins), and together finish later than one after the other.
    """
    if torch.cuda.is_available():
        with concurrency("gpu", occupy=count, strict=False):
            yield
        return
    with _CPU_TRAINING:
        yield

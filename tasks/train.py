"""Training tasks: fine-tune a pretrained backbone, and next to it GoogLeNet from scratch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.common import per_flow_run, retry_transient, run_logger
from tasks.compute import compute_slots, launch_stop
from tasks.multinode import train_on_nodes
from visionpipe import settings
from visionpipe.config import FinetuneConfig, GoogLeNetConfig
from visionpipe.data import PreparedDataset
from visionpipe.tracking import TrackingContext
from visionpipe.training.core import parse_epoch_line
from visionpipe.training.finetune import finetune
from visionpipe.training.jobs import finetune_processes, launch_finetune, launch_on_this_node
from visionpipe.training.oom import with_oom_fallback
from visionpipe.training.result import Candidate, close_candidate_run, open_candidate_run
from visionpipe.weights import FetchedWeights


class EpochReporter:
    """Per-epoch progress to the Prefect log and a progress artifact (MLflow: the library)."""

    def __init__(self, candidate: str, total_epochs: int) -> None:
        self.candidate, self.total = candidate, total_epochs
        self.logger = run_logger()
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=f"{candidate}-progress", description=f"{candidate} training epochs")

    def __call__(self, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        self.logger.info(
            "%s epoch %d/%d [%s] train loss %.4f top-1 %.3f | val top-1 %.3f (%.0f img/s)",
            self.candidate, epoch, self.total, record["phase"], record["train_loss"],
            record["train_top1"], record["val_top1"], record["train_images_per_s"])
        self.advance(epoch)

    def advance(self, epoch: int) -> None:
        """The bar at ``epoch`` of the total."""
        update_progress_artifact(self.artifact_id, progress=min(100.0, 100.0 * epoch / self.total))

    def done(self) -> None:
        """Full bar at the end, also when early stopping or skipped phases ran fewer epochs."""
        update_progress_artifact(self.artifact_id, progress=100.0)

    def on_line(self, rank: int | None, line: str) -> None:
        """A line of a torchrun launch: rank 0's epoch records move the bar, the rest is logged."""
        record = parse_epoch_line(line)
        if record is None:
            self.logger.info("[rank %s] %s", "-" if rank is None else rank, line)
        else:
            self(record)


@task(name="finetune-backbone", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient, cache_key_fn=per_flow_run, persist_result=True)
def finetune_backbone(cfg: FinetuneConfig, dataset: PreparedDataset, weights: FetchedWeights,
                      context: TrackingContext) -> Candidate:
    """Phase by phase transfer learning of ``cfg.arch`` from the fetched weights."""
    name = f"finetune-{cfg.arch}"
    lineage = {"arch": cfg.arch, "dataset_version": dataset.version,
               "weights_source": weights.source, "weights_sha256": weights.sha256,
               "random_init": str(weights.random_init).lower()}
    run_id = open_candidate_run(context, name, lineage, cfg)
    reporter = EpochReporter(name, sum(p.epochs for p in cfg.phases))
    out_dir = settings.stage_dir(context.flow_run_id, name)
    logger = run_logger()
    if finetune_processes(cfg) > 1:  # every GPU of this worker: torchrun, as GoogLeNet's
        result = with_oom_fallback(cfg, lambda c: launch_finetune(
            c, dataset, Path(weights.path), out_dir, run_id, f"ft-{context.flow_run_id[:12]}",
            reporter.on_line, random_init=weights.random_init, weights_sha256=weights.sha256,
            hold_compute=compute_slots, stop=launch_stop(context.flow_run_id), logger=logger),
            logger)
    else:
        with compute_slots(1):
            result = with_oom_fallback(cfg, lambda c: finetune(
                c, dataset, Path(weights.path), out_dir, on_epoch=reporter, mlflow_run_id=run_id,
                random_init=weights.random_init, weights_sha256=weights.sha256), logger)
    reporter.done()
    return close_candidate_run(name, run_id, result, lineage, run_logger())


@task(name="train-googlenet", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient, cache_key_fn=per_flow_run, persist_result=True)
def train_googlenet(cfg: GoogLeNetConfig, dataset: PreparedDataset,
                    context: TrackingContext) -> Candidate:
    """GoogLeNet from scratch: torchrun starts the DDP worker module in its own processes."""
    name = "scratch-googlenet"
    lineage = {"arch": "googlenet", "dataset_version": dataset.version,
               "weights_source": "scratch", "weights_sha256": "", "random_init": "true"}
    run_id = open_candidate_run(context, name, lineage, cfg)
    out_dir = settings.stage_dir(context.flow_run_id, name)
    if cfg.launch.multinode:  # one flow run of the ddp-node deployment per node
        result = train_on_nodes(cfg, dataset, context, name, run_id, out_dir)
    else:
        logger = run_logger()
        reporter = EpochReporter(name, cfg.epochs)
        result = with_oom_fallback(cfg, lambda c: launch_on_this_node(
            c, dataset, out_dir, run_id, context.flow_run_id[:12], reporter.on_line,
            hold_compute=compute_slots, stop=launch_stop(context.flow_run_id), logger=logger),
            logger)
        reporter.done()
    return close_candidate_run(name, run_id, result, lineage, run_logger())

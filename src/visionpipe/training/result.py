"""What a training stage hands on (small and JSON-serialisable, so it crosses process borders),
and the candidate's MLflow run that records it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visionpipe import tracking
from visionpipe.models import ModelSpec
from visionpipe.tracking import TrackingContext
from visionpipe.weights.state_dict import RANDOM_INIT

log = logging.getLogger(__name__)


class TrainResult(BaseModel):
    best_checkpoint: str
    last_checkpoint: str
    best_val_top1: float
    best_epoch: int
    epochs_run: int
    spec: ModelSpec
    history: list[dict[str, Any]]
    world_size: int = 1
    nnodes: int = 1
    node_index: int | None = None  # the node run that held global rank 0 (multi-node)
    # sha256 of each rank's final weights, in rank order: DDP keeps them identical.
    rank_weight_digests: list[str] = []
    skipped_phases: list[str] = []
    resumed_from_epoch: int | None = None

    @property
    def loop_seconds(self) -> float:
        """Time spent in the training and validation loops of the epochs this result records."""
        return sum(r.get("train_seconds", 0.0) + r.get("val_seconds", 0.0) for r in self.history)


def write_result(result: BaseModel, path: Path) -> None:
    """Rank 0's result file, written whole (a temporary name, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(result.model_dump_json(indent=2))
    os.replace(tmp, path)


class Candidate(BaseModel):
    """A trained model waiting for evaluation and registration."""

    name: str
    run_id: str  # its MLflow run
    result: TrainResult
    lineage: dict[str, str]

    @property
    def pretrained_unreachable(self) -> bool:
        """Whether it was to start from pretrained weights but trained from a random init,
        since no source answered (GoogLeNet trains from scratch by design: not this)."""
        return self.lineage.get("weights_source") == RANDOM_INIT


def open_candidate_run(context: TrackingContext, name: str, lineage: dict[str, str],
                       cfg: BaseModel) -> str:
    """The candidate's nested MLflow run (an earlier attempt's, if any), with its config."""
    run_id, existing = tracking.resume_or_start_run(context.experiment_id, name,
                                                    context.parent_run_id, tags=lineage)
    if not existing:
        tracking.log_config(run_id, cfg)
    return run_id


def close_candidate_run(name: str, run_id: str, result: TrainResult, lineage: dict[str, str],
                        logger: logging.Logger | logging.LoggerAdapter[Any] = log) -> Candidate:
    """Record the outcome on the candidate's run, close it, and hand the candidate on."""
    if result.skipped_phases:
        tracking.set_tags(run_id, {"skipped_phases": ",".join(result.skipped_phases)})
    if len(result.rank_weight_digests) > 1:
        identical = len(set(result.rank_weight_digests)) == 1
        tracking.set_tags(run_id, {"ranks_identical_weights": str(identical).lower()})
        if not identical:
            logger.warning("%s: the ranks ended with different weights: %s", name,
                           result.rank_weight_digests)
    metrics = {"best_val_top1": result.best_val_top1, "epochs_run": result.epochs_run}
    if result.resumed_from_epoch is not None:
        metrics["resumed_from_epoch"] = result.resumed_from_epoch
        logger.warning("%s resumed from epoch %d of an earlier attempt", name,
                       result.resumed_from_epoch)
    tracking.log_metrics(run_id, metrics)
    tracking.end_run(run_id)
    return Candidate(name=name, run_id=run_id, result=result, lineage=lineage)

"""Trainings that run alongside what the flow does next: submitted, stopped on error, collected."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture

from tasks.common import run_logger
from tasks.compute import forget_stop, new_stop
from tasks.train import finetune_backbone, train_googlenet
from visionpipe.config import FinetuneConfig, GoogLeNetConfig
from visionpipe.data import PreparedDataset
from visionpipe.tracking import TrackingContext
from visionpipe.training.result import Candidate
from visionpipe.weights import FetchedWeights


@dataclass(frozen=True)
class SubmittedTraining:
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
                    context: TrackingContext) -> list[SubmittedTraining]:
    """train-googlenet submitted now (it needs no pretrained weights); nothing when disabled."""
    if not cfg.enabled:
        return []
    args = (cfg, dataset, context)
    stop = new_stop(context.flow_run_id)
    return [SubmittedTraining(task_=train_googlenet, args=args,
                              future=train_googlenet.submit(*args), stop=stop)]


@contextmanager
def stopped_on_error(started: list[SubmittedTraining]) -> Iterator[None]:
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
                     context: TrackingContext, alongside: list[SubmittedTraining]) -> list[Candidate]:
    """finetune-backbone, next to the trainings already started; the fine-tune's candidate first."""
    args = (cfg, dataset, weights, context)
    runs = [SubmittedTraining(task_=finetune_backbone, args=args,
                              future=finetune_backbone.submit(*args)), *alongside]
    candidates = [run.candidate() for run in runs]
    forget_stop(context.flow_run_id)
    return candidates

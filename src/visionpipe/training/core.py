"""What both trainers share: progress, checkpoints, the resume check, epoch records, batches.

The fine-tune adds its phases to this, GoogLeNet its auxiliary loss, DDP and preemption; the
rest (what a checkpoint holds, when a run may resume, how an epoch is recorded and logged to
MLflow, whether a split is held in memory or streamed) is decided here, once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DistributedSampler

from visionpipe import tracking
from visionpipe.config import FastPathConfig, FinetuneConfig, GoogLeNetConfig, PhotoAugmentConfig
from visionpipe.data import PreparedDataset, build_loader, load_split
from visionpipe.errors import CheckpointError
from visionpipe.data.loading import drops_lone_last
from visionpipe.data.photo import PhotoTrainLoader, build_stream
from visionpipe.data.streaming import StreamingLoader, decoded_bytes
from visionpipe.models import ModelSpec
from visionpipe.training.checkpoint import rotate_and_save
from visionpipe.training.distributed import DistContext, nodes_in_world
from visionpipe.training.fastpath import FastPath, wants_streaming
from visionpipe.training.loop import EpochStats
from visionpipe.training.resume import same_training

log = logging.getLogger(__name__)

EpochRecord = dict[str, Any]
EpochCallback = Callable[[EpochRecord], None]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
StageConfig = TypeVar("StageConfig", FinetuneConfig, GoogLeNetConfig)

# What a checkpoint needs for a resume, beside the weights ``load_checkpoint`` checks for.
_RESUME_KEYS = frozenset({"config", "epoch", "step", "progress", "optimizer", "scheduler"})
# The checkpoint's name for each stage's config, as the flow's config calls it.
_STAGE_NAMES = {FinetuneConfig: "finetune", GoogLeNetConfig: "googlenet"}


@dataclass
class Progress:
    """Where a training run stands; saved in every checkpoint so a retry can resume."""

    epoch: int = 0  # completed epochs
    step: int = 0  # batches done in the next epoch (a preemption checkpoint)
    best_top1: float = -1.0
    best_epoch: int = 0
    since_best: int = 0  # epochs without a better val top-1 (the fine-tune counts per phase)
    history: list[EpochRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # phases left out (fine-tune)
    resumed_from_epoch: int | None = None
    stopped_early: bool = False  # GoogLeNet: early stopping ended the run (a resume ends too)

    def end_epoch(self, record: EpochRecord, eligible: bool = True) -> bool:
        """Count a finished epoch in; return whether its val top-1 is the best so far.

        Only an ``eligible`` epoch can be the best: ``in_second_half`` of its run or phase.
        """
        self.epoch, self.step = int(record["epoch"]), 0
        self.history.append(record)
        improved = eligible and record["val_top1"] > self.best_top1
        if improved:
            self.best_top1, self.best_epoch, self.since_best = record["val_top1"], self.epoch, 0
        else:
            self.since_best += 1
        return improved

    def saved(self) -> dict[str, Any]:
        """The part a checkpoint keeps (epoch and step are top-level checkpoint keys)."""
        return {"best_top1": self.best_top1, "best_epoch": self.best_epoch,
                "since_best": self.since_best, "history": self.history, "skipped": self.skipped,
                "stopped_early": self.stopped_early}

    @classmethod
    def restored(cls, checkpoint: dict[str, Any]) -> Progress:
        """The progress a checkpoint recorded, marked as resumed from its epoch."""
        saved = checkpoint["progress"]
        return cls(epoch=checkpoint["epoch"], step=checkpoint["step"],
                   best_top1=saved["best_top1"], best_epoch=saved["best_epoch"],
                   since_best=saved["since_best"], history=list(saved["history"]),
                   skipped=list(saved["skipped"]), resumed_from_epoch=checkpoint["epoch"],
                   stopped_early=bool(saved.get("stopped_early", False)))


# Rank 0 of a torchrun launch prints each epoch's record behind this marker, one JSON object a
# line: the launching task reads its progress from these lines, not from the log's text.
EPOCH_LINE_MARKER = "visionpipe-epoch-record "


def epoch_line(record: EpochRecord) -> str:
    """The line rank 0 prints for an epoch (``parse_epoch_line`` reads it back)."""
    return EPOCH_LINE_MARKER + json.dumps(record)


def print_epoch(record: EpochRecord) -> None:
    """Rank 0's epoch callback under torchrun: the line the launching task reads."""
    print(epoch_line(record), flush=True)


def parse_epoch_line(line: str) -> EpochRecord | None:
    """The epoch record a worker's line carries, or None for any other line."""
    if not line.startswith(EPOCH_LINE_MARKER):
        return None
    return json.loads(line[len(EPOCH_LINE_MARKER):])  # type: ignore[no-any-return]


def in_second_half(epoch: int, epochs: int) -> bool:
    """Whether ``epoch`` (1-based) lies in the second half of a run or phase of ``epochs``.

    Only there may an epoch become the best checkpoint or stop the run early: in the first half
    the rate is high and, from scratch on a small split, the val score is noise. A best epoch 1
    of a run from scratch (val 0.24 of 90 images by luck) scored 0.14 on the test split where
    its last epoch scored 0.27 (docs/photo-accuracy.md).
    """
    return 2 * epoch > epochs


def should_stop_early(since_best: int, patience: int, epoch: int, epochs: int) -> bool:
    """Both trainers' early stopping: ``patience`` epochs without a better val top-1, in the
    second half of the run (or phase)."""
    return since_best >= patience and in_second_half(epoch, epochs)


def check_batch_size(batch_size: int, train_count: int) -> None:
    """Refuse a batch larger than the training split before any training starts."""
    if batch_size > train_count:
        raise ValueError(
            f"batch_size {batch_size} is larger than the training split ({train_count} images); "
            f"use a batch_size of at most {train_count}"
        )


def check_resumable(saved: dict[str, Any], cfg: StageConfig,
                    ignore: set[str] = frozenset()) -> StageConfig:  # type: ignore[assignment]
    """The config ``saved`` was written under; an error unless ``cfg`` may resume from it."""
    missing = sorted(_RESUME_KEYS - saved.keys())
    if missing:  # written before the trainer core kept its progress under one key
        raise CheckpointError(
            f"{saved['path']} has no {', '.join(repr(k) for k in missing)}: it was written by "
            "an older visionpipe, whose checkpoints this one cannot resume. Fix: start a new "
            "flow run, or delete that folder to start this stage over")
    before = type(cfg).model_validate_json(saved["config"])
    if not same_training(before, cfg, ignore=ignore):
        raise ValueError(f"{saved['path']} was written with another {_STAGE_NAMES[type(cfg)]} "
                         "config; use a new flow run, or delete that folder to start this "
                         "stage over")
    return before


def epoch_record(epoch: int, train: EpochStats, val: EpochStats, *, phase: str,
                 phase_epoch: int, lr: float | None = None) -> EpochRecord:
    """One finished epoch as the history, the log, the progress bar and MLflow see it; ``lr``
    is the (head's) learning rate the epoch ended at."""
    record: EpochRecord = {
        "phase": phase, "phase_epoch": phase_epoch, "epoch": epoch,
        "train_loss": train.loss, "train_top1": train.top1, "val_loss": val.loss,
        "val_top1": val.top1, "train_images_per_s": train.images_per_s,
        "train_seconds": train.seconds, "val_seconds": val.seconds,
    }
    if lr is not None:
        record["lr"] = lr
    return record


def save_progress(out_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: BaseModel,
                  spec: ModelSpec, progress: Progress, phase: str, improved: bool,
                  **extra: Any) -> None:
    """Write ``last.pt`` (and ``best.pt`` when ``improved``): what a resume needs, no more.

    ``extra`` holds what one trainer alone needs back (the fine-tune's phase position, the
    world size a DDP step count belongs to).
    """
    checkpoint = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "config": cfg.model_dump_json(),
        "spec": spec.model_dump_json(), "epoch": progress.epoch, "step": progress.step,
        "phase": phase, "val_top1": progress.history[-1]["val_top1"] if progress.history else 0.0,
        "progress": progress.saved(), **extra,
    }
    rotate_and_save(checkpoint, out_dir, best=improved)


def epoch_callbacks(mlflow_run_id: str | None, *others: EpochCallback | None,
                    is_main: bool = True) -> list[EpochCallback]:
    """What runs after each epoch: MLflow metrics first (rank 0 only), then ``others``."""
    if not is_main:
        return []
    logged = [log_epoch_metrics(mlflow_run_id)] if mlflow_run_id else []
    return [*logged, *(c for c in others if c is not None)]


def log_epoch_metrics(run_id: str) -> EpochCallback:
    """An epoch callback that logs the record's numbers to ``run_id``, at the epoch as step."""
    def log_metrics(record: EpochRecord) -> None:
        metrics = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("epoch", "phase_epoch")}
        tracking.log_metrics(run_id, metrics, step=int(record["epoch"]))
    return log_metrics


@dataclass(frozen=True)
class Shard:
    """One DDP rank's part of a split: ``DistributedSampler``'s shuffled shard for training
    (``seed`` draws it), images ``rank, rank + world, ...`` for validation (each image once,
    where ``DistributedSampler`` would repeat some to even the shards out). Give one whenever
    a process group is up, a world of one included: the shard's order is not the unsharded one."""

    rank: int
    world_size: int
    seed: int = 0


@dataclass
class TrainingData:
    """The splits a trainer reads: uint8 tensors in memory, or streamed from the files."""

    dataset: PreparedDataset | None  # read from its files when ``splits`` is empty
    fast: FastPathConfig
    device: torch.device  # where the batches are delivered
    decode_on_device: bool = False
    photo: PhotoAugmentConfig = field(default_factory=PhotoAugmentConfig)  # the photo recipe's crops
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    streams: dict[tuple[Any, ...], StreamingLoader | PhotoTrainLoader] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return not self.splits

    def count(self, split: str) -> int:
        if self.splits:
            return len(self.splits[split][1])
        assert self.dataset is not None
        return self.dataset.split_counts[split]

    def batches(self, split: str, batch_size: int, *, shuffle: bool, augment: bool, seed: int,
                epoch: int = 0, shard: Shard | None = None, drop_lone_last: bool = False,
                flip: bool = True) -> Batches:
        """Batches of ``split`` (this rank's ``shard`` of it); ``seed`` draws the shuffle and
        the crops, the same in memory and streamed; ``epoch`` draws a DDP shard's order."""
        sampler = self._sampler(split, shuffle, shard, epoch)
        per_rank = len(sampler) if sampler is not None else self.count(split)
        drop = drop_lone_last and drops_lone_last(per_rank, batch_size)
        if self.splits:
            images, labels = self.splits[split]
            return build_loader(images, labels, batch_size, shuffle=shuffle, augment=augment,
                                seed=seed, sampler=sampler, drop_last=drop, flip=flip)  # type: ignore[arg-type]
        key = (split, batch_size, shuffle, augment, drop, flip, shard)
        assert self.dataset is not None
        if key not in self.streams:  # one loader per kind: its workers persist across epochs
            self.streams[key] = build_stream(
                self.dataset, split, batch_size, shuffle=shuffle, augment=augment, seed=0,
                device=self.device, photo=self.photo, sampler=sampler,
                num_workers=self.fast.num_workers, decode_on_device=self.decode_on_device,
                flip=flip, drop_last=drop)
        stream = self.streams[key]
        stream.set_epoch(epoch, seed=seed)  # seeded like the in-memory loader: the same batches
        return stream

    def _sampler(self, split: str, shuffle: bool, shard: Shard | None,
                 epoch: int) -> Sequence[int] | DistributedSampler[Any] | None:
        if shard is None:
            return None
        count = self.count(split)
        if not shuffle:
            return range(shard.rank, count, shard.world_size)
        sampler = DistributedSampler(range(count), num_replicas=shard.world_size,  # type: ignore[arg-type]
                                     rank=shard.rank, shuffle=True, seed=shard.seed)
        sampler.set_epoch(epoch)  # the same permutation on every rank, a new one each epoch
        return sampler


def load_training_data(dataset: PreparedDataset, fast: FastPathConfig, device: torch.device,
                       fast_path: FastPath, photo: PhotoAugmentConfig | None = None) -> TrainingData:
    """Train and val splits as uint8 tensors (on the GPU for small datasets, with the fast
    path), or streamed batch by batch when the training split is too large to hold in memory.

    The photo recipe always streams: its workers draw new crops of the originals (or of the
    prepared copy) every epoch.
    """
    if dataset.recipe == "photo" or wants_streaming(fast, decoded_bytes(dataset, "train")):
        log.info("streaming %s from disk: %d training images (%s recipe)", dataset.name,
                 dataset.split_counts["train"], dataset.recipe)
        return TrainingData(dataset, fast, device, fast_path.decode_on_device,
                            photo or PhotoAugmentConfig())
    where = device if fast_path.data_on_device else torch.device("cpu")
    splits = {split: load_split(dataset, split) for split in ("train", "val")}
    return TrainingData(dataset, fast, where,
                        splits={k: (x.to(where), y.to(where)) for k, (x, y) in splits.items()})


def log_world(run_id: str, ctx: DistContext) -> None:
    """The world of this attempt: params for the first one, tags always (an elastic retry may
    run on fewer nodes, and MLflow params cannot change)."""
    world = {"world_size": str(ctx.world_size), "nnodes": str(nodes_in_world())}
    tracking.set_tags(run_id, world)
    try:
        tracking.log_params(run_id, world)
    except Exception as exc:  # noqa: BLE001 - an earlier attempt recorded another world
        log.warning("world differs from an earlier attempt's (%s); the tags hold this one", exc)

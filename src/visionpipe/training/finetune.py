"""Transfer learning as a list of phases: train the head on a frozen backbone, then everything."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionpipe.config import FastPath, FinetuneConfig, Phase, same_training
from visionpipe.data import PreparedDataset, build_loader, load_split
from visionpipe.data.loading import drops_lone_last, training_batches
from visionpipe.data.streaming import StreamingLoader, decoded_bytes
from visionpipe.models import (
    ModelSpec,
    build_resnet,
    head_modules,
    is_frozen_module,
    load_backbone,
    param_groups,
    set_trainable,
    train_mode,
)
from visionpipe.training.checkpoint import latest_checkpoint, rotate_and_save
from visionpipe.training.result import TrainResult
from visionpipe.weights import check_state_dict_keys, load_state_dict_file
from visionpipe.training.loop import (
    EpochStats,
    apply_fast_path,
    build_optimizer,
    evaluate,
    maybe_compile,
    pick_device,
    scratch_epochs,
    train_one_epoch,
    warmup_cosine,
    warmup_steps,
)

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class _Data:
    """The train and val splits: uint8 tensors in memory, or streamed from disk per batch."""

    cfg: FinetuneConfig
    device: torch.device  # where the batches are delivered
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dataset: PreparedDataset | None = None  # streamed from its files when ``splits`` is empty
    streams: dict[tuple[str, int, bool, bool, bool], StreamingLoader] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return not self.splits

    def count(self, split: str) -> int:
        if self.splits:
            return len(self.splits[split][1])
        assert self.dataset is not None
        return self.dataset.split_counts[split]

    def loader(self, split: str, batch_size: int, *, shuffle: bool, augment: bool,
               seed: int, drop_last: bool = False) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``split``; ``seed`` picks the shuffle and the crops, as in memory."""
        if self.splits:
            return build_loader(*self.splits[split], batch_size=batch_size, shuffle=shuffle,
                                augment=augment, seed=seed, drop_last=drop_last)
        key = (split, batch_size, shuffle, augment, drop_last)
        assert self.dataset is not None
        if key not in self.streams:  # one loader per kind: its workers persist across epochs
            fast = self.cfg.fast
            self.streams[key] = StreamingLoader(
                self.dataset, split, batch_size, shuffle=shuffle, augment=augment, seed=0,
                device=self.device, num_workers=fast.num_workers,
                decode_on_device=fast.decode_on_device, drop_last=drop_last)
        stream = self.streams[key]
        stream.set_epoch(0, seed=seed)  # seeded like the in-memory path: the same batches
        return stream


@dataclass
class _Progress:
    """Where a fine-tuning run stands; saved in every checkpoint so a retry can resume."""

    epoch: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed_from_epoch: int | None = None


@dataclass
class _Run:
    """What every phase of one fine-tuning run shares."""

    model: nn.Module
    cfg: FinetuneConfig
    data: _Data
    device: torch.device
    spec: ModelSpec
    out_dir: Path
    progress: _Progress
    on_epoch: EpochCallback | None
    fast: FastPath


def check_batch_size(batch_size: int, train_count: int) -> None:
    """Refuse a batch larger than the training split before any training starts."""
    if batch_size > train_count:
        raise ValueError(
            f"batch_size {batch_size} is larger than the training split ({train_count} images); "
            f"use a batch_size of at most {train_count}"
        )


def finetune(
    cfg: FinetuneConfig,
    dataset: PreparedDataset,
    weights_path: Path,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
    random_init: bool = False,
    weights_sha256: str | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.arch`` from ``weights_path`` on ``dataset``, phase after phase.

    A checkpoint of an earlier attempt in ``out_dir`` is resumed from (mid-phase), so a retried
    task ends with the same epochs and, on the CPU, the same weights as an uninterrupted run.
    With ``random_init`` weights there is nothing to transfer: phases that freeze part of the
    backbone would train a head on random features, so they are skipped with a warning, and the
    backbone trains at the head's rate.
    """
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    planned = dataset.split_counts["train"] * sum(phase.epochs for phase in cfg.phases)
    fast = cfg.fast.resolve(device.type, planned_images=planned,
                            grad_accumulation=cfg.grad_accumulation)
    data = _load_data(dataset, cfg, device, fast)
    check_batch_size(cfg.batch_size, data.count("train"))
    model = build_resnet(cfg.arch, dataset.num_classes)
    state = load_state_dict_file(weights_path, weights_sha256)
    check_state_dict_keys(model, state, ignore_prefixes=[f"{h}." for h in head_modules(cfg.arch)])
    load_backbone(model, state, cfg.arch)
    spec = ModelSpec(arch=cfg.arch, num_classes=dataset.num_classes,
                     class_names=dataset.class_names, image_size=dataset.image_size)
    run = _Run(model, cfg, data, device, spec, out_dir, _Progress(), on_epoch, fast)
    resume = _resume_state(run)
    run.model = apply_fast_path(model.to(device), fast)
    for index, phase in enumerate(cfg.phases):
        if resume is not None and index < resume["phase_index"] + int(resume["phase_done"]):
            continue
        if random_init and _freezes_backbone(model, phase):
            log.warning("phase %s skipped: it freezes a randomly initialised backbone", phase.name)
            run.progress.skipped.append(phase.name)
            continue
        if random_init and phase.backbone_lr_fraction < 1:
            # The smaller backbone rate protects pretrained features; random ones have none.
            log.warning("phase %s: random backbone trains at the full rate, not %.2f of it",
                        phase.name, phase.backbone_lr_fraction)
            phase = phase.model_copy(update={"backbone_lr_fraction": 1.0})
        if random_init:
            phase = _scratch_length(phase, cfg, data.count("train"))
        same_phase = resume is not None and index == resume["phase_index"]
        _run_phase(run, index, phase, resume if same_phase else None)
    progress = run.progress
    if progress.epoch == 0:
        raise ValueError(f"no phase trained: {progress.skipped} froze a randomly initialised "
                         "backbone; add a phase with trainable=['*'] or reachable weights")
    return TrainResult(
        best_checkpoint=str(out_dir / "best.pt"), last_checkpoint=str(out_dir / "last.pt"),
        best_val_top1=progress.best_top1, best_epoch=progress.best_epoch,
        epochs_run=progress.epoch, spec=spec, history=progress.history,
        skipped_phases=progress.skipped, resumed_from_epoch=progress.resumed_from_epoch,
    )


def _load_data(dataset: PreparedDataset, cfg: FinetuneConfig, device: torch.device,
               fast: FastPath) -> _Data:
    """Train and val splits as uint8 tensors, on the GPU for small datasets (fast path), or
    streamed batch by batch when the training split is too large to hold in memory."""
    if cfg.fast.wants_streaming(decoded_bytes(dataset, "train")):
        log.info("streaming %s from disk: %d training images", dataset.name,
                 dataset.split_counts["train"])
        return _Data(cfg, device, dataset=dataset)
    where = device if fast.data_on_device else torch.device("cpu")
    splits = {split: load_split(dataset, split) for split in ("train", "val")}
    return _Data(cfg, where, {k: (x.to(where), y.to(where)) for k, (x, y) in splits.items()})


def _resume_state(run: _Run) -> dict[str, Any] | None:
    """Load the newest valid checkpoint of an earlier attempt into the model and progress."""
    state = latest_checkpoint(run.out_dir)
    if state is None:
        return None
    before = FinetuneConfig.model_validate_json(state["config"])
    if not same_training(before, run.cfg):
        raise ValueError(f"{state['path']} was written with another finetune config; use a new "
                         "flow run, or delete that folder to start this stage over")
    run.model.load_state_dict(state["model"])
    saved = state["progress"]
    since_best = 0 if state["phase_done"] else saved["since_best"]  # patience counts per phase
    run.progress = _Progress(epoch=state["epoch"], best_top1=saved["best_top1"],
                             best_epoch=saved["best_epoch"], since_best=since_best,
                             history=list(saved["history"]), skipped=list(saved["skipped"]),
                             resumed_from_epoch=state["epoch"])
    log.info("resuming from %s: epoch %d, phase %s", state["path"], state["epoch"], state["phase"])
    return state


def _scratch_length(phase: Phase, cfg: FinetuneConfig, train_count: int) -> Phase:
    """``phase`` with its epochs raised to ``cfg.scratch_min_steps`` steps (a random backbone)."""
    steps = math.ceil(training_batches(train_count, cfg.batch_size) / cfg.grad_accumulation)
    epochs = scratch_epochs(phase.epochs, steps, cfg.scratch_min_steps)
    if epochs != phase.epochs:
        log.warning("phase %s: a random backbone trains %d epochs (%d steps each), not %d",
                    phase.name, epochs, steps, phase.epochs)
    return phase.model_copy(update={"epochs": epochs})


def _freezes_backbone(model: nn.Module, phase: Phase) -> bool:
    set_trainable(model, phase.trainable)
    return not all(p.requires_grad for p in model.parameters())


def _run_phase(run: _Run, index: int, phase: Phase, resume: dict[str, Any] | None) -> None:
    """Train one phase with a fresh optimizer and schedule; stop early on a plateau."""
    model, cfg, progress = run.model, run.cfg, run.progress
    trainable = set_trainable(model, phase.trainable)
    log.info("phase %s: %d trainable tensors", phase.name, len(trainable))
    optimizer = build_optimizer(
        param_groups(model, cfg.arch, phase.lr, phase.backbone_lr_fraction), cfg.optim, run.device
    )
    steps = math.ceil(training_batches(run.data.count("train"), cfg.batch_size) / cfg.grad_accumulation)
    total = phase.epochs * steps
    scheduler = warmup_cosine(optimizer, total, warmup_steps(phase.warmup_epochs, steps, total))
    first = 1
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        first = resume["phase_epoch"] + 1
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    batches = _phase_batches(model, cfg, run.data, run.device)
    train_model = maybe_compile(batches.train_model, run.fast, cfg.batch_size)
    for phase_epoch in range(first, phase.epochs + 1):
        # Seeded per epoch, so a resumed run draws the same numbers as an uninterrupted one.
        torch.manual_seed(cfg.seed * 100_003 + progress.epoch + 1)
        train_mode(model)
        train_stats = train_one_epoch(train_model, batches.train(progress.epoch),
                                      optimizer, scheduler, criterion, run.device,
                                      accumulation=cfg.grad_accumulation, fast=run.fast)
        val_stats = evaluate(batches.val_model, batches.val, criterion, run.device, run.fast)
        progress.epoch += 1
        improved = val_stats.top1 > progress.best_top1
        if improved:
            progress.best_top1, progress.best_epoch, progress.since_best = val_stats.top1, progress.epoch, 0
        else:
            progress.since_best += 1
        record = _epoch_record(phase, phase_epoch, progress.epoch, train_stats, val_stats)
        progress.history.append(record)
        # Not in the first half of the cosine: its high rate makes val scores noise there.
        stop = progress.since_best >= cfg.early_stopping_patience and 2 * phase_epoch > phase.epochs
        done = stop or phase_epoch == phase.epochs
        _save(run, optimizer, scheduler, record, index, done, improved)
        if run.on_epoch:
            run.on_epoch(record)
        if stop:
            log.info("phase %s: no better val top-1 for %d epochs, stopping", phase.name,
                     progress.since_best)
            break
    progress.since_best = 0


@dataclass
class _Batches:
    train_model: nn.Module
    val_model: nn.Module
    train: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    val: Iterable[tuple[torch.Tensor, torch.Tensor]]


def _phase_batches(model: nn.Module, cfg: FinetuneConfig, data: _Data, device: torch.device) -> _Batches:
    """Image batches, or, for a head-only phase without augmentation, cached backbone features.

    A frozen backbone in eval mode is a fixed function: its features are computed once and the
    head trains on them, which gives the same head as forwarding the backbone every epoch.
    """
    heads = head_modules(cfg.arch)
    backbone_frozen = all(
        is_frozen_module(m) for n, m in model.named_children() if n not in heads and list(m.parameters())
    )
    if backbone_frozen and cfg.cache_frozen_features and not cfg.augment and heads == ("fc",):
        return _feature_batches(model, cfg, data, device)

    def train(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return data.loader("train", cfg.batch_size, shuffle=True, augment=cfg.augment,
                           seed=cfg.seed + epoch,
                           drop_last=drops_lone_last(data.count("train"), cfg.batch_size))

    val = data.loader("val", cfg.batch_size, shuffle=False, augment=False, seed=0)
    return _Batches(model, model, train, val)


def _feature_batches(model: nn.Module, cfg: FinetuneConfig, data: _Data, device: torch.device) -> _Batches:
    head: nn.Module = model.fc  # type: ignore[assignment]
    model.fc = nn.Identity()
    try:
        train_x, train_y = _features(model, data, "train", cfg.batch_size, device)  # N x dim
        val_x, val_y = _features(model, data, "val", cfg.batch_size, device)
    finally:
        model.fc = head

    def train(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        # The same order as the image batches of this epoch (BatchIterator's first shuffle).
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        chunks = order.to(train_x.device).split(cfg.batch_size)
        keep = training_batches(len(train_y), cfg.batch_size)  # a lone last image is left out there
        return [(train_x[i], train_y[i]) for i in chunks[:keep]]

    val = [(x, y) for x, y in zip(val_x.split(cfg.batch_size), val_y.split(cfg.batch_size), strict=True)]
    return _Batches(head, head, train, val)


@torch.inference_mode()
def _features(model: nn.Module, data: _Data, split: str, batch_size: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's features of a split in order, and its labels, on ``device``."""
    model.eval()
    features, labels = [], []
    for x, y in data.loader(split, batch_size, shuffle=False, augment=False, seed=0):
        features.append(model(x.to(device)))  # features stay on the device the head trains on
        labels.append(y.to(device))
    return torch.cat(features).clone(), torch.cat(labels)


def _epoch_record(phase: Phase, phase_epoch: int, epoch: int, train: EpochStats,
                  val: EpochStats) -> dict[str, Any]:
    return {
        "phase": phase.name, "phase_epoch": phase_epoch, "epoch": epoch,
        "train_loss": train.loss, "train_top1": train.top1, "val_loss": val.loss,
        "val_top1": val.top1, "train_images_per_s": train.images_per_s,
        "train_seconds": train.seconds, "val_seconds": val.seconds,
    }


def _save(run: _Run, optimizer: torch.optim.Optimizer, scheduler: Any, record: dict[str, Any],
          phase_index: int, phase_done: bool, improved: bool) -> None:
    progress = run.progress
    state = {
        "model": run.model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": {}, "epoch": record["epoch"],
        "phase": record["phase"], "phase_index": phase_index, "phase_epoch": record["phase_epoch"],
        "phase_done": phase_done, "val_top1": record["val_top1"],
        "config": run.cfg.model_dump_json(), "spec": run.spec.model_dump_json(),
        "rng": torch.get_rng_state(),
        "progress": {"best_top1": progress.best_top1, "best_epoch": progress.best_epoch,
                     "since_best": progress.since_best, "history": progress.history,
                     "skipped": progress.skipped},
    }
    rotate_and_save(state, run.out_dir, best=improved)

"""Transfer learning as a list of phases: train the head on a frozen backbone, then everything."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionpipe.config import FinetuneConfig, Phase
from visionpipe.data import PreparedDataset
from visionpipe.data.loading import training_batches
from visionpipe.data.transforms import training_is_deterministic
from visionpipe.models import (
    ModelSpec,
    backbone_frozen,
    backbone_state,
    build_backbone,
    head_modules,
    param_groups,
    set_trainable,
    train_mode,
)
from visionpipe.training.checkpoint import latest_checkpoint
from visionpipe.training.fastpath import FastPath, resolve_fast_path
from visionpipe.training.core import (
    Batches,
    EpochCallback,
    Progress,
    TrainingData,
    check_batch_size,
    check_resumable,
    epoch_callbacks,
    epoch_record,
    load_training_data,
    in_second_half,
    save_progress,
    should_stop_early,
)
from visionpipe.training.loop import (
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
from visionpipe.training.result import TrainResult
from visionpipe.weights import check_state_dict_keys, load_state_dict_file

log = logging.getLogger(__name__)


@dataclass
class _FinetuneRun:
    """What every phase of one fine-tuning run shares."""

    model: nn.Module
    cfg: FinetuneConfig
    data: TrainingData
    device: torch.device
    spec: ModelSpec
    out_dir: Path
    progress: Progress
    on_epoch: list[EpochCallback]
    fast_path: FastPath


def finetune(
    cfg: FinetuneConfig,
    dataset: PreparedDataset,
    weights_path: Path,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
    random_init: bool = False,
    weights_sha256: str | None = None,
    mlflow_run_id: str | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.arch`` from ``weights_path`` on ``dataset``, phase after phase.

    A checkpoint of an earlier attempt in ``out_dir`` is resumed from (mid-phase), so a retried
    task ends with the same epochs and, on the CPU, the same weights as an uninterrupted run.
    With ``random_init`` weights there is nothing to transfer: phases that freeze part of the
    backbone would train a head on random features, so they are skipped with a warning, and the
    backbone trains at the head's rate. Every epoch's record goes to ``mlflow_run_id``'s
    metrics, then to ``on_epoch``.
    """
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    planned = dataset.split_counts["train"] * sum(phase.epochs for phase in cfg.phases)
    fast_path = resolve_fast_path(cfg.fast, device.type, planned_images=planned,
                                  grad_accumulation=cfg.grad_accumulation)
    data = load_training_data(dataset, cfg.fast, device, fast_path, cfg.photo)
    check_batch_size(cfg.batch_size, data.count("train"))
    model = build_backbone(cfg.arch, dataset.num_classes, dataset.image_size)
    backbone = backbone_state(model, load_state_dict_file(weights_path, weights_sha256))
    check_state_dict_keys(model, backbone, ignore_prefixes=[f"{h}." for h in head_modules(model)])
    model.load_state_dict(backbone, strict=False)
    spec = ModelSpec(arch=cfg.arch, num_classes=dataset.num_classes,
                     class_names=dataset.class_names, image_size=dataset.image_size,
                     recipe=dataset.recipe, resize_size=dataset.resize_size)
    run = _FinetuneRun(model, cfg, data, device, spec, out_dir, Progress(),
                       epoch_callbacks(mlflow_run_id, on_epoch), fast_path)
    resume = _resume(run)
    run.model = apply_fast_path(model.to(device), fast_path)
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
    return _result(run)


def _result(run: _FinetuneRun) -> TrainResult:
    progress, out_dir = run.progress, run.out_dir
    if progress.epoch == 0:
        raise ValueError(f"no phase trained: {progress.skipped} froze a randomly initialised "
                         "backbone; add a phase with trainable=['*'] or reachable weights")
    return TrainResult(
        best_checkpoint=str(out_dir / "best.pt"), last_checkpoint=str(out_dir / "last.pt"),
        best_val_top1=progress.best_top1, best_epoch=progress.best_epoch,
        epochs_run=progress.epoch, spec=run.spec, history=progress.history,
        skipped_phases=progress.skipped, resumed_from_epoch=progress.resumed_from_epoch,
    )


def _resume(run: _FinetuneRun) -> dict[str, Any] | None:
    """Load the newest valid checkpoint of an earlier attempt into the model and progress."""
    saved = latest_checkpoint(run.out_dir)
    if saved is None:
        return None
    check_resumable(saved, run.cfg)
    run.model.load_state_dict(saved["model"])
    run.progress = Progress.restored(saved)
    if saved["phase_done"]:
        run.progress.since_best = 0  # patience counts per phase
    log.info("resuming from %s: epoch %d, phase %s", saved["path"], saved["epoch"], saved["phase"])
    return saved


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


def _run_phase(run: _FinetuneRun, index: int, phase: Phase, resume: dict[str, Any] | None) -> None:
    """Train one phase with a fresh optimizer and schedule; stop early on a plateau."""
    model, cfg, progress = run.model, run.cfg, run.progress
    trainable = set_trainable(model, phase.trainable)
    log.info("phase %s: %d trainable tensors", phase.name, len(trainable))
    optimizer = build_optimizer(
        param_groups(model, phase.lr, phase.backbone_lr_fraction), cfg.optim, run.device
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
    train_model = maybe_compile(batches.train_model, run.fast_path, cfg.batch_size)
    for phase_epoch in range(first, phase.epochs + 1):
        # Seeded per epoch, so a resumed run draws the same numbers as an uninterrupted one.
        torch.manual_seed(cfg.seed * 100_003 + progress.epoch + 1)
        train_mode(model)
        train_stats = train_one_epoch(train_model, batches.train(progress.epoch),
                                      optimizer, scheduler, criterion, run.device,
                                      accumulation=cfg.grad_accumulation, fast_path=run.fast_path)
        val_stats = evaluate(batches.val_model, batches.val, criterion, run.device, run.fast_path)
        record = epoch_record(progress.epoch + 1, train_stats, val_stats, phase=phase.name,
                              phase_epoch=phase_epoch, lr=optimizer.param_groups[0]["lr"])
        improved = progress.end_epoch(record, eligible=in_second_half(phase_epoch, phase.epochs))
        stop = should_stop_early(progress.since_best, cfg.early_stopping_patience, phase_epoch,
                                 phase.epochs)
        save_progress(run.out_dir, model=run.model, optimizer=optimizer, scheduler=scheduler,
                      cfg=cfg, spec=run.spec, progress=progress, phase=phase.name,
                      improved=improved, phase_index=index, phase_epoch=phase_epoch,
                      phase_done=stop or phase_epoch == phase.epochs)
        for callback in run.on_epoch:
            callback(record)
        if stop:
            log.info("phase %s: no better val top-1 for %d epochs, stopping", phase.name,
                     progress.since_best)
            break
    progress.since_best = 0


@dataclass
class _Batches:
    train_model: nn.Module
    val_model: nn.Module
    train: Callable[[int], Batches]
    val: Batches


def _phase_batches(model: nn.Module, cfg: FinetuneConfig, data: TrainingData,
                   device: torch.device) -> _Batches:
    """Image batches, or, for a head-only phase without augmentation, cached backbone features.

    A frozen backbone in eval mode is a fixed function: its features are computed once and the
    head trains on them, which gives the same head as forwarding the backbone every epoch.
    """
    recipe = data.dataset.recipe if data.dataset is not None else "small"
    deterministic = training_is_deterministic(recipe, cfg.augment)
    if backbone_frozen(model) and cfg.cache_frozen_features and deterministic:
        return _feature_batches(model, cfg, data, device)

    def train(epoch: int) -> Batches:
        return data.batches("train", cfg.batch_size, shuffle=True, augment=cfg.augment,
                            seed=cfg.seed + epoch, drop_lone_last=True)

    val = data.batches("val", cfg.batch_size, shuffle=False, augment=False, seed=0)
    return _Batches(model, model, train, val)


def _feature_batches(model: nn.Module, cfg: FinetuneConfig, data: TrainingData,
                     device: torch.device) -> _Batches:
    (name,) = head_modules(model)  # the classifier Linear; its input is the feature vector
    head = model.get_submodule(name)
    model.set_submodule(name, nn.Identity())
    try:
        train_x, train_y = _features(model, data, "train", cfg.batch_size, device)  # N x dim
        val_x, val_y = _features(model, data, "val", cfg.batch_size, device)
    finally:
        model.set_submodule(name, head)

    def train(epoch: int) -> Batches:
        # The same order as the image batches of this epoch (BatchIterator's first shuffle).
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        chunks = order.to(train_x.device).split(cfg.batch_size)
        keep = training_batches(len(train_y), cfg.batch_size)  # a lone last image is left out there
        return [(train_x[i], train_y[i]) for i in chunks[:keep]]

    val = [(x, y) for x, y in zip(val_x.split(cfg.batch_size), val_y.split(cfg.batch_size), strict=True)]
    return _Batches(head, head, train, val)


@torch.inference_mode()
def _features(model: nn.Module, data: TrainingData, split: str, batch_size: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's features of a split in order, and its labels, on ``device``."""
    model.eval()
    features, labels = [], []
    for x, y in data.batches(split, batch_size, shuffle=False, augment=False, seed=0):
        features.append(model(x.to(device)))  # features stay on the device the head trains on
        labels.append(y.to(device))
    return torch.cat(features).clone(), torch.cat(labels)

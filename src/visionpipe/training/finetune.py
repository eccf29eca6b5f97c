"""Transfer learning as a list of phases: train the head on a frozen backbone, then everything."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

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
from visionpipe.training.distributed import (
    DistContext,
    all_reduce_sum,
    gather_strings,
    weights_digest,
    wrap_ddp,
)
from visionpipe.training.fastpath import FastPath, resolve_fast_path
from visionpipe.training.core import (
    Batches,
    EpochCallback,
    Progress,
    Shard,
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
    EpochStats,
    maybe_compile,
    pick_device,
    place_schedule,
    scratch_epochs,
    train_one_epoch,
    validate,
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
    ctx: DistContext

    @property
    def train_per_rank(self) -> int:
        """Training images of one rank's epoch (``DistributedSampler`` evens the shards out)."""
        count = self.data.count("train")
        return -(-count // self.ctx.world_size) if self.ctx.distributed else count


def finetune(
    cfg: FinetuneConfig,
    dataset: PreparedDataset,
    weights_path: Path,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
    random_init: bool = False,
    weights_sha256: str | None = None,
    mlflow_run_id: str | None = None,
    ctx: DistContext | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.arch`` from ``weights_path`` on ``dataset``, phase after phase.

    A checkpoint of an earlier attempt in ``out_dir`` is resumed from (mid-phase), so a retried
    task ends with the same epochs and, on the CPU, the same weights as an uninterrupted run.
    With ``random_init`` weights there is nothing to transfer: phases that freeze part of the
    backbone would train a head on random features, so they are skipped with a warning, and the
    backbone trains at the head's rate. Every epoch's record goes to ``mlflow_run_id``'s
    metrics, then to ``on_epoch``.

    Under torchrun (``ctx`` of the process group, ``finetune_worker``) each rank trains on its
    shard of every epoch through a DistributedDataParallel wrapper made afresh for each phase
    (its trainable parameters differ), frozen features are computed once, a shard per rank,
    and gathered; validation is summed over the ranks; rank 0 alone writes checkpoints and
    calls the epoch callbacks.
    """
    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    ctx = ctx or DistContext(0, 0, 1, pick_device(cfg.device), True)
    device = ctx.device
    planned = dataset.split_counts["train"] * sum(phase.epochs for phase in cfg.phases)
    fast_path = resolve_fast_path(cfg.fast, device.type, planned_images=planned // ctx.world_size,
                                  distributed=ctx.distributed, grad_accumulation=cfg.grad_accumulation)
    data = load_training_data(dataset, cfg.fast, device, fast_path, cfg.photo)
    check_batch_size(cfg.batch_size, data.count("train") // ctx.world_size)
    model = build_backbone(cfg.arch, dataset.num_classes, dataset.image_size)
    backbone = backbone_state(model, load_state_dict_file(weights_path, weights_sha256))
    check_state_dict_keys(model, backbone, ignore_prefixes=[f"{h}." for h in head_modules(model)])
    model.load_state_dict(backbone, strict=False)
    spec = ModelSpec(arch=cfg.arch, num_classes=dataset.num_classes,
                     class_names=dataset.class_names, image_size=dataset.image_size,
                     recipe=dataset.recipe, resize_size=dataset.resize_size)
    run = _FinetuneRun(model, cfg, data, device, spec, out_dir, Progress(),
                       epoch_callbacks(mlflow_run_id, on_epoch, is_main=ctx.is_main), fast_path, ctx)
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
            # Counted as one process would: the phase's epochs must not depend on the world.
            phase = _scratch_length(phase, cfg, data.count("train"))
        same_phase = resume is not None and index == resume["phase_index"]
        _run_phase(run, index, phase, resume if same_phase else None)
    return _result(run)


def _result(run: _FinetuneRun) -> TrainResult:
    progress, out_dir = run.progress, run.out_dir
    if progress.epoch == 0:
        raise ValueError(f"no phase trained: {progress.skipped} froze a randomly initialised "
                         "backbone; add a phase with trainable=['*'] or reachable weights")
    digests = gather_strings(weights_digest(run.model), run.ctx) if run.ctx.distributed else []
    return TrainResult(
        best_checkpoint=str(out_dir / "best.pt"), last_checkpoint=str(out_dir / "last.pt"),
        best_val_top1=progress.best_top1, best_epoch=progress.best_epoch,
        epochs_run=progress.epoch, spec=run.spec, history=progress.history,
        world_size=run.ctx.world_size, rank_weight_digests=digests,
        skipped_phases=progress.skipped, resumed_from_epoch=progress.resumed_from_epoch,
    )


def _resume(run: _FinetuneRun) -> dict[str, Any] | None:
    """Load the newest valid checkpoint of an earlier attempt into the model and progress."""
    saved = latest_checkpoint(run.out_dir)  # every rank reads rank 0's files
    if saved is None:
        return None
    # How many processes train may change between attempts; what they compute may not.
    check_resumable(saved, run.cfg, ignore={"launch"})
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
    steps = math.ceil(training_batches(run.train_per_rank, cfg.batch_size) / cfg.grad_accumulation)
    total = phase.epochs * steps
    scheduler = warmup_cosine(optimizer, total, warmup_steps(phase.warmup_epochs, steps, total))
    first = 1
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        # Counted in this world's steps: another number of ranks has other steps per epoch.
        place_schedule(scheduler, resume["phase_epoch"] * steps)
        first = resume["phase_epoch"] + 1
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    batches = phase_batches(model, cfg, run.data, run.ctx)
    # A fresh DDP wrapper per phase: DDP registers the parameters that need a gradient.
    train_model = maybe_compile(wrap_ddp(batches.train_model, run.ctx), run.fast_path,
                                None if run.ctx.distributed else cfg.batch_size)
    for phase_epoch in range(first, phase.epochs + 1):
        # Seeded per epoch (and rank), so a resumed run draws what an uninterrupted one would.
        torch.manual_seed(cfg.seed * 100_003 + progress.epoch + 1 + 7919 * run.ctx.rank)
        train_mode(model)
        local = train_one_epoch(train_model, batches.train(progress.epoch),
                                optimizer, scheduler, criterion, run.device,
                                accumulation=cfg.grad_accumulation, fast_path=run.fast_path)
        train_stats = EpochStats.from_tensor(all_reduce_sum(local.as_tensor(), run.ctx), local.seconds)
        val_stats = validate(batches.val_model, batches.val, criterion, run.ctx, run.fast_path)
        record = epoch_record(progress.epoch + 1, train_stats, val_stats, phase=phase.name,
                              phase_epoch=phase_epoch, lr=optimizer.param_groups[0]["lr"])
        improved = progress.end_epoch(record, eligible=in_second_half(phase_epoch, phase.epochs))
        stop = should_stop_early(progress.since_best, cfg.early_stopping_patience, phase_epoch,
                                 phase.epochs)
        if run.ctx.is_main:
            world = {"world_size": run.ctx.world_size, "rank": 0} if run.ctx.distributed else {}
            save_progress(run.out_dir, model=run.model, optimizer=optimizer, scheduler=scheduler,
                          cfg=cfg, spec=run.spec, progress=progress, phase=phase.name,
                          improved=improved, phase_index=index, phase_epoch=phase_epoch,
                          phase_done=stop or phase_epoch == phase.epochs, **world)
        for callback in run.on_epoch:  # rank 0 only: the list is empty on the others
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


def phase_batches(model: nn.Module, cfg: FinetuneConfig, data: TrainingData,
                  ctx: DistContext) -> _Batches:
    """Image batches, or, for a head-only phase without augmentation, cached backbone features.

    A frozen backbone in eval mode is a fixed function: its features are computed once and the
    head trains on them, which gives the same head as forwarding the backbone every epoch.
    """
    recipe = data.dataset.recipe if data.dataset is not None else "small"
    deterministic = training_is_deterministic(recipe, cfg.augment)
    if backbone_frozen(model) and cfg.cache_frozen_features and deterministic:
        return _feature_batches(model, cfg, data, ctx)
    shard = Shard(ctx.rank, ctx.world_size, cfg.seed) if ctx.distributed else None

    def train(epoch: int) -> Batches:
        return data.batches("train", cfg.batch_size, shuffle=True, augment=cfg.augment,
                            seed=cfg.seed + epoch + 1_000_003 * ctx.rank, epoch=epoch,
                            shard=shard, drop_lone_last=True)

    val = data.batches("val", cfg.batch_size, shuffle=False, augment=False, seed=0, shard=shard)
    return _Batches(model, model, train, val)


def _feature_batches(model: nn.Module, cfg: FinetuneConfig, data: TrainingData,
                     ctx: DistContext) -> _Batches:
    device = ctx.device
    (name,) = head_modules(model)  # the classifier Linear; its input is the feature vector
    head = model.get_submodule(name)
    model.set_submodule(name, nn.Identity())
    strided = Shard(ctx.rank, ctx.world_size) if ctx.distributed else None
    try:
        # Each rank computes its share once; every rank then holds all of them (N x dim).
        train_x, train_y = _features(model, data, "train", cfg.batch_size, device, strided)
        train_x, train_y = (_gather_rows(t, data.count("train"), ctx) for t in (train_x, train_y))
        val_x, val_y = _features(model, data, "val", cfg.batch_size, device, strided)
    finally:
        model.set_submodule(name, head)
    log.info("head trains on frozen features: %d x %d computed once%s", *train_x.shape,
             f", a shard on each of {ctx.world_size} ranks" if ctx.distributed else "")

    def train(epoch: int) -> Batches:
        # The same order as the image batches of this epoch: BatchIterator's first shuffle
        # alone, this rank's DistributedSampler shard under DDP.
        if ctx.distributed:
            sampler = DistributedSampler(range(len(train_y)), num_replicas=ctx.world_size,  # type: ignore[arg-type]
                                         rank=ctx.rank, shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        else:
            order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        chunks = order.to(train_x.device).split(cfg.batch_size)
        keep = training_batches(len(order), cfg.batch_size)  # a lone last image is left out there
        return [(train_x[i], train_y[i]) for i in chunks[:keep]]

    val = list(zip(val_x.split(cfg.batch_size), val_y.split(cfg.batch_size), strict=True)) \
        if len(val_y) else []
    return _Batches(head, head, train, val)


def _gather_rows(local: torch.Tensor, total: int, ctx: DistContext) -> torch.Tensor:
    """The rows each rank computed for images ``rank, rank + world, ...``, on every rank, in
    the split's order."""
    if not ctx.distributed:
        return local
    world = ctx.world_size
    padded = local.new_zeros((-(-total // world), *local.shape[1:]))  # all_gather: equal sizes
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = local.new_empty((total, *local.shape[1:]))
    for rank, part in enumerate(parts):
        rows[rank::world] = part[: len(range(rank, total, world))]
    return rows


@torch.inference_mode()
def _features(model: nn.Module, data: TrainingData, split: str, batch_size: int,
              device: torch.device, shard: Shard | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's features of a split (``shard``: this rank's images ``rank, rank +
    world, ...``) in order, and its labels, on ``device``."""
    model.eval()
    features, labels = [], []
    for x, y in data.batches(split, batch_size, shuffle=False, augment=False, seed=0, shard=shard):
        features.append(model(x.to(device)))  # features stay on the device the head trains on
        labels.append(y.to(device))
    if not features:  # a rank's share of a split smaller than the world (validation only)
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(features).clone(), torch.cat(labels)

"""GoogLeNet from scratch under DistributedDataParallel: the process torchrun starts.

    python -m torch.distributed.run --nproc-per-node 2 -m visionpipe.training.worker job.json

Without torchrun (``RANK`` unset) the same module trains in one plain process. Only rank 0
writes checkpoints, logs to MLflow and writes the result file.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from visionpipe import faults
from visionpipe.config import GoogLeNetConfig
from visionpipe.training.fastpath import FastPath, resolve_fast_path
from visionpipe.models import ModelSpec, build_googlenet
from visionpipe.training.checkpoint import latest_checkpoint
from visionpipe.training.core import (
    Batches,
    EpochCallback,
    EpochRecord,
    Progress,
    Shard,
    TrainingData,
    check_batch_size,
    check_resumable,
    epoch_callbacks,
    epoch_line,
    epoch_record,
    in_second_half,
    log_world,
    load_training_data,
    save_progress,
    should_stop_early,
)
from visionpipe.training.distributed import (
    DistContext,
    all_reduce_sum,
    distributed,
    gather_strings,
    nodes_in_world,
    weights_digest,
)
from visionpipe.training.launch import record_failures
from visionpipe.training.jobs import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, WorkerJob
from visionpipe.training.loop import (
    SGD_BASE_LR,
    EpochStats,
    apply_fast_path,
    build_optimizer,
    maybe_compile,
    place_schedule,
    scaled_lr,
    train_one_epoch,
    validate,
    warmup_cosine,
    warmup_steps,
)
from visionpipe.training.result import TrainResult, write_result
from visionpipe.training.shared import SharedStore
from visionpipe.training.syncbn import convert_sync_batchnorm

log = logging.getLogger(__name__)

__all__ = ["PREEMPTED_EXIT_CODE", "PREEMPTED_MARKER", "WorkerJob", "main", "train_googlenet"]


def rank_batches(data: TrainingData, cfg: GoogLeNetConfig, ctx: DistContext,
                 ) -> tuple[Callable[[int], Batches], Batches]:
    """This rank's training batches of an epoch, and its share of the validation split.

    A new shuffle every epoch (the same permutation on every rank under DDP); the crops are
    seeded per epoch and rank, so a resumed epoch sees the same ones.
    """
    shard = Shard(ctx.rank, ctx.world_size, cfg.seed) if ctx.distributed else None

    def epoch_batches(epoch: int) -> Batches:
        return data.batches("train", cfg.batch_size, shuffle=True, augment=cfg.augment,
                            seed=cfg.seed + 7919 * epoch + ctx.rank, epoch=epoch, shard=shard,
                            drop_lone_last=True, flip=False)

    val = data.batches("val", cfg.batch_size * 2, shuffle=False, augment=False, seed=0,
                       shard=shard)
    return epoch_batches, val


class StopSignal:
    """SIGTERM (preemption) asks to stop; all ranks agree on it after every step.

    Under DDP the agreement lags one step: each step starts an asynchronous all-reduce of the
    flag and reads the one the step before started. On CUDA that read waits on a side stream,
    for that reduction alone: on the training stream it would queue behind the step just
    launched, and the host would wait for the whole step before it queues the next.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.requested = False
        self._previous: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None
        cuda = ctx.distributed and ctx.device.type == "cuda"
        self._side = torch.cuda.Stream(ctx.device) if cuda else None

    def __enter__(self) -> StopSignal:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self) -> bool:
        if not self.ctx.distributed:
            return self.requested
        # torch.full fills on the device; torch.tensor(...) would be a blocking host copy.
        flag = torch.full((1,), 1.0 if self.requested else 0.0, device=self.ctx.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)  # one stops them all
        previous, self._pending = self._pending, (work, flag)
        if previous is None:
            return False
        work_before, flag_before = previous
        if self._side is None:
            work_before.wait()
            return bool(flag_before.item() > 0)
        with torch.cuda.stream(self._side):
            work_before.wait()  # makes the side stream, not the training stream, wait
            on_host = flag_before.to("cpu", non_blocking=True)
        self._side.synchronize()
        return bool(on_host.item() > 0)


class PreemptionCheckpointed(Exception):
    """SIGTERM stopped training and rank 0 checkpointed; ``main`` turns it into an exit code."""


@dataclass
class _Trainer:
    job: WorkerJob
    ctx: DistContext
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    spec: ModelSpec
    progress: Progress
    on_epoch: list[EpochCallback]


def train_googlenet(job: WorkerJob, ctx: DistContext) -> TrainResult:
    """Train ``job.config.epochs`` epochs; each rank sees its own shard of the training split.

    An earlier attempt's checkpoint in ``job.out_dir`` is resumed from, mid-epoch included.
    """
    cfg, dataset = job.config, job.dataset
    faults.inject("raise", ctx.rank)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # An empty fast.compile stays off here: GoogLeNet's compile pays only after about 8 million
    # images per process, and compiling under DDP was not measured (docs/benchmarks.md).
    fast_path = resolve_fast_path(cfg.fast, ctx.device.type, distributed=ctx.distributed,
                                  grad_accumulation=cfg.grad_accumulation)
    check_batch_size(cfg.batch_size, dataset.split_counts["train"] // ctx.world_size)
    data = load_training_data(dataset, cfg.fast, ctx.device, fast_path, cfg.photo)
    epoch_batches, val_batches = rank_batches(data, cfg, ctx)
    batches = len(epoch_batches(1))  # type: ignore[arg-type]
    trainer = _build_trainer(job, ctx, -(-batches // cfg.grad_accumulation), fast_path)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    progress = trainer.progress
    faults.inject("oom", ctx.rank)  # test hook: an out-of-memory error in the first step
    with StopSignal(ctx) as stop:
        first = cfg.epochs + 1 if progress.stopped_early else progress.epoch + 1
        for epoch in range(first, cfg.epochs + 1):
            if epoch > 1:
                faults.inject("die", ctx.rank)  # test hook: a rank lost after a checkpoint
            loader = epoch_batches(epoch)
            trainer.ddp_model.train()
            local = train_one_epoch(
                trainer.ddp_model, loader, trainer.optimizer, trainer.scheduler, criterion,
                ctx.device, aux_weight=cfg.aux_weight, skip=progress.step,
                step_seed=(cfg.seed * 1_000_003 + epoch * 10_007 + ctx.rank) * 1009,
                should_stop=stop.agreed, accumulation=cfg.grad_accumulation, fast_path=fast_path)
            if local.stopped:
                _preempt(trainer, local.steps)
            train = EpochStats.from_tensor(all_reduce_sum(local.as_tensor(), ctx), local.seconds)
            val = validate(trainer.model, val_batches, criterion, ctx, fast_path)
            _end_epoch(trainer, epoch_record(epoch, train, val, phase="train", phase_epoch=epoch,
                                             lr=trainer.optimizer.param_groups[0]["lr"]))
            if progress.stopped_early:
                log.info("no better val top-1 for %d epochs: stopping after epoch %d of %d",
                         progress.since_best, epoch, cfg.epochs)
                break
    return _result(trainer)


def _result(trainer: _Trainer) -> TrainResult:
    """Rank 0's checkpoints and progress, with every rank's weights digest (a collective)."""
    out_dir, progress, ctx = Path(trainer.job.out_dir), trainer.progress, trainer.ctx
    return TrainResult(best_checkpoint=str(out_dir / "best.pt"), last_checkpoint=str(out_dir / "last.pt"),
                       best_val_top1=progress.best_top1, best_epoch=progress.best_epoch,
                       epochs_run=progress.epoch, spec=trainer.spec,
                       history=progress.history, world_size=ctx.world_size,
                       nnodes=nodes_in_world(), node_index=trainer.job.node_index,
                       rank_weight_digests=gather_strings(weights_digest(trainer.model), ctx),
                       resumed_from_epoch=progress.resumed_from_epoch)


def _build_trainer(job: WorkerJob, ctx: DistContext, steps_per_epoch: int,
                   fast_path: FastPath) -> _Trainer:
    """Model, optimizer and schedule, restored from the newest valid checkpoint if there is one."""
    cfg, dataset = job.config, job.dataset
    model = build_googlenet(dataset.num_classes, cfg.small_input_stem)
    spec = ModelSpec(arch="googlenet", num_classes=dataset.num_classes, class_names=dataset.class_names,
                     image_size=dataset.image_size, small_input_stem=cfg.small_input_stem,
                     recipe=dataset.recipe, resize_size=dataset.resize_size)
    saved = latest_checkpoint(Path(job.out_dir))  # every rank reads rank 0's files
    _check_same_checkpoint(saved, ctx)  # on every rank, with a checkpoint or without
    progress = Progress()
    if saved is not None:
        model.load_state_dict(saved["model"])
        progress = _resumed_progress(saved, cfg, ctx)
    ddp_model, model = _wrap(apply_fast_path(model.to(ctx.device), fast_path), cfg, ctx, fast_path)
    optimizer = build_optimizer([{"params": list(ddp_model.parameters()), "lr": peak_lr(cfg, ctx)}],
                                cfg.optim, ctx.device)
    total = cfg.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, total, warmup_steps(cfg.warmup_epochs, steps_per_epoch, total))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        place_schedule(scheduler, progress.epoch * steps_per_epoch + progress.step // cfg.grad_accumulation)
    callbacks = epoch_callbacks(job.mlflow_run_id, _log_epoch(cfg, ctx), is_main=ctx.is_main)
    return _Trainer(job, ctx, model, ddp_model, optimizer, scheduler, spec, progress, callbacks)


def _resumed_progress(saved: dict[str, Any], cfg: GoogLeNetConfig, ctx: DistContext) -> Progress:
    """The checkpoint's progress, its step counted in this run's batches."""
    # Launch settings may change between attempts (an elastic restart); training ones may not.
    before = check_resumable(saved, cfg, ignore={"launch"})
    progress = Progress.restored(saved)
    progress.step = saved["step"] * before.batch_size // cfg.batch_size
    if progress.step and saved["world_size"] != ctx.world_size:
        # Shards differ with the world size: the steps done do not map onto the new ones.
        log.warning("world size changed from %d to %d: epoch %d restarts from its first step",
                    saved["world_size"], ctx.world_size, saved["epoch"] + 1)
        progress.step = 0
    log.info("resuming from %s: epoch %d done, %d steps into the next", saved["path"],
             saved["epoch"], saved["step"])
    return progress


def peak_lr(cfg: GoogLeNetConfig, ctx: DistContext) -> float:
    """``cfg.lr``, or by the linear scaling rule the rate for this world's global batch."""
    if cfg.lr is not None:
        return cfg.lr
    return scaled_lr(SGD_BASE_LR, cfg.batch_size * ctx.world_size * cfg.grad_accumulation)


def _check_same_checkpoint(saved: dict[str, Any] | None, ctx: DistContext) -> None:
    """Every rank must resume from the same checkpoint, or all start afresh (on S3 each node
    reads its own copy). A collective: every rank calls it, having found a checkpoint or not."""
    seen = gather_strings("none" if saved is None else f"{saved['epoch']}:{saved['step']}", ctx)
    if len(set(seen)) > 1:
        raise RuntimeError(f"the ranks found different checkpoints (epoch:step per rank, 'none' "
                           f"for no checkpoint: {seen}); "
                           "the shared folder changed while the nodes started. A retry reads it "
                           "again")


def _wrap(model: nn.Module, cfg: GoogLeNetConfig, ctx: DistContext,
          fast_path: FastPath) -> tuple[nn.Module, nn.Module]:
    """The network wrapped for DDP (alone: as it is) and compiled if asked, and the bare module
    whose state is saved."""
    if cfg.sync_batchnorm and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
    wrapped = model
    if ctx.distributed:
        ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        # Every step uses every parameter (the auxiliary heads too), so the graph is static.
        wrapped = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                          static_graph=fast_path.static_graph)
    # Alone, the short last batch runs eagerly; under DDP one module serves every batch.
    return maybe_compile(wrapped, fast_path, None if ctx.distributed else cfg.batch_size), model


def _end_epoch(trainer: _Trainer, record: EpochRecord) -> None:
    progress, cfg = trainer.progress, trainer.job.config
    improved = progress.end_epoch(record, eligible=in_second_half(int(record["epoch"]), cfg.epochs))
    # Every rank has the same all-reduced record, so all of them stop together; the checkpoint
    # records it, so a resumed run ends where this one did.
    progress.stopped_early = should_stop_early(progress.since_best, cfg.early_stopping_patience,
                                               progress.epoch, cfg.epochs)
    if trainer.ctx.is_main:
        _save_checkpoint(trainer, improved)
    for callback in trainer.on_epoch:  # rank 0 only: the list is empty on the others
        callback(record)


def _preempt(trainer: _Trainer, steps_done: int) -> None:
    """Checkpoint the step just finished (rank 0), leave a marker for the task, and stop."""
    trainer.progress.step = steps_done
    if trainer.ctx.is_main:
        _save_checkpoint(trainer, improved=False)
        marker = Path(trainer.job.out_dir) / PREEMPTED_MARKER
        marker.write_text(f"epoch {trainer.progress.epoch} done, {steps_done} steps into the next\n")
        log.warning("preempted: checkpoint written %d steps into epoch %d", steps_done,
                    trainer.progress.epoch + 1)
    raise PreemptionCheckpointed


def _save_checkpoint(trainer: _Trainer, improved: bool) -> None:
    out_dir = Path(trainer.job.out_dir)
    save_progress(out_dir, model=trainer.model, optimizer=trainer.optimizer,
                  scheduler=trainer.scheduler, cfg=trainer.job.config, spec=trainer.spec,
                  progress=trainer.progress, phase="train", improved=improved,
                  # the step count is in shards of this world size
                  world_size=trainer.ctx.world_size, rank=trainer.ctx.rank)
    if trainer.job.shared_dir:  # S3: the next attempt may run on other hosts
        changed = ["prev.pt", "prev.pt.sha256"] + (["best.pt", "best.pt.sha256"] if improved else [])
        SharedStore(trainer.job.shared_dir).push(out_dir, [*changed, "last.pt", "last.pt.sha256"])


def _log_epoch(cfg: GoogLeNetConfig, ctx: DistContext) -> EpochCallback:
    def log_line(record: EpochRecord) -> None:
        log.info("epoch %d/%d train loss %.4f top-1 %.3f | val top-1 %.3f (%.0f img/s, world %d)",
                 record["epoch"], cfg.epochs, record["train_loss"], record["train_top1"],
                 record["val_top1"], record["train_images_per_s"], ctx.world_size)
        print(epoch_line(record), flush=True)  # the task's progress artifact reads this line
    return log_line


@record_failures  # each rank's error file: what it raised, and whether a retry can help
def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m visionpipe.training.worker <job.json>", file=sys.stderr)
        return 2
    # The imports' objects live until exit: out of the cyclic collector's sight, they are not
    # scanned again by every full collection, nor once more at exit (about 1 s per process).
    gc.freeze()
    try:
        return _run(argv[0])
    finally:
        gc.freeze()


def _run(job_path: str) -> int:
    job = WorkerJob.model_validate_json(Path(job_path).read_text())
    # torchrun --tee puts the local rank in front of every line; the launching task keeps it.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    launch = job.config.launch
    with distributed(timeout_s=launch.timeout_s, backend=launch.backend) as ctx:
        log.info("rank %d of %d on %s (%d threads), node %d of %d", ctx.rank, ctx.world_size,
                 ctx.device, torch.get_num_threads(), int(os.environ.get("GROUP_RANK", "0")),
                 nodes_in_world())
        if ctx.is_main and job.mlflow_run_id:
            log_world(job.mlflow_run_id, ctx)
        try:
            result = train_googlenet(job, ctx)
        except PreemptionCheckpointed:
            return PREEMPTED_EXIT_CODE
        if ctx.is_main:
            write_result(result, Path(job.result_path))
            if job.shared_dir:
                SharedStore(job.shared_dir).push(Path(job.result_path).parent,
                                                 [Path(job.result_path).name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

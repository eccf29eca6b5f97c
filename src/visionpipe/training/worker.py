"""GoogLeNet from scratch under DistributedDataParallel: the process torchrun starts.

    python -m torch.distributed.run --nproc-per-node 2 -m visionpipe.training.worker job.json

Without torchrun (``RANK`` unset) the same module trains in one plain process. Only rank 0
writes checkpoints, logs to MLflow and writes the result file.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

from visionpipe import faults, tracking
from visionpipe.config import FastPath, GoogLeNetConfig, same_training
from visionpipe.data import PreparedDataset, build_loader, load_split
from visionpipe.data.loading import BatchIterator, drops_lone_last
from visionpipe.data.streaming import StreamingLoader, decoded_bytes
from visionpipe.models import ModelSpec, build_googlenet
from visionpipe.training.checkpoint import latest_checkpoint, rotate_and_save
from visionpipe.training.distributed import (
    DistContext,
    all_reduce_sum,
    broadcast_buffers,
    distributed,
    gather_strings,
    nodes_in_world,
)
from visionpipe.training.finetune import check_batch_size
from visionpipe.training.loop import (
    SGD_BASE_LR,
    EpochStats,
    apply_fast_path,
    build_optimizer,
    evaluate,
    maybe_compile,
    place_schedule,
    scaled_lr,
    train_one_epoch,
    warmup_cosine,
    warmup_steps,
)
from visionpipe.training.result import TrainResult
from visionpipe.training.shared import SharedStore
from visionpipe.training.syncbn import convert_sync_batchnorm

log = logging.getLogger(__name__)


class WorkerJob(BaseModel):
    """Everything a rank needs, written as JSON by the task that launches torchrun."""

    config: GoogLeNetConfig
    dataset: PreparedDataset
    out_dir: str
    result_path: str
    mlflow_run_id: str | None = None
    # Multi-node: the S3 prefix rank 0 uploads checkpoints to (a mounted volume is out_dir
    # itself), and the node run this launch belongs to.
    shared_dir: str | None = None
    node_index: int | None = None


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", what a preempted rank exits with
PREEMPTED_MARKER = "PREEMPTED"


def build_train_loader(images: torch.Tensor, labels: torch.Tensor, cfg: GoogLeNetConfig,
                       ctx: DistContext, epoch: int = 1,
                       ) -> tuple[BatchIterator, DistributedSampler[Any] | None]:
    """This rank's shard of the training split for ``epoch`` (a new shuffle every epoch)."""
    sampler = (DistributedSampler(TensorDataset(images, labels), num_replicas=ctx.world_size,
                                  rank=ctx.rank, shuffle=True, seed=cfg.seed)
               if ctx.distributed else None)
    if sampler is not None:
        sampler.set_epoch(epoch)  # the same permutation on every rank, a new one each epoch
    # Augmentation is seeded per epoch and rank, so a resumed epoch sees the same crops.
    # DistributedSampler gives every rank as many images, so all ranks drop a lone last one.
    count = len(sampler) if sampler is not None else len(labels)
    loader = build_loader(images, labels, cfg.batch_size, shuffle=True, augment=cfg.augment,
                          seed=cfg.seed + 7919 * epoch + ctx.rank, sampler=sampler, flip=False,
                          drop_last=drops_lone_last(count, cfg.batch_size))
    return loader, sampler


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


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; ``main`` turns it into an exit code."""


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    step: int = 0  # batches done in the next epoch (a preemption checkpoint)
    best: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int | None = None


@dataclass
class _Trainer:
    job: WorkerJob
    ctx: DistContext
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    spec: ModelSpec
    state: _State


def train_googlenet(job: WorkerJob, ctx: DistContext) -> TrainResult:
    """Train ``job.config.epochs`` epochs; each rank sees its own shard of the training split.

    An earlier attempt's checkpoint in ``job.out_dir`` is resumed from, mid-epoch included.
    """
    cfg, dataset = job.config, job.dataset
    faults.inject("raise", ctx.rank)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # An empty fast.compile stays off here: GoogLeNet's compile pays only after about 8 million
    # images per process, and compiling under DDP was not measured (docs/benchmarks.md).
    fast = cfg.fast.resolve(ctx.device.type, distributed=ctx.distributed,
                            grad_accumulation=cfg.grad_accumulation)
    check_batch_size(cfg.batch_size, dataset.split_counts["train"] // ctx.world_size)
    epoch_batches, val_loader = _batches(dataset, cfg, ctx, fast)
    batches = len(epoch_batches(1))
    trainer = _build_trainer(job, ctx, steps_per_epoch=-(-batches // cfg.grad_accumulation), fast=fast)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    state = trainer.state
    faults.inject("oom", ctx.rank)  # test hook: an out-of-memory error in the first step
    with StopSignal(ctx) as stop:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            if epoch > 1:
                faults.inject("die", ctx.rank)  # test hook: a rank lost after a checkpoint
            loader = epoch_batches(epoch)
            trainer.ddp_model.train()
            local = train_one_epoch(
                trainer.ddp_model, loader, trainer.optimizer, trainer.scheduler, criterion,
                ctx.device, aux_weight=cfg.aux_weight, skip=state.step,
                step_seed=(cfg.seed * 1_000_003 + epoch * 10_007 + ctx.rank) * 1009,
                should_stop=stop.agreed, accumulation=cfg.grad_accumulation, fast=fast)
            if local.stopped:
                _preempt(trainer, local.steps)
            state.step = 0
            train = EpochStats.from_tensor(all_reduce_sum(local.as_tensor(), ctx), local.seconds)
            val_start = time.perf_counter()
            val_top1 = validate(trainer.model, val_loader, criterion, ctx, fast)
            _end_epoch(trainer, epoch, train, val_top1, time.perf_counter() - val_start)
    out_dir = Path(job.out_dir)
    return TrainResult(best_checkpoint=str(out_dir / "best.pt"), last_checkpoint=str(out_dir / "last.pt"),
                       best_val_top1=state.best, best_epoch=state.best_epoch, epochs_run=cfg.epochs,
                       spec=trainer.spec, history=state.history, world_size=ctx.world_size,
                       nnodes=nodes_in_world(), node_index=job.node_index,
                       rank_weight_digests=gather_strings(weights_digest(trainer.model), ctx),
                       resumed_from_epoch=state.resumed_from_epoch)


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's parameters, to show that every rank ended with the same.

    Buffers are left out: BatchNorm's running statistics follow each rank's own last batches
    (DDP copies rank 0's at the start of every forward; rank 0's are the ones saved).
    """
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _batches(dataset: PreparedDataset, cfg: GoogLeNetConfig, ctx: DistContext,
             fast: FastPath) -> tuple[Callable[[int], Batches], Batches]:
    """This rank's training batches of an epoch, and its share of the validation split.

    Rank r validates images r, r + world, r + 2 world, ...: every image once on one rank (a
    DistributedSampler would repeat some to even the shards out, and count them twice). In
    memory (small datasets, on the GPU with the fast path), or streamed from disk by DataLoader
    workers when the training split is larger than ``fast.memory_limit_gb``.
    """
    if not cfg.fast.wants_streaming(decoded_bytes(dataset, "train")):
        train_x, train_y = load_split(dataset, "train")
        if fast.data_on_device:  # small datasets stay on the GPU; batches are sliced there
            train_x, train_y = train_x.to(ctx.device), train_y.to(ctx.device)
        val_x, val_y = load_split(dataset, "val")
        val = build_loader(val_x[ctx.rank::ctx.world_size], val_y[ctx.rank::ctx.world_size],
                           batch_size=cfg.batch_size * 2, shuffle=False, augment=False, seed=0)
        return lambda epoch: build_train_loader(train_x, train_y, cfg, ctx, epoch)[0], val
    count = dataset.split_counts["train"]
    sampler = (DistributedSampler(range(count), num_replicas=ctx.world_size,  # type: ignore[arg-type]
                                  rank=ctx.rank, shuffle=True, seed=cfg.seed)
               if ctx.distributed else None)
    options = {"device": ctx.device, "num_workers": cfg.fast.num_workers,
               "decode_on_device": fast.decode_on_device}
    per_rank = len(sampler) if sampler is not None else count
    train = StreamingLoader(dataset, "train", cfg.batch_size, shuffle=True, augment=cfg.augment,
                            seed=cfg.seed, sampler=sampler, flip=False,
                            drop_last=drops_lone_last(per_rank, cfg.batch_size),
                            **options)  # type: ignore[arg-type]
    val_share = range(ctx.rank, dataset.split_counts["val"], ctx.world_size)
    val = StreamingLoader(dataset, "val", cfg.batch_size * 2, shuffle=False, augment=False, seed=0,
                          sampler=val_share, **options)  # type: ignore[arg-type]

    def epoch_batches(epoch: int) -> Batches:
        # The shuffle and the crops of the in-memory path's epoch.
        train.set_epoch(epoch, seed=cfg.seed + 7919 * epoch + ctx.rank)
        return train

    return epoch_batches, val


def _build_trainer(job: WorkerJob, ctx: DistContext, steps_per_epoch: int, fast: FastPath) -> _Trainer:
    """Model, optimizer and schedule, restored from the newest valid checkpoint if there is one."""
    cfg, dataset = job.config, job.dataset
    model = build_googlenet(dataset.num_classes, cfg.small_input_stem)
    spec = ModelSpec(arch="googlenet", num_classes=dataset.num_classes, class_names=dataset.class_names,
                     image_size=dataset.image_size, small_input_stem=cfg.small_input_stem)
    saved = latest_checkpoint(Path(job.out_dir))  # every rank reads rank 0's files
    _check_same_checkpoint(saved, ctx)  # on every rank, with a checkpoint or without
    state = _State()
    if saved is not None:
        before = _check_resumable(saved, cfg)
        model.load_state_dict(saved["model"])
        progress = saved["progress"]
        step = saved["step"] * before.batch_size // cfg.batch_size  # in this run's batches
        if step and saved["world_size"] != ctx.world_size:
            # Shards differ with the world size: the steps done do not map onto the new ones.
            log.warning("world size changed from %d to %d: epoch %d restarts from its first step",
                        saved["world_size"], ctx.world_size, saved["epoch"] + 1)
            step = 0
        state = _State(epoch=saved["epoch"], step=step, best=progress["best"],
                       best_epoch=progress["best_epoch"], history=list(progress["history"]),
                       resumed_from_epoch=saved["epoch"])
        log.info("resuming from %s: epoch %d done, %d steps into the next", saved["path"],
                 saved["epoch"], saved["step"])
    ddp_model, model = _wrap(apply_fast_path(model.to(ctx.device), fast), cfg, ctx, fast)
    optimizer = build_optimizer([{"params": list(ddp_model.parameters()), "lr": peak_lr(cfg, ctx)}],
                                cfg.optim, ctx.device)
    total = cfg.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, total, warmup_steps(cfg.warmup_epochs, steps_per_epoch, total))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        place_schedule(scheduler, state.epoch * steps_per_epoch + state.step // cfg.grad_accumulation)
    return _Trainer(job, ctx, model, ddp_model, optimizer, scheduler, spec, state)


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


def _check_resumable(saved: dict[str, Any], cfg: GoogLeNetConfig) -> GoogLeNetConfig:
    # Launch settings may change between attempts (an elastic restart); training ones may not.
    before = GoogLeNetConfig.model_validate_json(saved["config"])
    if not same_training(before, cfg, ignore={"launch"}):
        raise ValueError(f"{saved['path']} was written with another googlenet config; use a new "
                         "flow run, or delete that folder to start this stage over")
    return before


def build_ddp_model(cfg: GoogLeNetConfig, num_classes: int, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """The network wrapped for DDP (or not, alone) and the bare module whose state is saved."""
    fast = cfg.fast.resolve(ctx.device.type, distributed=ctx.distributed,
                            grad_accumulation=cfg.grad_accumulation)
    return _wrap(build_googlenet(num_classes, cfg.small_input_stem).to(ctx.device), cfg, ctx, fast)


def _wrap(model: nn.Module, cfg: GoogLeNetConfig, ctx: DistContext,
          fast: FastPath) -> tuple[nn.Module, nn.Module]:
    if cfg.sync_batchnorm and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
    wrapped = model
    if ctx.distributed:
        ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        # Every step uses every parameter (the auxiliary heads too), so the graph is static.
        wrapped = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                          static_graph=fast.static_graph)
    # Alone, the short last batch runs eagerly; under DDP one module serves every batch.
    return maybe_compile(wrapped, fast, None if ctx.distributed else cfg.batch_size), model


def _end_epoch(trainer: _Trainer, epoch: int, train: EpochStats, val_top1: float,
               val_seconds: float) -> None:
    state = trainer.state
    record = {"epoch": epoch, "train_loss": train.loss, "train_top1": train.top1,
              "val_top1": val_top1, "train_images_per_s": train.images_per_s,
              "train_seconds": train.seconds, "val_seconds": val_seconds}
    improved = val_top1 > state.best
    if improved:
        state.best, state.best_epoch = val_top1, epoch
    state.epoch = epoch
    state.history.append(record)
    if trainer.ctx.is_main:
        _save(trainer, improved)
        _report(trainer.job, record, trainer.ctx)


def _preempt(trainer: _Trainer, steps_done: int) -> None:
    """Checkpoint the step just finished (rank 0), leave a marker for the task, and stop."""
    trainer.state.step = steps_done
    if trainer.ctx.is_main:
        _save(trainer, improved=False)
        marker = Path(trainer.job.out_dir) / PREEMPTED_MARKER
        marker.write_text(f"epoch {trainer.state.epoch} done, {steps_done} steps into the next\n")
        log.warning("preempted: checkpoint written %d steps into epoch %d", steps_done,
                    trainer.state.epoch + 1)
    raise Preempted


def validate(model: nn.Module, share: Batches, criterion: nn.Module, ctx: DistContext,
             fast: FastPath | None = None) -> float:
    """Top-1 of rank 0's model over the validation split, each rank scoring its own share.

    Rank 0's BatchNorm statistics go to every rank first, so all score the model rank 0 saves;
    the sums of correct answers and of images are then added up over the ranks. ``fast`` (the
    training's fast path) runs it in bf16 and channels-last on a GPU, as the fine-tune's is.
    """
    broadcast_buffers(model, ctx)
    local = evaluate(model, share, criterion, ctx.device, fast)  # autocast as in training
    return EpochStats.from_tensor(all_reduce_sum(local.as_tensor(), ctx), local.seconds).top1


def _save(trainer: _Trainer, improved: bool) -> None:
    state, ctx, cfg = trainer.state, trainer.ctx, trainer.job.config
    checkpoint = {
        "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "scaler": {}, "epoch": state.epoch,
        "step": state.step, "phase": "scratch", "config": cfg.model_dump_json(),
        "spec": trainer.spec.model_dump_json(), "world_size": ctx.world_size, "rank": ctx.rank,
        "val_top1": state.history[-1]["val_top1"] if state.history else 0.0,
        "rng": torch.get_rng_state(),
        "progress": {"best": state.best, "best_epoch": state.best_epoch, "history": state.history},
    }
    out_dir = Path(trainer.job.out_dir)
    rotate_and_save(checkpoint, out_dir, best=improved)
    if trainer.job.shared_dir:  # S3: the next attempt may run on other hosts
        changed = ["prev.pt", "prev.pt.sha256"] + (["best.pt", "best.pt.sha256"] if improved else [])
        SharedStore(trainer.job.shared_dir).push(out_dir, [*changed, "last.pt", "last.pt.sha256"])


def _report(job: WorkerJob, record: dict[str, float], ctx: DistContext) -> None:
    log.info("epoch %d/%d train loss %.4f top-1 %.3f | val top-1 %.3f (%.0f img/s, world %d)",
             record["epoch"], job.config.epochs, record["train_loss"], record["train_top1"],
             record["val_top1"], record["train_images_per_s"], ctx.world_size)
    if job.mlflow_run_id:
        step = int(record["epoch"])
        tracking.log_metrics(job.mlflow_run_id, {k: v for k, v in record.items() if k != "epoch"}, step)


def write_result(result: TrainResult, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(result.model_dump_json(indent=2))
    os.replace(tmp, path)


@record  # error files let torchrun name the rank that failed first, not one that died of it
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
            _log_world(job.mlflow_run_id, ctx)
        try:
            result = train_googlenet(job, ctx)
        except Preempted:
            return PREEMPTED_EXIT_CODE
        if ctx.is_main:
            write_result(result, Path(job.result_path))
            if job.shared_dir:
                SharedStore(job.shared_dir).push(Path(job.result_path).parent,
                                                 [Path(job.result_path).name])
    return 0


def _log_world(run_id: str, ctx: DistContext) -> None:
    """The world of this attempt: params for the first one, tags always (an elastic retry may
    run on fewer nodes, and MLflow params cannot change)."""
    world = {"world_size": str(ctx.world_size), "nnodes": str(nodes_in_world())}
    tracking.set_tags(run_id, world)
    try:
        tracking.log_params(run_id, world)
    except Exception as exc:  # noqa: BLE001 - an earlier attempt recorded another world
        log.warning("world differs from an earlier attempt's (%s); the tags hold this one", exc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

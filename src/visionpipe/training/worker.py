"""GoogLeNet from scratch under DistributedDataParallel: the process torchrun starts.

    python -m torch.distributed.run --nproc-per-node 2 -m visionpipe.training.worker job.json

Without torchrun (``RANK`` unset) the same module trains in one plain process. Only rank 0
writes checkpoints, logs to MLflow and writes the result file.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from visionpipe import tracking
from visionpipe.config import GoogLeNetConfig
from visionpipe.data import PreparedDataset, build_loader, load_split
from visionpipe.models import ModelSpec, build_googlenet
from visionpipe.training.checkpoint import save_checkpoint
from visionpipe.training.distributed import DistContext, all_reduce_sum, broadcast_float, distributed
from visionpipe.training.finetune import check_batch_size
from visionpipe.training.loop import EpochStats, build_optimizer, evaluate, train_one_epoch, warmup_cosine
from visionpipe.training.result import TrainResult
from visionpipe.training.syncbn import convert_sync_batchnorm

log = logging.getLogger(__name__)


class WorkerJob(BaseModel):
    """Everything a rank needs, written as JSON by the task that launches torchrun."""

    config: GoogLeNetConfig
    dataset: PreparedDataset
    out_dir: str
    result_path: str
    mlflow_run_id: str | None = None


def build_ddp_model(cfg: GoogLeNetConfig, num_classes: int, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """The network wrapped for DDP (or not, alone) and the bare module whose state is saved."""
    model = build_googlenet(num_classes, cfg.small_input_stem).to(ctx.device)
    if cfg.sync_batchnorm and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
    if not ctx.distributed:
        return model, model
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True), model


def build_train_loader(images: torch.Tensor, labels: torch.Tensor, cfg: GoogLeNetConfig,
                       ctx: DistContext) -> tuple[DataLoader[Any], DistributedSampler[Any] | None]:
    """This rank's shard of the training split; call ``sampler.set_epoch`` every epoch."""
    sampler = (DistributedSampler(TensorDataset(images, labels), num_replicas=ctx.world_size,
                                  rank=ctx.rank, shuffle=True, seed=cfg.seed)
               if ctx.distributed else None)
    loader = build_loader(images, labels, cfg.batch_size, shuffle=True, augment=cfg.augment,
                          seed=cfg.seed + ctx.rank, sampler=sampler, flip=False)
    return loader, sampler


def inject_fault(ctx: DistContext) -> None:
    """Test hook: ``VISIONPIPE_INJECT_FAULT=raise:<rank>`` makes that rank raise."""
    spec = os.environ.get("VISIONPIPE_INJECT_FAULT", "")
    if spec == f"raise:{ctx.rank}":
        raise RuntimeError(f"injected fault on rank {ctx.rank}")


def train_googlenet(job: WorkerJob, ctx: DistContext) -> TrainResult:
    """Train ``job.config.epochs`` epochs; each rank sees its own shard of the training split."""
    cfg, dataset = job.config, job.dataset
    inject_fault(ctx)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    train_x, train_y = load_split(dataset, "train")
    check_batch_size(cfg.batch_size, len(train_y) // ctx.world_size)
    loader, sampler = build_train_loader(train_x, train_y, cfg, ctx)
    val_loader = build_loader(*load_split(dataset, "val"), batch_size=cfg.batch_size * 2,
                              shuffle=False, augment=False, seed=0)
    ddp_model, model = build_ddp_model(cfg, dataset.num_classes, ctx)
    optimizer = build_optimizer([{"params": list(ddp_model.parameters()), "lr": cfg.lr}], cfg.optim,
                                ctx.device)
    steps = len(loader)
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps, int(cfg.warmup_epochs * steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    spec = ModelSpec(arch="googlenet", num_classes=dataset.num_classes, class_names=dataset.class_names,
                     image_size=dataset.image_size, small_input_stem=cfg.small_input_stem)
    out_dir = Path(job.out_dir)
    best, best_epoch, history = -1.0, 0, []
    for epoch in range(1, cfg.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        ddp_model.train()
        local = train_one_epoch(ddp_model, loader, optimizer, scheduler, criterion, ctx.device,
                                aux_weight=cfg.aux_weight)
        train = EpochStats.from_tensor(all_reduce_sum(local.as_tensor(), ctx), local.seconds)
        val_top1 = broadcast_float(_validate(model, val_loader, criterion, ctx), ctx)
        record = {"epoch": epoch, "train_loss": train.loss, "train_top1": train.top1,
                  "val_top1": val_top1, "train_images_per_s": train.images_per_s,
                  "train_seconds": train.seconds}
        improved = val_top1 > best
        if improved:
            best, best_epoch = val_top1, epoch
        history.append(record)
        if ctx.is_main:
            _save(model, optimizer, scheduler, cfg, spec, record, out_dir, improved, ctx)
            _report(job, record, ctx)
    return TrainResult(best_checkpoint=str(out_dir / "best.pt"), last_checkpoint=str(out_dir / "last.pt"),
                       best_val_top1=best, best_epoch=best_epoch, epochs_run=cfg.epochs, spec=spec,
                       history=history, world_size=ctx.world_size)


def _validate(model: nn.Module, loader: object, criterion: nn.Module, ctx: DistContext) -> float:
    """Rank 0 scores the whole validation split; the other ranks wait for its broadcast."""
    if not ctx.is_main:
        return 0.0
    return evaluate(model, loader, criterion, ctx.device).top1  # type: ignore[arg-type]


def _save(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, cfg: GoogLeNetConfig,
          spec: ModelSpec, record: dict[str, float], out_dir: Path, improved: bool,
          ctx: DistContext) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": {},  # type: ignore[attr-defined]
             "epoch": int(record["epoch"]), "phase": "scratch", "val_top1": record["val_top1"],
             "config": cfg.model_dump_json(), "spec": spec.model_dump_json(),
             "world_size": ctx.world_size, "rank": ctx.rank, "rng": torch.get_rng_state()}
    save_checkpoint(state, out_dir / "last.pt")
    if improved:
        save_checkpoint(state, out_dir / "best.pt")


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
    job = WorkerJob.model_validate_json(Path(argv[0]).read_text())
    # torchrun --tee puts the local rank in front of every line; the launching task keeps it.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with distributed(timeout_s=job.config.launch.timeout_s) as ctx:
        log.info("rank %d of %d on %s (%d threads)", ctx.rank, ctx.world_size, ctx.device,
                 torch.get_num_threads())
        if ctx.is_main and job.mlflow_run_id:
            tracking.log_params(job.mlflow_run_id, {"world_size": str(ctx.world_size),
                                                    "nnodes": job.config.launch.nnodes})
        result = train_googlenet(job, ctx)
        if ctx.is_main:
            write_result(result, Path(job.result_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

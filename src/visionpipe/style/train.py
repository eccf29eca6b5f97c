"""Train the stylisation network against the perceptual loss, alone or as one DDP rank.

Every epoch writes ``last.pt`` (rank 0 only); a retried task resumes from it and, on the CPU,
ends with the same weights as an uninterrupted run (each epoch and rank draws from its own
seed). Under torchrun (``visionpipe.style.worker``) each rank trains on its shard of every epoch
and the losses are summed over the ranks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from visionpipe import faults
from visionpipe.config import FastPathConfig, StyleLossConfig, StyleTrainConfig
from visionpipe.data import PreparedDataset
from visionpipe.errors import CheckpointError
from visionpipe.style.images import load_image, unit_range
from visionpipe.style.loss import PerceptualLoss, load_loss_network
from visionpipe.style.network import StyleSpec, TransformerNet, build_style_network
from visionpipe.training.checkpoint import latest_checkpoint, load_checkpoint, rotate_and_save
from visionpipe.training.core import Shard, TrainingData, check_batch_size, epoch_callbacks, load_training_data
from visionpipe.training.distributed import (
    DistContext,
    all_reduce_sum,
    gather_strings,
    weights_digest,
    wrap_ddp,
)
from visionpipe.training.fastpath import resolve_fast_path
from visionpipe.training.loop import pick_device

log = logging.getLogger(__name__)

EpochRecord = dict[str, Any]
_TERMS = ("content_loss", "style_loss", "tv_loss", "total_loss")


class StyleResult(BaseModel):
    """What train-style-network hands on (JSON, so it crosses the torchrun border)."""

    checkpoint: str
    spec: StyleSpec
    epochs_run: int
    history: list[EpochRecord]
    world_size: int = 1
    rank_weight_digests: list[str] = []
    resumed_from_epoch: int | None = None


class StyleInputs(BaseModel):
    """Everything a training needs besides its configs: the files the flow fetched."""

    dataset: PreparedDataset
    style: str
    style_path: str
    style_sha256: str
    loss_weights_path: str
    loss_weights_sha256: str | None = None


def perceptual_loss(loss: StyleLossConfig, style_image: torch.Tensor, weights_path: Path,
                    weights_sha256: str | None, device: torch.device) -> PerceptualLoss:
    """The loss module with the style image's Gram matrices, on ``device``."""
    network = load_loss_network(loss.network, [loss.content_layer, *loss.style_layers],
                                weights_path, weights_sha256).to(device)
    return PerceptualLoss(network, loss.content_layer, loss.style_layers, style_image.to(device),
                          loss.content_weight, loss.style_weight, loss.tv_weight)


def style_image_tensor(inputs: StyleInputs, loss: StyleLossConfig) -> torch.Tensor:
    return load_image(Path(inputs.style_path), loss.style_size or inputs.dataset.image_size)


def _training_config(train: StyleTrainConfig, loss: StyleLossConfig) -> str:
    """What a checkpoint must have been written under to be resumed: how many processes, where,
    and how many epochs (the rate is constant: a longer run goes on) may change."""
    return json.dumps({"train": train.model_dump(mode="json", exclude={"launch", "device", "epochs"}),
                       "loss": loss.model_dump(mode="json")}, sort_keys=True)


def train_style(train: StyleTrainConfig, loss: StyleLossConfig, inputs: StyleInputs, out_dir: Path,
                on_epoch: Callable[[EpochRecord], None] | None = None,
                mlflow_run_id: str | None = None, ctx: DistContext | None = None) -> StyleResult:
    """Train ``train.epochs`` epochs on the dataset's training split; return the result."""
    ctx = ctx or DistContext(0, 0, 1, pick_device(train.device), True)
    torch.manual_seed(train.seed)  # the same initial network on every rank
    dataset = inputs.dataset
    check_batch_size(train.batch_size, dataset.split_counts["train"] // ctx.world_size)
    plain = FastPathConfig(autocast_bf16=False, channels_last=False)  # the loader: no autocast, no NHWC
    data = load_training_data(dataset, plain, ctx.device,
                              resolve_fast_path(plain, ctx.device.type, distributed=ctx.distributed))
    criterion = perceptual_loss(loss, style_image_tensor(inputs, loss), Path(inputs.loss_weights_path),
                                inputs.loss_weights_sha256, ctx.device)
    spec = StyleSpec(style=inputs.style, style_sha256=inputs.style_sha256, channels=train.channels,
                     residual_blocks=train.residual_blocks, image_size=dataset.image_size,
                     loss_network=loss.network)
    # The GPU fast path of the training step: bf16 autocast and channels-last.
    fast = ctx.device.type == "cuda" if train.autocast_bf16 is None else train.autocast_bf16
    net = build_style_network(spec).to(ctx.device)
    if fast:
        net = net.to(memory_format=torch.channels_last)
        criterion = criterion.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=train.lr)
    history: list[EpochRecord] = []
    saved = latest_checkpoint(out_dir)  # every rank reads rank 0's files
    first, resumed = 1, None
    if saved is not None:
        if saved.get("config") != _training_config(train, loss):
            raise CheckpointError(f"{saved['path']} was written with another style config; use "
                                  "a new flow run, or delete that folder to start this stage over")
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history, first = list(saved["history"]), saved["epoch"] + 1
        resumed = saved["epoch"]
        log.info("resuming from %s: epoch %d done", saved["path"], saved["epoch"])
    model = wrap_ddp(net, ctx)
    callbacks = epoch_callbacks(mlflow_run_id, on_epoch, is_main=ctx.is_main)
    shard = Shard(ctx.rank, ctx.world_size, train.seed) if ctx.distributed else None
    for epoch in range(first, train.epochs + 1):
        if epoch > 1:
            faults.inject("die", ctx.rank)  # test hook: a rank lost after a checkpoint
        torch.manual_seed(train.seed * 100_003 + epoch * 7919 + ctx.rank)
        record = _train_epoch(model, optimizer, criterion, data, train, epoch, ctx, shard, fast)
        record.update(_validate(net, criterion, data, train.batch_size, ctx, shard))
        history.append(record)
        if ctx.is_main:
            rotate_and_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                             "config": _training_config(train, loss), "spec": spec.model_dump_json(),
                             "epoch": epoch, "history": history}, out_dir)
        for callback in callbacks:
            callback(record)
    digests = gather_strings(weights_digest(net), ctx) if ctx.distributed else []
    return StyleResult(checkpoint=str(out_dir / "last.pt"), spec=spec, epochs_run=len(history),
                       history=history, world_size=ctx.world_size, rank_weight_digests=digests,
                       resumed_from_epoch=resumed)


def _train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: PerceptualLoss,
                 data: TrainingData, train: StyleTrainConfig, epoch: int, ctx: DistContext,
                 shard: Shard | None, fast: bool) -> EpochRecord:
    model.train()
    sums = torch.zeros(len(_TERMS) + 1, dtype=torch.float64)
    start = time.perf_counter()
    batches = data.batches("train", train.batch_size, shuffle=True, augment=False,
                           seed=train.seed + epoch + 1_000_003 * ctx.rank, epoch=epoch,
                           shard=shard, drop_lone_last=True)
    for images, _ in batches:
        content = unit_range(images.to(ctx.device, non_blocking=True))
        if fast:  # bf16 autocast and NHWC on the GPU; the Gram matrices stay float32
            content = content.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=fast):
            terms = criterion(model(content), content)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        n = len(content)
        sums += torch.tensor([*(float(v) * n for v in terms.as_floats().values()), n], dtype=torch.float64)
    seconds = time.perf_counter() - start
    sums = all_reduce_sum(sums, ctx)
    count = max(float(sums[-1]), 1.0)
    record: EpochRecord = {"epoch": epoch, "phase": "train", "phase_epoch": epoch,
                           **{k: float(v) / count for k, v in zip(_TERMS, sums[:-1].tolist(), strict=True)},
                           "train_images_per_s": float(sums[-1]) / seconds if seconds else 0.0,
                           "train_seconds": seconds}
    record["train_loss"] = record["total_loss"]
    return record


@torch.no_grad()
def _validate(net: TransformerNet, criterion: PerceptualLoss, data: TrainingData, batch_size: int,
              ctx: DistContext, shard: Shard | None) -> EpochRecord:
    """The total loss on the validation split, each rank scoring its share."""
    net.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    strided = Shard(ctx.rank, ctx.world_size) if shard is not None else None
    for images, _ in data.batches("val", batch_size, shuffle=False, augment=False, seed=0, shard=strided):
        content = unit_range(images.to(ctx.device))
        total = criterion(net(content), content).total
        sums += torch.tensor([float(total) * len(content), len(content)], dtype=torch.float64)
    sums = all_reduce_sum(sums, ctx)
    return {"val_loss": float(sums[0]) / max(float(sums[1]), 1.0)}


def load_style_network(checkpoint: Path) -> tuple[TransformerNet, StyleSpec]:
    """A trained network (eval mode) and its spec from a checkpoint."""
    state = load_checkpoint(checkpoint)
    spec = StyleSpec.model_validate_json(state["spec"])
    net = build_style_network(spec)
    net.load_state_dict(state["model"])
    return net.eval(), spec


"""Run by torchrun in the DDP tests: exercises the worker's pieces on each rank, writes JSON."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from visionpipe.config import GoogLeNetConfig
from visionpipe.data import build_loader
from visionpipe.models import build_googlenet
from visionpipe.training.core import TrainingData
from visionpipe.training.distributed import DistContext, distributed
from visionpipe.training.loop import classification_loss, train_one_epoch, validate
from visionpipe.training.syncbn import convert_sync_batchnorm
from visionpipe.training.worker import _check_same_checkpoint, rank_batches


def ddp_googlenet(cfg: GoogLeNetConfig, num_classes: int, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """GoogLeNet wrapped for DDP as the worker wraps it, and the bare module whose state is saved."""
    model = build_googlenet(num_classes, cfg.small_input_stem).to(ctx.device)
    if cfg.sync_batchnorm:
        model = convert_sync_batchnorm(model, ctx.device)
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True), model


def shards(out: Path) -> None:
    """Which sample indices each rank sees in two epochs, and weights after one DDP step."""
    cfg = GoogLeNetConfig(batch_size=4, small_input_stem=True)
    with distributed() as ctx:
        images = torch.randint(0, 255, (22, 3, 32, 32), dtype=torch.uint8)
        labels = torch.arange(22) % 10
        ids = torch.arange(22)
        data = TrainingData(None, cfg.fast, ctx.device, splits={"train": (images, ids),
                                                                 "val": (images, ids)})
        epoch_batches, _ = rank_batches(data, cfg, ctx)
        seen = {epoch: torch.cat([y for _, y in epoch_batches(epoch)]).tolist() for epoch in (1, 2)}
        torch.manual_seed(cfg.seed)
        ddp_model, model = ddp_googlenet(cfg, 10, ctx)
        optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
        if ctx.is_main:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out / "initial.pt")
        batch = [(x, labels[y]) for x, y in list(epoch_batches(2))[:1]]
        ddp_model.train()
        train_one_epoch(ddp_model, batch, optimizer, None, nn.CrossEntropyLoss(), ctx.device, 0.3)
        # Parameters stay identical under DDP; BatchNorm's running statistics are per rank until
        # the next forward broadcasts rank 0's buffers.
        torch.save({n: p.detach() for n, p in model.named_parameters()}, out / f"weights-{ctx.rank}.pt")
        (out / f"shards-{ctx.rank}.json").write_text(json.dumps(seen))


def syncbn(out: Path, batch: int) -> None:
    """Gradients of a world-size-2 SyncBatchNorm step with batch B per rank vs one process with 2B."""
    with distributed() as ctx:
        torch.manual_seed(0)
        # float64: GoogLeNet's init (weights ~0.01) gives activations whose variance is near
        # BatchNorm's eps, which amplifies float32 round-off ~1e4x over 60 layers. In float64
        # what is left is the order of the sums.
        model = build_googlenet(10, small_input_stem=True).double()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0  # dropout masks differ between the runs; BN is what is under test
        reference = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2 * batch, 3, 32, 32, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (2 * batch,), generator=gen)
        mine = slice(ctx.rank * batch, (ctx.rank + 1) * batch)
        results = {}
        for name, sync in (("sync", True), ("plain", False)):
            net = copy.deepcopy(model)
            net = convert_sync_batchnorm(net, ctx.device) if sync else net
            ddp = DistributedDataParallel(net.train())
            loss, _ = classification_loss(ddp(x[mine]), y[mine], nn.CrossEntropyLoss(), 0.3)
            loss.backward()
            results[name] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        if ctx.is_main:
            reference.train()
            loss, _ = classification_loss(reference(x), y, nn.CrossEntropyLoss(), 0.3)
            loss.backward()
            ref = {n: p.grad for n, p in reference.named_parameters()}
            torch.save({"reference": ref, **results}, out / "grads.pt")


def validation(out: Path, count: int) -> None:
    """Each rank validates its share of ``count`` images, with BatchNorm statistics of its own.

    The labels agree with rank 0's model on the first ``count // 2 + 1`` images only, so the
    top-1 of rank 0's model over all images, each counted once, is (count // 2 + 1) / count.
    """
    with distributed() as ctx:
        torch.manual_seed(0)
        model = build_googlenet(10, small_input_stem=True)
        images = torch.randint(0, 255, (count, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(1))
        whole = torch.cat([x for x, _ in build_loader(
            images, torch.zeros(count, dtype=torch.int64), 8, shuffle=False, augment=False, seed=0)])
        nn.init.normal_(model.fc.weight, std=1.0)  # a fresh head's logits are all but equal
        with torch.no_grad():
            model.train()(whole)  # running statistics of these images, so that they matter
            predicted = model.eval()(whole).argmax(1)
        right = count // 2 + 1
        labels = torch.where(torch.arange(count) < right, predicted, (predicted + 1) % 10)
        with torch.no_grad():  # what DDP leaves after an epoch: each rank's own statistics
            for name, buffer in model.named_buffers():
                if name.endswith("running_mean"):
                    buffer.add_(0.5 * ctx.rank)  # changes every prediction here
        share = build_loader(images[ctx.rank::ctx.world_size], labels[ctx.rank::ctx.world_size],
                             4, shuffle=False, augment=False, seed=0)
        top1 = validate(model, share, nn.CrossEntropyLoss(), ctx).top1
        (out / f"validation-{ctx.rank}.json").write_text(json.dumps(
            {"top1": top1, "expected": right / count, "share": len(labels[ctx.rank::ctx.world_size])}))


def resume_check(out: Path) -> None:
    """Rank 0 found a checkpoint, rank 1 none (a node whose copy of the shared folder lacks it)."""
    with distributed(timeout_s=30) as ctx:
        saved = {"epoch": 2, "step": 0} if ctx.is_main else None
        try:
            _check_same_checkpoint(saved, ctx)
            outcome = "resumed"
        except RuntimeError as exc:
            outcome = str(exc)
        (out / f"resume-{ctx.rank}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    target = Path(sys.argv[2])
    if sys.argv[1] == "shards":
        shards(target)
    elif sys.argv[1] == "resume_check":
        resume_check(target)
    elif sys.argv[1] == "validation":
        validation(target, int(sys.argv[3]))
    else:
        syncbn(target, int(sys.argv[3]))

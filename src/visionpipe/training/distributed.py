"""Process-group set-up and tear-down for a worker started by torchrun, or alone."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def _device(local_rank: int, requested: str) -> torch.device:
    if requested == "cpu" or not torch.cuda.is_available():
        if requested == "cuda":
            raise ValueError("device='cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextmanager
def distributed(device: str = "auto", timeout_s: float = 600.0,
                backend: str = "auto") -> Iterator[DistContext]:
    """Yield rank, world size, device and ``is_main``; always destroy the process group.

    Under torchrun (``RANK`` is set) this joins the group: NCCL on GPUs, gloo on the CPU;
    ``backend='gloo'`` trains on the CPU even where GPUs are visible, ``'nccl'`` requires them.
    Without ``RANK`` the same worker runs as one plain process and no group is created.
    """
    if backend == "gloo":
        device = "cpu"
    elif backend == "nccl":
        device = "cuda"
    if "RANK" not in os.environ:
        yield DistContext(0, 0, 1, _device(0, device), True)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    dev = _device(local_rank, device)
    name = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(name, timeout=dt.timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)
    try:
        yield DistContext(rank, local_rank, world_size, dev, rank == 0)
    finally:
        dist.destroy_process_group()


def nodes_in_world() -> int:
    """How many nodes (torchrun agents) joined this world; 1 outside torchrun."""
    return int(os.environ.get("GROUP_WORLD_SIZE", "1"))


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a small tensor over all ranks (a no-op alone)."""
    if not ctx.distributed:
        return values
    reduced = values.to(ctx.device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers on every rank: BatchNorm's running statistics, as rank 0 saves them.

    DDP copies them from rank 0 at the start of each forward, so after an epoch every rank holds
    the statistics of its own last batch; a rank that validates must hold rank 0's.
    """
    if not ctx.distributed:
        return
    for work in [dist.broadcast(b, src=0, async_op=True) for b in module.buffers()]:
        work.wait()  # type: ignore[union-attr]


def gather_strings(value: str, ctx: DistContext) -> list[str]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not ctx.distributed:
        return [value]
    values: list[str] = [""] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def weights_digest(model: torch.nn.Module) -> str:
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


def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``model`` under DistributedDataParallel in a process group (alone: as it is)."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

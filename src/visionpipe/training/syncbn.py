"""Synchronised BatchNorm for every backend: torch's on GPUs, a gloo-capable one on the CPU.

``torch.nn.SyncBatchNorm`` runs only on GPU tensors (its kernels have no CPU implementation), and
DDP refuses it on CPU modules. CPU runs (a laptop, CI, a CPU pool) get ``GlooSyncBatchNorm2d``:
the same statistics over the global batch, built on torch's differentiable collectives, whose
backward all-reduces the gradients of the statistics just as SyncBatchNorm's own kernel does.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks of the default process group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        local_count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        # Two passes, as BatchNorm computes it: the global mean first, then the spread around it.
        sums = dist_fn.all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), local_count]))
        count = sums[-1]
        mean = sums[:channels] / count  # C
        centred = x - mean.view(1, -1, 1, 1)
        var = dist_fn.all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count  # C, biased
        self._update_running_stats(mean.detach(), var.detach(), count.detach())
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace BatchNorm layers by synchronised ones: torch's on GPUs, ours on the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    # The differentiable all_reduce is marked deprecated in favour of a private module without
    # autograd support; it is still the public, working API for this.
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm2d):
        synced = GlooSyncBatchNorm2d(module.num_features, module.eps, module.momentum,
                                     module.affine, module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        setattr(module, name, _convert_cpu(child))
    return module

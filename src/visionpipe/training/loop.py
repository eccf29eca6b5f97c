"""Plain training and evaluation steps, in the style of torchvision's reference scripts."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visionpipe.config import OptimConfig
from visionpipe.training.distributed import DistContext, all_reduce_sum, broadcast_buffers
from visionpipe.training.fastpath import FastPath


@dataclass
class EpochStats:
    """Sums over one pass; ``reduce`` turns them into means (after an all-reduce under DDP)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0
    steps: int = 0  # batches done in this epoch, skipped ones included
    stopped: bool = False  # interrupted by ``should_stop`` before the epoch's end

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def top1(self) -> float:
        return self.correct / max(self.count, 1)

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, float(self.correct), float(self.count)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, seconds: float) -> EpochStats:
        loss_sum, correct, count = t.tolist()
        return cls(loss_sum, int(round(correct)), int(round(count)), seconds)


def classification_loss(
    outputs: torch.Tensor | Sequence[torch.Tensor | None],
    labels: torch.Tensor,
    criterion: nn.Module,
    aux_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and main logits; GoogLeNet's auxiliary logits add ``aux_weight`` x their loss each."""
    if isinstance(outputs, torch.Tensor):
        return criterion(outputs, labels), outputs
    logits, *aux = outputs
    assert logits is not None
    loss = criterion(logits, labels)
    for aux_logits in aux:
        if aux_logits is not None:
            loss = loss + aux_weight * criterion(aux_logits, labels)
    return loss, logits


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    criterion: nn.Module,
    device: torch.device,
    aux_weight: float = 0.0,
    skip: int = 0,
    step_seed: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    accumulation: int = 1,
    fast_path: FastPath | None = None,
) -> EpochStats:
    """One pass over ``batches``; the scheduler steps per batch. The caller sets train mode.

    ``skip`` passes over the batches an interrupted attempt already trained on; ``step_seed``
    seeds each step (dropout) by its index, so a resumed epoch draws what an uninterrupted one
    would; ``should_stop`` is asked after every optimizer step and ends the epoch early when it
    says so. ``accumulation`` batches make one optimizer step (the global batch of a run whose
    per-device batch was halved after an out-of-memory error). ``fast_path`` turns on bf16 autocast
    and channels-last batches.
    """
    stats = EpochStats()
    start = time.perf_counter()
    total = len(batches) if isinstance(batches, Sized) else None
    # Sums stay on the device until the epoch ends: a per-step ``.item()`` waits for the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    # Gradients are released right before a cycle's first backward, not after its step: freed
    # earlier, on the CPU they came back as page faults (8% slower; docs/benchmarks.md).
    release_grads = True
    # Accumulated batches weigh by their size against a full group; a short last group is
    # rescaled to its own mean, so a batch split after an out-of-memory error trains as whole.
    full_group = group_images = 0
    for step, (images, labels) in enumerate(batches):
        if step < skip:
            stats.steps += 1
            continue
        if step_seed is not None:
            torch.manual_seed(step_seed + step)
        images, labels = _to_device(images, labels, device, fast_path)
        n = labels.shape[0]
        with _autocast(device, fast_path):
            loss, logits = classification_loss(model(images), labels, criterion, aux_weight)
        if release_grads:
            optimizer.zero_grad(set_to_none=True)
            release_grads = False
        if accumulation == 1:
            loss.backward()
        else:
            full_group = full_group or accumulation * n
            group_images += n
            (loss * (n / full_group)).backward()
        boundary = (step + 1) % accumulation == 0 or (total is not None and step + 1 == total)
        if boundary:
            if group_images and group_images != full_group:
                _scale_grads(optimizer, full_group / group_images)
            group_images = 0
            optimizer.step()
            release_grads = True
            if scheduler is not None:
                scheduler.step()
        # Weighted by the batch's own size, so a short last batch counts for what it is.
        loss_sum += loss.detach().double() * n
        # MixUp / CutMix give soft labels (N x classes): the right answer is their argmax.
        hard = labels.argmax(1) if labels.dim() > 1 else labels
        correct += (logits.detach().argmax(1) == hard).sum()
        stats.count += n
        stats.steps += 1
        if boundary and should_stop is not None and should_stop():
            stats.stopped = True
            break
    stats.loss_sum, stats.correct = loss_sum.item(), int(correct.item())
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def _scale_grads(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.grad.mul_(factor)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               fast_path: FastPath | None) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    # Images only: the frozen phase's cached features are N x C, which have no NHWC form.
    if fast_path is not None and fast_path.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _autocast(device: torch.device, fast_path: FastPath | None) -> torch.autocast:
    enabled = fast_path is not None and fast_path.autocast_bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def apply_fast_path(model: nn.Module, fast_path: FastPath) -> nn.Module:
    """Memory format and cuDNN autotuning for a model about to train (``maybe_compile`` compiles)."""
    if fast_path.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if fast_path.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(model: nn.Module, fast_path: FastPath, batch_size: int | None = None) -> nn.Module:
    """``torch.compile`` with the configured mode when the fast path asks for it.

    With ``batch_size``, only batches of that size run compiled: the epoch's short last batch
    runs eagerly instead of paying for a second compilation (or a dynamic-shape one).
    """
    if not fast_path.compile:
        return model
    if batch_size is not None:
        return FullBatchCompiled(model, fast_path.compile_mode, batch_size)
    return torch.compile(model, mode=fast_path.compile_mode)  # type: ignore[return-value]


class FullBatchCompiled(nn.Module):
    """``model`` compiled for ``batch_size``; any other batch size calls it eagerly."""

    def __init__(self, model: nn.Module, mode: str, batch_size: int) -> None:
        super().__init__()
        self.eager = model
        self.compiled = torch.compile(model, mode=mode)
        self.batch_size = batch_size
        self.eager_calls = 0

    def forward(self, images: torch.Tensor) -> Any:
        if images.shape[0] == self.batch_size:
            return self.compiled(images)
        self.eager_calls += 1
        return self.eager(images)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    fast_path: FastPath | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every batch, on the CPU, with the model in eval mode."""
    model.eval()
    outs, targets = [], []
    for images, labels in batches:
        images, _ = _to_device(images, labels, device, fast_path)
        with _autocast(device, fast_path):
            outs.append(model(images).float())
        targets.append(labels)
    if not outs:  # no batches: a DDP rank's share of a split smaller than the world
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    # One copy to the host at the end: a copy per batch would wait for each batch in turn.
    return torch.cat(outs).cpu(), torch.cat([t.cpu() for t in targets])


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    device: torch.device,
    fast_path: FastPath | None = None,
) -> EpochStats:
    """Loss and top-1 over ``batches`` in eval mode."""
    start = time.perf_counter()
    logits, labels = predict_logits(model, batches, device, fast_path)
    n = labels.shape[0]
    if not n:
        return EpochStats(seconds=time.perf_counter() - start)
    loss = criterion(logits, labels).item() * n
    correct = int((logits.argmax(1) == labels).sum())
    return EpochStats(loss, correct, n, time.perf_counter() - start)


def validate(model: nn.Module, share: Iterable[tuple[torch.Tensor, torch.Tensor]],
             criterion: nn.Module, ctx: DistContext,
             fast_path: FastPath | None = None) -> EpochStats:
    """Loss and top-1 of rank 0's model over the validation split, each rank scoring its share.

    Rank 0's BatchNorm statistics go to every rank first, so all score the model rank 0 saves;
    the sums of losses, correct answers and images are then added up over the ranks.
    ``fast_path`` (the training's) runs it in bf16 and channels-last on a GPU, as the fine-tune's is.
    """
    start = time.perf_counter()
    broadcast_buffers(model, ctx)
    local = evaluate(model, share, criterion, ctx.device, fast_path)  # autocast as in training
    return EpochStats.from_tensor(all_reduce_sum(local.as_tensor(), ctx), time.perf_counter() - start)


def build_optimizer(
    groups: list[dict[str, object]], cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW over the given parameter groups."""
    # Fused kernels exist for CUDA; on the CPU the foreach path is the fast one.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, **fast)  # type: ignore[arg-type]
    return torch.optim.SGD(
        groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0,  # type: ignore[arg-type]
        weight_decay=cfg.weight_decay, **fast,
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 1% to the base rates, then cosine decay to zero, stepped per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# The global batch at which a base learning rate is quoted (Goyal et al. 2017, "Accurate, large
# minibatch SGD"): the rate used is ``base x global batch / 256``.
REFERENCE_BATCH = 256
SGD_BASE_LR = 0.1  # SGD with momentum from scratch, per 256 images: the ImageNet ResNet recipe
# The fewest warm-up steps a run that warms up gets (a tenth of a shorter run): a small dataset's
# epoch is a handful of steps, and "1 epoch" of warm-up then reaches the peak rate at once.
MIN_WARMUP_STEPS = 50


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: ``base_lr`` is the rate for 256 images per optimizer step."""
    return base_lr * global_batch / REFERENCE_BATCH


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int,
                 min_steps: int = MIN_WARMUP_STEPS) -> int:
    """Warm-up length in optimizer steps: ``warmup_epochs`` worth, but at least ``min_steps``.

    An epoch of a small dataset is a handful of steps, too few to warm up in; ``min_steps`` is
    itself held to a tenth of the run, so a short run still spends most of it at its rate.
    ``warmup_epochs=0`` means no warm-up at all.
    """
    if warmup_epochs <= 0:
        return 0
    floor = min(min_steps, total_steps // 10)
    return max(int(warmup_epochs * steps_per_epoch), floor)


def scratch_epochs(epochs: int, steps_per_epoch: int, min_steps: int, max_factor: int = 5) -> int:
    """Epochs for a phase trained from random init: enough for ``min_steps`` optimizer steps,
    at least ``epochs`` and at most ``max_factor`` times them (a tiny split is no reason to
    train for hundreds of epochs)."""
    wanted = -(-min_steps // max(steps_per_epoch, 1))
    return max(epochs, min(wanted, max_factor * epochs))


def place_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, steps_done: int) -> None:
    """Put a restored schedule at ``steps_done`` optimizer steps of this run's own count.

    A checkpoint's schedule counts the steps of the run that wrote it. With another world size
    an epoch has another number of steps, and that count would put the schedule elsewhere in
    its cosine (past its end, at a learning rate of zero, when the world shrinks).
    """
    scheduler.last_epoch = steps_done
    rates = [base * factor(steps_done)
             for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports


def pick_device(requested: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device='auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)

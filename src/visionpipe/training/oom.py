"""What a training does after running out of memory: once more with a split per-device batch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from visionpipe.training import launch
from visionpipe.training.core import StageConfig
from visionpipe.training.result import TrainResult

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error of this process, or one a DDP rank raised."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, launch.LaunchError) and exc.exception == "OutOfMemoryError"


def batch_split_factor(batch: int) -> int | None:
    """The smallest factor that splits ``batch`` into equal per-device batches of 2 or more.

    2 for an even batch; 5 for 65 (13 x 5); None where there is none (a prime, or 2 or 3).
    """
    return next((f for f in range(2, batch // 2 + 1) if batch % f == 0), None)


def with_oom_fallback(cfg: StageConfig, train: Callable[[StageConfig], TrainResult],
                      logger: logging.Logger | logging.LoggerAdapter[Any] = log) -> TrainResult:
    """Train; after an out-of-memory error, once more with a smaller per-device batch.

    The batch is split by its smallest factor (halved when even) and the gradient accumulation
    multiplied by it, so the global batch, and with it the schedule and the checkpoints of the
    failed attempt, stay valid. A batch that cannot be split evenly, or a second out-of-memory
    error, fails: an out-of-memory error is not among the errors the tasks retry.
    """
    try:
        return train(cfg)
    except Exception as exc:
        batch = cfg.batch_size
        if not is_out_of_memory(exc):
            raise
        factor = batch_split_factor(batch)
        if factor is None:
            raise RuntimeError(
                f"out of memory at a per-device batch of {batch}, which cannot be split into "
                "equal smaller batches with the same global batch. Fix: set batch_size to an "
                "even number (the retry halves it), or a smaller one with grad_accumulation "
                "keeping batch_size x grad_accumulation") from exc
    # Out of the except block: its traceback would keep the failed attempt's tensors alive.
    torch.compiler.reset()  # a compiled attempt's graphs (and CUDA graph pools) go too
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    smaller = cfg.model_copy(update={"batch_size": batch // factor,
                                     "grad_accumulation": cfg.grad_accumulation * factor})
    logger.warning(
        "out of memory at a per-device batch of %d: retrying once with batch %d and %d "
        "gradient accumulation steps (same global batch)", batch, smaller.batch_size,
        smaller.grad_accumulation)
    return train(smaller)

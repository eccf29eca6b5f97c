"""Whether a checkpoint written under one stage config may be resumed under another."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

from pydantic import BaseModel

# How one optimizer step's batch is split; only their product changes what is computed.
BATCH_GEOMETRY = {"batch_size", "grad_accumulation"}

# FastPathConfig fields that change only the speed of a run, not its batches or arithmetic.
SPEED_ONLY = {"compile", "compile_mode", "compile_min_images", "num_workers"}


def same_training(before: BaseModel, now: BaseModel, ignore: AbstractSet[str] = frozenset()) -> bool:
    """Whether a checkpoint written under ``before`` can be resumed under ``now``.

    The batch may be split differently (after an out-of-memory retry) as long as the global
    batch, ``batch_size x grad_accumulation``, is the same.
    """
    skip: dict[str, Any] = {name: True for name in set(ignore) | BATCH_GEOMETRY}
    if "fast" in type(now).model_fields and "fast" not in skip:
        skip["fast"] = SPEED_ONLY  # how fast, not what is computed: free to change on resume
    if before.model_dump(exclude=skip) != now.model_dump(exclude=skip):
        return False
    return bool(before.batch_size * before.grad_accumulation  # type: ignore[attr-defined]
                == now.batch_size * now.grad_accumulation)  # type: ignore[attr-defined]

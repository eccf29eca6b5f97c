"""What a training stage hands on: small and JSON-serialisable, so it crosses process borders."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from visionpipe.models import ModelSpec


class TrainResult(BaseModel):
    best_checkpoint: str
    last_checkpoint: str
    best_val_top1: float
    best_epoch: int
    epochs_run: int
    spec: ModelSpec
    history: list[dict[str, Any]]
    world_size: int = 1
    skipped_phases: list[str] = []
    resumed_from_epoch: int | None = None

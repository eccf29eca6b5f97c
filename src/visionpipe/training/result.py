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
    nnodes: int = 1
    node_index: int | None = None  # the node run that held global rank 0 (multi-node)
    # sha256 of each rank's final weights, in rank order: DDP keeps them identical.
    rank_weight_digests: list[str] = []
    skipped_phases: list[str] = []
    resumed_from_epoch: int | None = None

    @property
    def loop_seconds(self) -> float:
        """Time spent in the training and validation loops of the epochs this result records."""
        return sum(r.get("train_seconds", 0.0) + r.get("val_seconds", 0.0) for r in self.history)

"""Batch scoring with the registered champion (or any model URI)."""

from __future__ import annotations

import sys
from typing import Annotated

from prefect import flow
from pydantic import Field

from tasks.scoring import record_scoring, score_images_task
from visionpipe.scoring import ScoringSummary


@flow(name="score-images")
def score_images(
    source: str,
    output: str,
    model_uri: str = "models:/digits-classifier@champion",
    batch_size: Annotated[int, Field(gt=0)] = 64,
    experiment: str = "visionpipe-scoring",
) -> ScoringSummary:
    """Score an ImageFolder (directory or s3:// prefix) and write predictions as parquet.

    1. score-images: load the model, predict in batches, write parquet (local or s3://)
    2. record-scoring: an MLflow run and a Prefect artifact with the summary
    """
    summary = score_images_task(model_uri, source, output, batch_size)
    record_scoring(summary, experiment)
    return summary


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m flows.score_images <source> <output.parquet> [model-uri]")
    print(score_images(*sys.argv[1:4]).model_dump_json(indent=2))

"""Batch scoring with a registered model: an ImageFolder (local or S3) in, parquet out."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from pydantic import BaseModel

from visionpipe.data.paths import confined_path
from visionpipe.data.s3 import parse_s3_uri, s3_client
from visionpipe.data.sources import materialize_source
from visionpipe.tracking import configure_tracking

log = logging.getLogger(__name__)

LEAST_CONFIDENT = 10  # images listed in the report


class ScoringSummary(BaseModel):
    model_uri: str
    source: str
    output: str
    images: int
    unreadable: int
    predicted: dict[str, int]
    mean_probability: float
    folder_accuracy: float | None  # when the source's folders are named like the classes
    # The report beside the parquet: predictions per tenth of probability (0-0.1, ...,
    # 0.9-1.0), and the least confident images (path, class, probability), lowest first.
    confidence_histogram: list[int] = []
    least_confident: list[dict[str, Any]] = []


def score_images(model_uri: str, source: str, output: str, batch_size: int = 64) -> ScoringSummary:
    """Predict every image under ``source`` with ``model_uri``; write one parquet row per image."""
    configure_tracking()
    model = mlflow.pyfunc.load_model(model_uri)
    materialized = materialize_source(source)
    frames = []
    for start in range(0, len(materialized.files), batch_size):
        files = materialized.files[start:start + batch_size]
        frames.append(_score_batch(model, materialized.root, files))
    scored = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["path", "folder", "label", "class_name", "probability", "probabilities", "error"])
    write_parquet(scored, output)
    return _summary(scored, model_uri, source, output)


def _score_batch(model: mlflow.pyfunc.PyFuncModel, root: Path, files: list) -> pd.DataFrame:  # type: ignore[type-arg]
    """Predict a batch; if one image breaks it, score them one by one and mark the bad ones."""
    images = [confined_path(root, f.relpath).read_bytes() for f in files]
    base = pd.DataFrame({"path": [f.relpath for f in files], "folder": [f.class_name for f in files]})
    try:
        predictions = model.predict(pd.DataFrame({"image": images}))
        return pd.concat([base, predictions.assign(error="")], axis=1)
    except Exception:  # noqa: BLE001 - one undecodable file must not lose the whole batch
        rows = []
        for image in images:
            try:
                rows.append(model.predict(pd.DataFrame({"image": [image]})).iloc[0].to_dict() | {"error": ""})
            except Exception as exc:  # noqa: BLE001
                rows.append({"label": -1, "class_name": "", "probability": 0.0, "probabilities": [],
                             "error": str(exc)[:200]})
        return pd.concat([base, pd.DataFrame(rows)], axis=1)


def write_parquet(frame: pd.DataFrame, output: str) -> None:
    """Write to a local path (atomically) or to ``s3://bucket/key``."""
    if output.startswith("s3://"):
        bucket, key = parse_s3_uri(output)
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        s3_client().put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _summary(scored: pd.DataFrame, model_uri: str, source: str, output: str) -> ScoringSummary:
    good = scored[scored["error"] == ""]
    matches = good["folder"].isin(set(good["class_name"]))
    accuracy = float((good["folder"] == good["class_name"]).mean()) if len(good) and matches.all() else None
    return ScoringSummary(
        model_uri=model_uri, source=source, output=output, images=len(scored),
        unreadable=int((scored["error"] != "").sum()),
        predicted=dict(Counter(good["class_name"].astype(str))),
        mean_probability=float(good["probability"].mean()) if len(good) else 0.0,
        folder_accuracy=accuracy,
        confidence_histogram=[int(n) for n in np.histogram(good["probability"], bins=10,
                                                           range=(0.0, 1.0))[0]],
        least_confident=[{"path": r.path, "class_name": r.class_name,
                          "probability": float(r.probability)}
                         for r in good.nsmallest(LEAST_CONFIDENT, "probability").itertuples()],
    )


def report_markdown(summary: ScoringSummary) -> str:
    """The scoring job's report: counts per class, the confidence histogram, the least
    confident images."""
    lines = [f"# Scored {summary.images} images with `{summary.model_uri}`", "",
             f"- source: `{summary.source}`", f"- predictions: `{summary.output}`",
             f"- unreadable: {summary.unreadable}", f"- mean probability: {summary.mean_probability:.3f}",
             "", "| class | images |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in sorted(summary.predicted.items())]
    lines += ["", "## Confidence", "", "| probability | images | |", "|---|---|---|"]
    most = max(summary.confidence_histogram, default=0) or 1
    for index, count in enumerate(summary.confidence_histogram):
        bar = "#" * round(20 * count / most)
        lines.append(f"| {index / 10:.1f}-{(index + 1) / 10:.1f} | {count} | `{bar}` |")
    lines += ["", f"## The {len(summary.least_confident)} least confident", "",
              "| image | predicted | probability |", "|---|---|---|"]
    lines += [f"| `{r['path']}` | {r['class_name']} | {r['probability']:.3f} |"
              for r in summary.least_confident]
    return "\n".join(lines)

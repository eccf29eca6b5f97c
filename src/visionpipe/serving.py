"""The MLflow pyfunc that consumers load: encoded images in, label and probability out.

It applies the training preprocessing itself, so a consumer needs no visionpipe internals:
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(pd.DataFrame({"image": [png]}))``.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch

from visionpipe.data.images import normalize, preprocess_image
from visionpipe.models import ModelSpec, build_model

OUTPUT_COLUMNS = ("label", "class_name", "probability", "probabilities")
DEFAULT_BATCH_SIZE = 64  # images decoded and scored at a time; a caller's params may change it


def _as_bytes(value: Any) -> bytes:
    """Raw bytes, or base64 text as a REST request carries it."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError("column 'image' holds text that is not base64-encoded image bytes") from exc
    raise TypeError(f"column 'image' must hold encoded image bytes, got {type(value).__name__}")


def image_column(model_input: Any) -> list[bytes]:
    """The encoded images of a pyfunc's input: its DataFrame's ``image`` column, raw bytes or
    base64 text (a REST request); an error that says what is expected for anything else."""
    if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
        raise ValueError("input must be a DataFrame with a column 'image' of encoded image bytes")
    return [_as_bytes(v) for v in model_input["image"]]


class ImageClassifier(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """Wraps a trained torchvision network and its preprocessing for ``mlflow.pyfunc``."""

    def load_context(self, context: Any) -> None:
        self.spec = ModelSpec.model_validate_json(Path(context.artifacts["spec"]).read_text())
        self.model = build_model(self.spec)
        state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        # The serving host's GPU when it has one. NHWC: oneDNN's CPU convolutions and cuDNN's
        # run faster on it, in the same float32 arithmetic.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval().to(self.device, memory_format=torch.channels_last)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = image_column(model_input)
        batch_size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
        if batch_size < 1:
            raise ValueError(f"params batch_size must be at least 1, got {batch_size}")
        frames = []
        for start in range(0, len(images), batch_size):
            frames.append(self._predict_batch(images[start:start + batch_size]))
        if not frames:
            return pd.DataFrame({c: [] for c in OUTPUT_COLUMNS})
        return pd.concat(frames, ignore_index=True)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """One image's bytes as the uint8 tensor evaluation scored: the same function."""
        spec = self.spec
        return preprocess_image(data, spec.recipe, spec.image_size, spec.resize_size)

    @torch.inference_mode()
    def _predict_batch(self, images: list[bytes]) -> pd.DataFrame:
        batch = torch.stack([self.preprocess(b) for b in images])  # N x 3 x S x S, uint8
        # uint8 crosses to the device (4x less than float), normalised there.
        pixels = normalize(batch.to(self.device)).contiguous(memory_format=torch.channels_last)
        probs = torch.softmax(self.model(pixels).float(), dim=1).cpu()  # N x classes
        confidence, label = probs.max(dim=1)
        return pd.DataFrame({
            "label": label.numpy().astype("int64"),
            "class_name": [self.spec.class_names[i] for i in label.tolist()],
            "probability": confidence.numpy().astype("float64"),
            # One per class, in the order of the model's class_names (its ModelSpec).
            "probabilities": list(probs.double().numpy()),
        })

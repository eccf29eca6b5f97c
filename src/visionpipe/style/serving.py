"""The stylisation network as an MLflow pyfunc: encoded images in, PNG bytes of the stylised
image at the input's size out (base64 in a REST response).

``mlflow.pyfunc.load_model("models:/<style>-stylizer@champion").predict(pd.DataFrame({"image":
[jpeg_bytes]}))["image"][0]`` is a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch

from visionpipe.serving import image_column
from visionpipe.style.images import load_image, png_bytes
from visionpipe.style.network import StyleSpec, build_style_network


class Stylizer(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """Wraps a trained ``TransformerNet`` for ``mlflow.pyfunc``."""

    def load_context(self, context: Any) -> None:
        self.spec = StyleSpec.model_validate_json(Path(context.artifacts["spec"]).read_text())
        self.net = build_style_network(self.spec)
        state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net.eval().to(self.device)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        return pd.DataFrame({"image": [self.stylize(data) for data in image_column(model_input)]})

    @torch.inference_mode()
    def stylize(self, data: bytes) -> bytes:
        """One image's bytes to the PNG of its stylised version, at its own size (one at a
        time: the images of a request may all differ in size)."""
        image = load_image(data).to(self.device)
        return png_bytes(self.net(image))

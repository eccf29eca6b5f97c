"""The short report a person reads at the end of a pipeline run."""

from __future__ import annotations

import json

from pydantic import BaseModel

from visionpipe.registry import GateDecision


class RunTimings(BaseModel):
    """Where a flow run's time went."""

    stages: dict[str, float]
    loop_seconds: float
    flow_seconds: float

    @property
    def overhead_share(self) -> float:
        """The share of the flow run spent outside training and evaluation loops."""
        return max(0.0, 1 - self.loop_seconds / self.flow_seconds) if self.flow_seconds else 0.0


class PipelineSummary(BaseModel):
    model_name: str
    dataset_version: str
    metrics: dict[str, dict[str, float]]
    decision: GateDecision
    champion_version: str | None
    mlflow_ui: str
    tracking_uri: str
    random_init: bool
    timings: RunTimings | None = None
    alias: str = "champion"
    example_image: str | None = None  # a test image of the dataset, for the snippet to score

    def render(self) -> str:
        lines = [f"visionpipe: {self.model_name} (dataset version {self.dataset_version})", ""]
        for candidate, metrics in self.metrics.items():
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("top1", "top5", "macro_f1")
                              if k in metrics)
            lines.append(f"  {candidate:<22} {shown}, {metrics.get('images_per_s', 0):.0f} img/s")
        verdict = "promoted" if self.decision.promoted else "not promoted"
        lines += ["", f"{self.alias}: version {self.champion_version} ({verdict} "
                  f"v{self.decision.candidate_version}: {self.decision.reason})"]
        if self.timings:
            t = self.timings
            lines.append(f"time: {t.flow_seconds:.0f} s, {t.loop_seconds:.0f} s of it in training "
                         f"and evaluation loops ({t.overhead_share:.0%} outside them)")
        if self.random_init:
            lines.append("note: the fine-tuned backbone started from RANDOM weights "
                         "(no pretrained source was reachable)")
        if self.champion_version is None:
            lines += ["", "MLflow UI:", f"  {self.mlflow_ui}", "",
                      f"No version holds the {self.alias!r} alias yet: nothing to load."]
            return "\n".join(lines)
        image = self.example_image or "image.png"
        lines += ["", "MLflow UI:", f"  {self.mlflow_ui}", "", f"Load the {self.alias}:",
                  "  import mlflow, pandas as pd; mlflow.set_tracking_uri("
                  f"\"{self.tracking_uri}\")",
                  f"  model = mlflow.pyfunc.load_model(\"models:/{self.model_name}@{self.alias}\"); "
                  f"model.predict(pd.DataFrame({{\"image\": [open({json.dumps(image)}, \"rb\").read()]}}))"]
        return "\n".join(lines)

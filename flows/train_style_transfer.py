"""The style-transfer pipeline: content images, style image, loss network, one network, gate."""

from __future__ import annotations

import sys

from prefect import flow
from pydantic import BaseModel

from tasks.data import log_dataset, prepare_dataset_cached
from tasks.retention import apply_retention
from tasks.style import evaluate_style_task, fetch_image, register_style_model, train_style_network
from tasks.tracking import close_tracking_run, fail_tracking_runs, open_tracking_run
from tasks.weights import fetch_pretrained_weights, fetch_pretrained_weights_cached
from visionpipe import registry, settings
from visionpipe.config import StyleConfig
from visionpipe.registry import GateDecision
from visionpipe.style.train import StyleInputs


class StyleSummary(BaseModel):
    model_name: str
    style: str
    dataset_version: str
    metrics: dict[str, float]
    decision: GateDecision
    champion_version: str | None
    alias: str
    grid_png: str
    random_init: bool  # the loss network's weights were unreachable

    def render(self) -> str:
        lines = [f"visionpipe: {self.model_name} (style {self.style!r}, content images "
                 f"{self.dataset_version})", ""]
        lines += [f"  {k}: {v:.6g}" for k, v in self.metrics.items()]
        lines += ["", f"gate: {self.decision.reason}", f"{self.alias}: version {self.champion_version}",
                  f"before/after grid: {self.grid_png}"]
        if self.random_init:
            lines.append("WARNING: the loss network started from a RANDOM initialisation")
        if self.champion_version:
            lines += ["", "import mlflow, pandas as pd",
                      f'm = mlflow.pyfunc.load_model("models:/{self.model_name}@{self.alias}")',
                      'png = m.predict(pd.DataFrame({"image": [open("photo.jpg", "rb").read()]}))["image"][0]']
        return "\n".join(lines)


@flow(name="train-style-transfer", on_failure=[fail_tracking_runs],
      on_crashed=[fail_tracking_runs])
def train_style_transfer(config: StyleConfig = StyleConfig()) -> StyleSummary:  # noqa: B008
    """Train a feed-forward stylisation network for one style and register it.

    1. open-tracking-run: one MLflow parent run for this flow run
    2. prepare-dataset: the content images (the classifiers' task; alongside 1)
    3. fetch-image: the style image, file, https, s3 or bundled; sha256-verified and cached (alongside)
    4. fetch-pretrained-weights: the frozen loss network, VGG-16 by default (alongside)
    5. train-style-network: perceptual loss, DDP under torchrun on every GPU, resumable
    6. evaluate-style: held-out losses, images/s, a before/after grid
    7. register-model: a version; the alias moves only for a lower held-out loss
    8. retention: old flow runs' checkpoints and unused dataset versions go (as the classifiers')
    """
    fetching = fetch_pretrained_weights.submit(config.weights, config.loss.network)
    styling = fetch_image.submit(config.style_image, config.style_sha256)
    opening = open_tracking_run.submit(config)
    dataset = prepare_dataset_cached(config.data)
    context = opening.result()
    log_dataset(dataset, context)
    style = styling.result()
    weights = fetch_pretrained_weights_cached(config.weights, config.loss.network, fetching)
    inputs = StyleInputs(dataset=dataset, style=config.style, style_path=style.path,
                         style_sha256=style.sha256, loss_weights_path=weights.path,
                         loss_weights_sha256=weights.sha256)
    candidate = train_style_network(config, inputs, weights.source, context)
    evaluation = evaluate_style_task(config, candidate, inputs, context)
    decision = register_style_model(config, candidate, inputs, weights.random_init, context)
    apply_retention(config.retention, context)
    close_tracking_run(context)
    return StyleSummary(
        model_name=config.model_name, style=config.style, dataset_version=dataset.version,
        metrics=evaluation.metrics, decision=decision, alias=config.registry.alias,
        champion_version=registry.champion_version(config.model_name, config.registry.alias),
        grid_png=evaluation.grid_png, random_init=weights.random_init)


def main(argv: list[str]) -> int:
    """``python -m flows.train_style_transfer [config.json]``."""
    config = StyleConfig.model_validate_json(open(argv[0]).read()) if argv else StyleConfig(
        weights={"uri": "torchvision:vgg16.IMAGENET1K_V1", "on_unavailable": "random-init"})
    summary = train_style_transfer(config)
    print(summary.render())
    (settings.visionpipe_home() / "last-style-run.json").write_text(summary.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Serve the deployments of ``train-image-classifiers`` and ``score-images`` (``make serve``).

- ``nightly``: 02:00 Europe/Berlin, a production configuration (ImageFolder under s3://,
  ImageNet weights, ``on_unavailable: fail``); edit ``NIGHTLY`` for your bucket;
- ``on-demand``: no schedule; the UI's parameter form starts it, with the offline quickstart's
  parameters as defaults so it runs on any machine;
- ``score-images/on-demand``: batch scoring with the champion;
- ``ddp-node/ddp-node``: one node of a multi-node GoogLeNet launch, started by the GoogLeNet
  task once per node (``googlenet.launch.nnodes`` above 1).

Against whatever ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` point at.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.ddp_node import ddp_node
from flows.score_images import score_images
from flows.train_image_classifiers import train_image_classifiers
from visionpipe.config import PipelineConfig, quickstart

NIGHTLY = PipelineConfig.model_validate({
    "data": {"source": "s3://visionpipe-datasets/digits/", "name": "digits"},
    "weights": {"uri": "torchvision:resnet50.IMAGENET1K_V2", "on_unavailable": "fail"},
})


ENTRYPOINTS = {
    "train-image-classifiers": "flows/train_image_classifiers.py:train_image_classifiers",
    "score-images": "flows/score_images.py:score_images",
    "ddp-node": "flows/ddp_node.py:ddp_node",
}


def _flows(source: str | None) -> dict[str, Flow[..., Any]]:
    """The flows, imported here, or loaded from ``source`` (a checkout or a git URL) so that a
    work pool's worker runs them from there."""
    if source is None:
        return {"train-image-classifiers": train_image_classifiers, "score-images": score_images,
                "ddp-node": ddp_node}
    return {name: Flow.from_source(source, entrypoint)  # type: ignore[misc]
            for name, entrypoint in ENTRYPOINTS.items()}


def deployments(source: str | None = None,
                only: Sequence[str] = tuple(ENTRYPOINTS)) -> list[RunnerDeployment]:
    """The deployments of the flows named in ``only`` (all by default)."""
    flows = _flows(source)
    every = [
        flows["train-image-classifiers"].to_deployment(
            "nightly", schedule=Cron("0 2 * * *", timezone="Europe/Berlin"),
            parameters={"config": NIGHTLY.model_dump(mode="json")}, tags=["nightly"],
            description="Nightly retraining on the production dataset."),
        flows["train-image-classifiers"].to_deployment(
            "on-demand", parameters={"config": quickstart().model_dump(mode="json")},
            tags=["on-demand"], description="Start from the UI; defaults run offline."),
        flows["score-images"].to_deployment(
            "on-demand", tags=["scoring"], description="Score an ImageFolder with the champion."),
        flows["ddp-node"].to_deployment(
            "ddp-node", tags=["ddp"], description="One node of a multi-node GoogLeNet launch; "
            "started by train-googlenet, one run per node."),
    ]
    return [deployment for deployment in every if deployment.flow_name in only]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Serve the deployments (make serve).")
    parser.add_argument("--limit", type=int, default=None,
                        help="most flow runs this process runs at once (e.g. one node run per host)")
    parser.add_argument("--flows", nargs="+", choices=list(ENTRYPOINTS), default=list(ENTRYPOINTS),
                        help="serve only these flows' deployments. Limit ddp-node alone: a "
                        "training run waits for its node runs, and would hold the only slot")
    args = parser.parse_args(argv)
    serve(*deployments(only=args.flows), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

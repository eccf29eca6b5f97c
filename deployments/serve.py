"""Serve the deployments of ``prefect.yaml`` (``make serve``); ``deployments.deploy`` registers
the same ones on work pools.

``prefect.yaml`` at the repository's root holds each deployment's schedule, parameters, work
pool and job variables (Prefect's own format, which ``prefect deploy`` reads too); as shipped:

- ``train-image-classifiers/nightly``: 02:00 Europe/Berlin, a production configuration
  (an ImageFolder under s3://, ImageNet weights, ``on_unavailable: fail``);
- ``train-image-classifiers/on-demand``: no schedule; the UI's parameter form starts it, with
  the offline quickstart's parameters as defaults so it runs on any machine;
- ``score-images/on-demand``: batch scoring with the champion;
- ``ddp-node/ddp-node``: one node of a multi-node GoogLeNet launch, started by the GoogLeNet
  task once per node (``googlenet.launch.nnodes`` above 1);
- ``train-style-transfer/weekly``: a stylisation network for one style; its schedule is off
  (``active: false``) until an operator turns it on;
- ``stylize-image/on-demand``: one picture in one style by optimisation.

Against whatever ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` point at.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.ddp_node import ddp_node
from flows.score_images import score_images
from flows.stylize_image import stylize_image
from flows.train_image_classifiers import train_image_classifiers
from flows.train_style_transfer import train_style_transfer
from visionpipe.config import GatysConfig, PipelineConfig, StyleConfig

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"

ENTRYPOINTS = {
    "train-image-classifiers": "flows/train_image_classifiers.py:train_image_classifiers",
    "score-images": "flows/score_images.py:score_images",
    "ddp-node": "flows/ddp_node.py:ddp_node",
    "train-style-transfer": "flows/train_style_transfer.py:train_style_transfer",
    "stylize-image": "flows/stylize_image.py:stylize_image",
}
# The pydantic model of each flow's ``config`` parameter, checked when the file is read.
_CONFIGS: dict[str, type[PipelineConfig | StyleConfig | GatysConfig]] = {
    "train-image-classifiers": PipelineConfig, "train-style-transfer": StyleConfig,
    "stylize-image": GatysConfig}
_FLOW_OF_ENTRYPOINT = {entrypoint: name for name, entrypoint in ENTRYPOINTS.items()}


class DeploymentFileError(ValueError):
    """prefect.yaml names something this project does not have, or a parameter it refuses."""


def _flows(source: str | None) -> dict[str, Flow[..., Any]]:
    """The flows, imported here, or loaded from ``source`` (a checkout or a git URL) so that a
    work pool's worker runs them from there."""
    if source is None:
        return {"train-image-classifiers": train_image_classifiers, "score-images": score_images,
                "ddp-node": ddp_node, "train-style-transfer": train_style_transfer,
                "stylize-image": stylize_image}
    return {name: Flow.from_source(source, entrypoint)  # type: ignore[misc]
            for name, entrypoint in ENTRYPOINTS.items()}


def load_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments of ``path``, each checked: a known entrypoint, schedules with a cron and
    a timezone, and a ``config`` that validates as its flow's model (PipelineConfig,
    StyleConfig, GatysConfig), expanded to every field, so that the UI form shows the values
    the run will use."""
    specs = (yaml.safe_load(path.read_text()) or {}).get("deployments") or []
    checked = []
    for spec in specs:
        where = f"{path.name}: deployment {spec.get('name')!r}"
        entrypoint = spec.get("entrypoint")
        if entrypoint not in _FLOW_OF_ENTRYPOINT:
            raise DeploymentFileError(f"{where}: entrypoint {entrypoint!r} is not one of "
                                      f"{sorted(_FLOW_OF_ENTRYPOINT)}")
        parameters = dict(spec.get("parameters") or {})
        model = _CONFIGS.get(_FLOW_OF_ENTRYPOINT[entrypoint])
        if model is not None:
            try:
                config = model.model_validate(parameters.get("config") or {})
            except ValueError as exc:
                raise DeploymentFileError(f"{where}: parameters.config is not a valid "
                                          f"{model.__name__}: {exc}") from exc
            parameters["config"] = config.model_dump(mode="json")
        for schedule in spec.get("schedules") or []:
            if "cron" not in schedule:
                raise DeploymentFileError(f"{where}: each schedule needs a cron, e.g. "
                                          "{cron: '0 2 * * *', timezone: Europe/Berlin}")
        checked.append({**spec, "parameters": parameters})
    return checked


def deployments(source: str | None = None, only: Sequence[str] = tuple(ENTRYPOINTS),
                path: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    """The deployments of ``path`` whose flows are named in ``only`` (all by default)."""
    flows = _flows(source)
    built = []
    for spec in load_specs(path):
        flow_name = _FLOW_OF_ENTRYPOINT[spec["entrypoint"]]
        if flow_name not in only:
            continue
        pool = spec.get("work_pool") or {}
        built.append(flows[flow_name].to_deployment(
            spec["name"], description=spec.get("description"), tags=spec.get("tags"),
            schedules=[Cron(s["cron"], timezone=s.get("timezone", "UTC"),
                            active=bool(s.get("active", True)))
                       for s in spec.get("schedules") or []],
            parameters=spec["parameters"] or None, work_pool_name=pool.get("name"),
            job_variables=pool.get("job_variables") or None))
    return built


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

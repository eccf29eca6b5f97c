"""The style-transfer tasks: fetch the style image, train the stylisation network, evaluate it,
register it behind its gate; and Gatys' one-picture optimisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from tasks.common import per_flow_run, retry_transient, run_logger
from tasks.compute import compute_slots, launch_stop
from tasks.register import decision_markdown
from tasks.train import EpochReporter
from visionpipe import registry, settings, tracking
from visionpipe.config import BUNDLED_STYLE, GatysConfig, StyleConfig
from visionpipe.redaction import redact
from visionpipe.registry import GateDecision
from visionpipe.style.evaluate import StyleEvaluation, evaluate_style, heldout_images
from visionpipe.style.gatys import stylize_file
from visionpipe.style.images import bundled_style_path, png_bytes, unit_range
from visionpipe.style.loss import LossTerms
from visionpipe.style.registry import gate_style, log_style_model
from visionpipe.style.train import (
    StyleInputs,
    StyleResult,
    load_style_network,
    perceptual_loss,
    style_image_tensor,
    train_style,
)
from visionpipe.style.worker import launch_style, style_processes
from visionpipe.tracking import TrackingContext
from visionpipe.training.loop import pick_device
from visionpipe.weights import fetch_file


class FetchedImage(BaseModel):
    """An image file fetched and verified like weights: where it is cached, and its digest."""

    path: str
    sha256: str
    source: str  # the URI without credentials


class StyleCandidate(BaseModel):
    name: str
    run_id: str
    result: StyleResult
    lineage: dict[str, str]


# Cached per flow run only: a later run asks again (a file:// image is read anew, a download
# comes from the library's verified cache), and never gets a path another host cached.
@task(name="fetch-image", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient, cache_key_fn=per_flow_run, persist_result=True)
def fetch_image(uri: str, sha256: str | None = None) -> FetchedImage:
    """An image from ``file://``, ``https://``, ``s3://`` or ``bundled:waves``, verified by its
    sha256 and cached under it, as weights are."""
    location = bundled_style_path().as_uri() if uri == BUNDLED_STYLE else uri
    path, digest = fetch_file(location, sha256, "images")
    run_logger().info("image %s verified, sha256 %s", redact(uri), digest)
    return FetchedImage(path=str(path), sha256=digest, source=redact(uri))


class StyleReporter(EpochReporter):
    def __call__(self, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        self.logger.info("%s epoch %d/%d loss %.4g (content %.4g, style %.4g, tv %.4g) | val %.4g "
                         "(%.0f img/s)", self.candidate, epoch, self.total, record["total_loss"],
                         record["content_loss"], record["style_loss"], record["tv_loss"],
                         record["val_loss"], record["train_images_per_s"])
        self.advance(epoch)


@task(name="train-style-network", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient, cache_key_fn=per_flow_run, persist_result=True)
def train_style_network(config: StyleConfig, inputs: StyleInputs, weights_source: str,
                        context: TrackingContext) -> StyleCandidate:
    """Johnson et al.'s network for one style: in this process, or with torchrun on every GPU."""
    name = f"style-{config.style}"
    lineage = {"style": config.style, "style_sha256": inputs.style_sha256,
               "dataset_version": inputs.dataset.version, "loss_network": config.loss.network,
               "weights_source": weights_source,
               "weights_sha256": inputs.loss_weights_sha256 or ""}
    run_id, existing = tracking.resume_or_start_run(context.experiment_id, name,
                                                    context.parent_run_id, tags=lineage)
    if not existing:
        tracking.log_config(run_id, config)
    reporter = StyleReporter(name, config.train.epochs)
    out_dir = settings.stage_dir(context.flow_run_id, name)
    logger = run_logger()
    if style_processes(config.train) > 1:
        result = launch_style(config.train, config.loss, inputs, out_dir, run_id,
                              f"st-{context.flow_run_id[:12]}", reporter.on_line,
                              hold_compute=compute_slots, stop=launch_stop(context.flow_run_id),
                              logger=logger)
    else:
        with compute_slots(1):
            result = train_style(config.train, config.loss, inputs, out_dir, reporter, run_id)
    reporter.done()
    if result.resumed_from_epoch is not None:
        logger.warning("%s resumed from epoch %d of an earlier attempt", name, result.resumed_from_epoch)
    return StyleCandidate(name=name, run_id=run_id, result=result, lineage=lineage)


@task(name="evaluate-style", retries=1, retry_condition_fn=retry_transient,
      cache_key_fn=per_flow_run, persist_result=True)
def evaluate_style_task(config: StyleConfig, candidate: StyleCandidate, inputs: StyleInputs,
                        context: TrackingContext) -> StyleEvaluation:
    """Losses on held-out content images, images/s, and a before/after grid (MLflow artifact)."""
    device = pick_device(config.train.device)
    criterion = perceptual_loss(config.loss, style_image_tensor(inputs, config.loss),
                                Path(inputs.loss_weights_path), inputs.loss_weights_sha256, device)
    net, _ = load_style_network(Path(candidate.result.checkpoint))
    out_dir = settings.stage_dir(context.flow_run_id, "style-evaluation")
    evaluation = evaluate_style(net, criterion, inputs.dataset, config.registry.heldout_images, out_dir)
    tracking.log_metrics(candidate.run_id, evaluation.metrics)
    tracking.log_artifact(candidate.run_id, Path(evaluation.grid_png), "evaluation")
    create_table_artifact(key="style-metrics", table=[{"candidate": candidate.name, **{
        k: round(v, 6) for k, v in evaluation.metrics.items()}}],
        description=f"{evaluation.heldout_images} held-out images of {inputs.dataset.name}")
    return evaluation


@task(name="register-model", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient)
def register_style_model(config: StyleConfig, candidate: StyleCandidate, inputs: StyleInputs,
                         random_init: bool, context: TrackingContext) -> GateDecision:
    """A version for the candidate; the alias moves only for a lower held-out loss."""
    device = pick_device(config.train.device)
    images = heldout_images(inputs.dataset, config.registry.heldout_images)
    export_dir = settings.stage_dir(context.flow_run_id, "export") / candidate.name
    uri = log_style_model(candidate.run_id, Path(candidate.result.checkpoint), export_dir,
                          [png_bytes(unit_range(images[0]))])
    tags = {**registry.version_tags(candidate.lineage, export_dir),
            "prefect_flow_run_id": context.flow_run_id, "git_commit": tracking.git_commit(),
            "candidate": candidate.name}
    registration = registry.register_version(candidate.name, config.model_name, uri,
                                             candidate.run_id, tags)
    criterion = perceptual_loss(config.loss, style_image_tensor(inputs, config.loss),
                                Path(inputs.loss_weights_path), inputs.loss_weights_sha256, device)
    decision = gate_style(registration, candidate.result.spec, images, criterion,
                          config.registry.alias, random_init, config.registry.promote_random_init)
    run_logger().info("style gate: %s", decision.reason)
    tracking.end_run(candidate.run_id)
    create_markdown_artifact(key="champion-decision", description=decision.reason,
                             markdown=decision_markdown(decision, config.model_name, config.registry.alias))
    return decision


@task(name="optimise-image", retries=1, retry_condition_fn=retry_transient)
def optimise_image(content: FetchedImage, style: FetchedImage, weights_path: str,
                   weights_sha256: str | None, cfg: GatysConfig, output: str) -> str:
    """Gatys et al.: the content image's pixels optimised against the style; writes a PNG."""
    logger = run_logger()
    every = max(1, cfg.steps // 10)

    def on_step(step: int, terms: LossTerms) -> None:
        if step % every == 0 or step == cfg.steps:
            values = terms.as_floats()
            logger.info("step %d/%d: total %.4g (content %.4g, style %.4g)", step, cfg.steps,
                        values["total_loss"], values["content_loss"], values["style_loss"])

    path = Path(output)
    final = stylize_file(Path(content.path), Path(style.path), Path(weights_path), weights_sha256,
                         cfg, path, on_step)
    create_markdown_artifact(key="stylized-image", description=str(path), markdown="\n".join(
        [f"# `{path.name}`", "", f"{cfg.steps} {cfg.optimizer} steps against `{style.source}`",
         "", "| loss | value |", "|---|---|", *[f"| {k} | {v:.6g} |" for k, v in final.items()]]))
    return str(path)

"""The training pipeline: dataset, weights, two candidates, evaluation, registry."""

from __future__ import annotations

import os
import sys

from prefect import flow

from tasks.data import log_dataset, prepare_dataset_cached
from tasks.evaluate import evaluate_candidates
from tasks.register import register_model
from tasks.retention import apply_retention
from tasks.tracking import close_tracking_run, fail_tracking_runs, open_tracking_run
from tasks.timings import record_timings
from tasks.alongside import start_googlenet, stopped_on_error, train_candidates
from tasks.weights import fetch_pretrained_weights, fetch_pretrained_weights_cached
from visionpipe import registry, settings, tracking
from visionpipe.config import PipelineConfig, quickstart
from visionpipe.summary import PipelineSummary


@flow(name="train-image-classifiers", on_failure=[fail_tracking_runs],
      on_crashed=[fail_tracking_runs])
def train_image_classifiers(config: PipelineConfig = PipelineConfig()) -> PipelineSummary:  # noqa: B008
    """Train image classifiers and register the best one.

    1. open-tracking-run: one MLflow parent run for this flow run
    2. prepare-dataset: ingest, validate, split, version (cached on the source; alongside 1)
    3. fetch-pretrained-weights: verified and cached (alongside 1 and 2)
    4. train-googlenet: Inception v1 from scratch, DDP under torchrun (from the dataset on)
       finetune-backbone: head on a frozen backbone, then everything (alongside, from the weights on)
    5. evaluate-candidates: the same held-out test split for all
    6. register-model: a version per candidate; the champion alias moves only for a better one
    7. record-timings: wall time per stage, and the share spent outside the training loops
    8. retention: old flow runs' checkpoints and unused dataset versions go
    """
    fetching = fetch_pretrained_weights.submit(config.weights, config.finetune.arch)
    opening = open_tracking_run.submit(config)
    dataset = prepare_dataset_cached(config.data)
    context = opening.result()
    log_dataset(dataset, context)
    googlenet = start_googlenet(config.googlenet, dataset, context)
    with stopped_on_error(googlenet):  # a weights error fails the run now, not after GoogLeNet
        # Fetched again if the cached file is gone or the cached result is a random init.
        weights = fetch_pretrained_weights_cached(config.weights, config.finetune.arch, fetching)
    candidates = train_candidates(config.finetune, dataset, weights, context, alongside=googlenet)
    evaluations = evaluate_candidates(candidates, dataset, config.evaluation, context, weights)
    decision = register_model(candidates, evaluations, dataset, config.registry,
                              config.model_name, context)
    timings = record_timings(candidates, evaluations, context)
    apply_retention(config.retention, context)
    close_tracking_run(context)
    return PipelineSummary(
        model_name=config.model_name, dataset_version=dataset.version,
        metrics={e.candidate: e.metrics for e in evaluations}, decision=decision,
        champion_version=registry.champion_version(config.model_name, config.registry.alias),
        mlflow_ui=tracking.mlflow_ui_command(), tracking_uri=tracking.redact(settings.tracking_uri()),
        random_init=weights.random_init, timings=timings, alias=config.registry.alias,
        example_image=registry.first_test_image(dataset),
    )


def main(argv: list[str]) -> int:
    """``make run``: the quickstart configuration, or a JSON config file given as argument."""
    config = quickstart()
    if argv:
        config = PipelineConfig.model_validate_json(open(argv[0]).read())
    try:
        summary = train_image_classifiers(config)
    except RuntimeError as exc:
        if not str(exc).startswith("Failed to reach API"):
            raise
        api = tracking.redact(os.environ.get("PREFECT_API_URL", "the Prefect API"))
        print(f"error: cannot reach the Prefect API at {api} ({exc}). Fix: start the server "
              "(prefect server start), correct PREFECT_API_URL, or unset it to use Prefect's "
              "ephemeral API.", file=sys.stderr)
        return 1
    print(summary.render())
    # The figures of the last run, for `make bench` and anyone comparing runs.
    (settings.visionpipe_home() / "last-run.json").write_text(summary.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

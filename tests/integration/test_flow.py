"""The whole flow on a tiny dataset under Prefect's test harness, twice (the second run is cached)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.train_image_classifiers import train_image_classifiers
from tests.servers import WeightsServer
from visionpipe import tracking
from visionpipe.config import GoogLeNetConfig, PipelineConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {
    "data": {"max_per_class": 12},
    "weights": {"uri": "torchvision:resnet18.IMAGENET1K_V1", "on_unavailable": "random-init",
                "attempts": 1},
    "finetune": {"arch": "resnet18", "batch_size": 16, "phases": [
        {"name": "head", "trainable": ["fc"], "epochs": 1, "lr": 2e-3},
        {"name": "full", "trainable": ["*"], "epochs": 1, "lr": 2e-3}]},
    "googlenet": {"epochs": 1, "batch_size": 8, "launch": {"nproc_per_node": 2}},
    # One epoch on 120 digits can end at chance: no quality floor (the gate's tests check it).
    "registry": {"min_score": 0},
}


async def _progress(flow_run_id: str, key: str) -> float:
    """The last value of the run's progress artifact ``key``."""
    async with get_client() as client:
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterKey,
        )
        (artifact,) = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            key=ArtifactFilterKey(any_=[key])))
    return float(artifact.data)  # type: ignore[arg-type]


async def _artifact_keys(flow_run_id: str) -> set[str]:
    async with get_client() as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key for a in artifacts if a.key}


def test_flow_trains_both_candidates_registers_them_and_caches_its_inputs(
        harness: Path, http_server: WeightsServer) -> None:
    config = PipelineConfig.model_validate(TINY)
    # The weights' source answers (503: random init) only once GoogLeNet's launch has begun,
    # which needs no weights: a flow that waited for them would wait here for 120 s.
    config.weights.uri = http_server.hold("/resnet18.pth", until=_a_new_googlenet_launch(harness))
    config.weights.timeout_s = 600  # longer than the hold: the answer, not a timeout, ends it
    state = train_image_classifiers(config, return_state=True)
    assert state.is_completed(), state.message
    assert http_server.released["/resnet18.pth"] == 1, "train-googlenet waited for the weights"
    summary = state.result()
    assert set(summary.metrics) == {"finetune-resnet18", "scratch-googlenet"}
    assert summary.decision.promoted and summary.champion_version is not None
    # The fine-tune trained from a random init for want of weights: the gate may not take it.
    assert summary.decision.candidate == "scratch-googlenet"
    assert summary.random_init and "RANDOM" in summary.render()
    mlflow = tracking.client()
    versions = mlflow.search_model_versions("name='digits-classifier'")
    assert len(versions) == 2
    tags = versions[0].tags
    for key in ("arch", "dataset_version", "init_weights_source", "init_weights_sha256",
                "weights_sha256", "prefect_flow_run_id",
                "git_commit", "test_top1"):
        assert key in tags, key
    parent = mlflow.search_runs([mlflow.get_experiment_by_name("visionpipe").experiment_id],
                                "tags.`prefect.flow_run_id` = '%s'" % state.state_details.flow_run_id)
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].inputs.dataset_inputs, "manifest logged with mlflow.log_input"
    flow_run_id = str(state.state_details.flow_run_id)
    keys = asyncio.run(_artifact_keys(flow_run_id))
    assert {"candidate-metrics", "candidate-comparison", "champion-decision",
            "weights-random-init", "dataset-report", "stage-timings", "retention",
            "finetune-resnet18-progress", "scratch-googlenet-progress"} <= keys
    assert asyncio.run(_progress(flow_run_id, "scratch-googlenet-progress")) == 100.0
    timings = summary.timings
    assert timings is not None and 0 < timings.loop_seconds < timings.flow_seconds
    assert {"prepare-dataset", "train-googlenet", "register-model"} <= timings.stages.keys()
    assert "stage_seconds.train-googlenet" in parent[0].data.metrics

    config.googlenet.enabled = False
    second = train_image_classifiers(config, return_state=True)
    assert second.is_completed(), second.message
    runs = asyncio.run(_task_run_states(str(second.state_details.flow_run_id)))
    assert [s for n, s in runs if n == "prepare-dataset"] == ["Cached"]
    # A cached random init is not reused: the source is asked again (offline here: random init).
    assert sorted(s for n, s in runs if n == "fetch-pretrained-weights") == ["Cached", "Completed"]
    assert len(mlflow.search_model_versions("name='digits-classifier'")) == 3

    import shutil

    shutil.rmtree(harness / "datasets")  # the cached result now points at deleted files
    third = train_image_classifiers(config, return_state=True)
    assert third.is_completed(), third.message
    assert third.result().dataset_version == summary.dataset_version


def test_a_weights_error_stops_googlenet_and_fails_the_run_at_once(
        harness: Path, http_server: WeightsServer) -> None:
    """GoogLeNet starts before the weights are there; their error fails the run without
    waiting for GoogLeNet's training to end (Prefect waits for running tasks)."""
    import time

    config = PipelineConfig.model_validate(TINY)
    config.googlenet.epochs = 200  # minutes of training if it were not stopped
    config.weights.timeout_s = 600
    config.weights.uri = http_server.hold("/gone/resnet18.pth", until=_a_new_googlenet_launch(harness),
                                          status=404)
    start = time.monotonic()
    state = train_image_classifiers(config, return_state=True)
    seconds = time.monotonic() - start
    assert state.is_failed()
    assert "HTTP 404" in state.message and "correct weights.uri" in state.message, state.message
    assert http_server.released["/gone/resnet18.pth"] == 1  # answered while GoogLeNet launched
    runs = asyncio.run(_task_run_states(str(state.state_details.flow_run_id)))
    assert [s for n, s in runs if n == "train-googlenet"] == ["Failed"], runs
    assert not [n for n, _ in runs if n == "finetune-backbone"], runs
    assert seconds < 120, f"the run waited {seconds:.0f} s for GoogLeNet"
    assert not _workers_of(harness), "a rank outlived the stopped launch"


def _a_new_googlenet_launch(home: Path) -> Callable[[], bool]:
    """Whether a GoogLeNet launch has begun (its job written) since this was called."""
    pattern = "runs/*/scratch-googlenet/job.json"
    earlier = set(home.glob(pattern))  # the module's earlier tests share the state folder
    return lambda: bool(set(home.glob(pattern)) - earlier)


def _workers_of(home: Path) -> list[int]:
    """Pids of DDP workers whose job lies under ``home``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"visionpipe.training.worker" in cmdline and str(home).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _googlenet_task_inputs(flow_run_id: str) -> tuple[Any, Any, Any]:
    """The googlenet stage's config, a tiny dataset and a tracking context, outside a flow."""
    from visionpipe.tracking import TrackingContext
    from visionpipe.data import prepare_dataset

    config = PipelineConfig.model_validate(TINY)
    experiment = tracking.ensure_experiment("visionpipe")
    context = TrackingContext(experiment_id=experiment, flow_run_id=flow_run_id,
                              parent_run_id=tracking.start_run(experiment, "parent"))
    return config.googlenet, prepare_dataset(config.data), context


def test_a_failing_rank_fails_the_training_task_with_that_ranks_message(
    harness: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.train import train_googlenet
    from visionpipe.training.launch import LaunchError

    monkeypatch.setenv("VISIONPIPE_INJECT_FAULT", "raise:1")
    with pytest.raises(LaunchError, match="injected fault on rank 1") as err:
        train_googlenet.with_options(retries=0)(*_googlenet_task_inputs("failing-rank"))
    assert "rank 1 ended with" in str(err.value)


async def _task_run_states(flow_run_id: str) -> list[tuple[str, str]]:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [(r.name.rsplit("-", 1)[0], r.state.name) for r in runs if r.state]


def test_a_retried_flow_run_skips_the_stages_it_finished(
    harness: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VISIONPIPE_INJECT_FAULT", f"bug:register@{tmp_path / 'fired'}")
    config = PipelineConfig.model_validate(TINY)
    state = train_image_classifiers.with_options(retries=1)(config, return_state=True)
    assert state.is_completed(), state.message
    assert (tmp_path / "fired").exists(), "the first attempt did fail in register-model"
    states = asyncio.run(_task_run_states(str(state.state_details.flow_run_id)))
    for stage in ("finetune-backbone", "train-googlenet", "evaluate-candidates", "open-tracking-run"):
        assert sorted(s for n, s in states if n == stage) == ["Cached", "Completed"], (stage, states)
    assert sorted(s for n, s in states if n == "register-model") == ["Completed", "Failed"]


def test_out_of_memory_retries_once_with_half_the_batch(
    harness: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tasks.train import train_googlenet
    from visionpipe.training.checkpoint import load_checkpoint

    monkeypatch.setenv("VISIONPIPE_INJECT_FAULT", f"oom:0@{tmp_path / 'fired'}")
    candidate = train_googlenet.with_options(retries=0, cache_key_fn=None)(
        *_googlenet_task_inputs("oom-run"))
    saved = load_checkpoint(Path(candidate.result.last_checkpoint))
    trained_with = GoogLeNetConfig.model_validate_json(saved["config"])
    assert (trained_with.batch_size, trained_with.grad_accumulation) == (4, 2)
    assert (tmp_path / "fired").exists()


def test_a_cached_candidate_whose_checkpoint_is_not_on_this_host_is_trained_again(
    harness: Path, tmp_path: Path
) -> None:
    """A flow run retried on another worker finds the stage cached, but not its checkpoint."""
    import shutil

    from prefect import flow

    from tasks.alongside import train_candidates
    from visionpipe.config import WeightsConfig
    from visionpipe.weights import fetch_weights

    _, dataset, context = _googlenet_task_inputs("moved-host")
    config = PipelineConfig.model_validate(TINY)
    weights = fetch_weights(WeightsConfig.model_validate(TINY["weights"]), "resnet18")

    @flow
    def retried_elsewhere() -> tuple[str, str]:
        first = train_candidates(config.finetune, dataset, weights, context, alongside=[])[0]
        shutil.rmtree(Path(first.result.best_checkpoint).parent)  # the first worker's disk
        again = train_candidates(config.finetune, dataset, weights, context, alongside=[])[0]
        return first.result.best_checkpoint, again.result.best_checkpoint

    state = retried_elsewhere(return_state=True)
    assert state.is_completed(), state.message
    first, again = state.result()
    assert Path(again).is_file()
    runs = asyncio.run(_task_run_states(str(state.state_details.flow_run_id)))
    assert sorted(s for n, s in runs if n == "finetune-backbone") == ["Cached", "Completed", "Completed"]


def test_a_retried_open_tracking_run_continues_the_run_it_created(
    harness: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prefect import flow

    from tasks.tracking import open_tracking_run

    monkeypatch.setenv("VISIONPIPE_INJECT_FAULT", f"raise:open-tracking-run@{tmp_path / 'fired'}")

    @flow
    def opens() -> str:
        return open_tracking_run.with_options(retry_delay_seconds=0)(
            PipelineConfig.model_validate(TINY)).parent_run_id

    state = opens(return_state=True)
    assert state.is_completed(), state.message
    assert (tmp_path / "fired").exists(), "the first attempt failed after creating its run"
    mlflow = tracking.client()
    parents = mlflow.search_runs([mlflow.get_experiment_by_name("visionpipe").experiment_id],
                                 f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'")
    assert [r.info.run_id for r in parents] == [state.result()]


def test_an_unreachable_prefect_api_is_named_with_the_fix(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VISIONPIPE_HOME": str(tmp_path),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    out = subprocess.run([sys.executable, "-m", "flows"], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 1
    assert f"cannot reach the Prefect API at http://127.0.0.1:{port}/api" in out.stderr
    assert "PREFECT_API_URL" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists(), "nothing was started"


def test_a_photo_folder_trains_both_candidates_and_the_champion_serves_as_it_was_evaluated(
        harness: Path, tmp_path: Path) -> None:
    """Photos of many sizes (JPEG, PNG, grayscale, CMYK, EXIF-rotated, a non-ASCII class):
    the recipe is photo, both candidates register, and the champion's pyfunc scores the test
    split's raw bytes with the evaluation's accuracy and unseen photos with the class names."""
    import mlflow
    import pandas as pd

    from visionpipe import registry
    from visionpipe.data import prepare_dataset
    from visionpipe.data.synthetic import CLASS_NAMES, make_photo_folder

    sizes = ((320, 240), (240, 320))
    make_photo_folder(tmp_path / "photos", classes=6, per_class=30, sizes=sizes, seed=1)
    unseen = make_photo_folder(tmp_path / "unseen", classes=6, per_class=3, sizes=sizes,
                               specials=False, seed=2)
    config = PipelineConfig.model_validate({
        **TINY, "data": {"source": str(tmp_path / "photos"), "image_size": 32},
        # The fine-tune as on a worker with two GPUs: torchrun, two (gloo) ranks.
        "finetune": {**TINY["finetune"], "launch": {"nproc_per_node": 2}},
        "googlenet": {"epochs": 2, "batch_size": 8, "launch": {"nproc_per_node": 2}}})
    state = train_image_classifiers(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    dataset = prepare_dataset(config.data)
    assert dataset.recipe == "photo" and dataset.version == summary.dataset_version
    assert "croix-é" in dataset.class_names
    assert len(tracking.client().search_model_versions("name='photos-classifier'")) == 2
    (finetuned,) = mlflow.search_runs(  # this flow run's: the module's other runs are digits'
        search_all_experiments=True, output_format="list",
        filter_string=f"attributes.run_name = 'finetune-resnet18' and "
                      f"tags.dataset_version = '{summary.dataset_version}'")
    assert finetuned.data.params["world_size"] == "2"  # rank 0 of two logged it
    model = mlflow.pyfunc.load_model("models:/photos-classifier@champion")
    images, labels = registry.test_split_images(dataset)
    predicted = model.predict(pd.DataFrame({"image": images}))["label"].tolist()
    served_top1 = sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
    evaluated_top1 = summary.metrics[summary.decision.candidate]["top1"]
    assert abs(served_top1 - evaluated_top1) <= 1 / len(labels), (served_top1, evaluated_top1)
    scored = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in unseen]}))
    assert len(scored) == len(unseen) and set(scored["class_name"]) <= set(CLASS_NAMES)

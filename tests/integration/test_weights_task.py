"""fetch-pretrained-weights under Prefect's test harness: what its cache reuses, and what it shows."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler

from tests.servers import WeightsServer
from visionpipe.config import WeightsConfig
from visionpipe.weights import FetchedWeights, load_state_dict_file

pytestmark = [pytest.mark.integration]

SECRETS = ("T0KENSECRET", "AKIASECRET", "SIGSECRET")


def _tiny_bytes() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(4, 3).state_dict(), buffer)
    return buffer.getvalue()


@flow(name="fetch-weights-probe")
def _probe(cfg: WeightsConfig, arch: str) -> FetchedWeights:
    """What train-image-classifiers does: submit the fetch, then take it through the wrapper."""
    from tasks.weights import fetch_pretrained_weights, fetch_pretrained_weights_cached

    fetching = fetch_pretrained_weights.submit(cfg, arch)
    weights = fetch_pretrained_weights_cached(cfg, arch, fetching)
    load_state_dict_file(weights.path, weights.sha256)  # what finetune does with it
    return weights


def _run(cfg: WeightsConfig) -> tuple[FetchedWeights, str]:
    state = _probe(cfg, "resnet18", return_state=True)
    assert state.is_completed(), state.message
    return state.result(), str(state.state_details.flow_run_id)


async def _fetch_runs(flow_run_id: str) -> list[Any]:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r for r in runs if r.name.startswith("fetch-pretrained-weights")]


def _states(flow_run_id: str) -> list[str]:
    return sorted(r.state.name for r in asyncio.run(_fetch_runs(flow_run_id)))


async def _shown(flow_run_id: str) -> str:
    """What the Prefect API holds for the run: logs, artifacts, task runs (their result keys)."""
    await APILogHandler.aflush()
    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    runs = await _fetch_runs(flow_run_id)
    return "\n".join([*(log.message for log in logs), *(str(a.data) for a in artifacts),
                      *(r.model_dump_json() for r in runs)])


def test_a_deleted_weights_cache_is_fetched_again(harness: Path, http_server: WeightsServer) -> None:
    cfg = WeightsConfig(uri=http_server.serve("/w/deleted.pth", _tiny_bytes()), attempts=1)
    first, run_id = _run(cfg)
    assert _states(run_id) == ["Completed"]
    second, run_id = _run(cfg)
    assert second == first and _states(run_id) == ["Cached"]
    assert http_server.hits["/w/deleted.pth"] == 1

    shutil.rmtree(harness / "weights")  # the cached result now names a missing file
    third, run_id = _run(cfg)
    assert third.sha256 == first.sha256 and Path(third.path).is_file()
    assert _states(run_id) == ["Cached", "Completed"]
    assert http_server.hits["/w/deleted.pth"] == 2


def test_a_cached_random_init_is_not_reused_once_the_source_is_back(
    harness: Path, http_server: WeightsServer
) -> None:
    # Down for the first run's only attempt.
    url = http_server.serve("/w/flaky.pth", _tiny_bytes(), fail_first=(503,))
    cfg = WeightsConfig(uri=url, attempts=1, on_unavailable="random-init")
    first, run_id = _run(cfg)
    assert first.random_init
    # A random init made by the run itself is kept: the source was asked just now.
    assert _states(run_id) == ["Completed"] and http_server.hits["/w/flaky.pth"] == 1

    second, run_id = _run(cfg)
    assert not second.random_init and second.sha256 != first.sha256
    assert _states(run_id) == ["Cached", "Completed"]
    third, run_id = _run(cfg)
    assert third == second and _states(run_id) == ["Cached"]


def test_credentials_in_the_uri_are_never_shown(harness: Path, http_server: WeightsServer) -> None:
    secret = "?X-Amz-Credential=AKIASECRET&X-Amz-Signature=SIGSECRET"
    ok = WeightsConfig(uri=http_server.serve(f"/w/ok.pth{secret}", _tiny_bytes()), attempts=1)
    # A bare token in the userinfo (urllib cannot send it, so this source is "down").
    down = WeightsConfig(uri=f"http://T0KENSECRET@{http_server.url.split('//')[1]}/w/down.pth{secret}",
                         attempts=1, on_unavailable="random-init")
    for cfg in (ok, down):
        weights, run_id = _run(cfg)
        shown = asyncio.run(_shown(run_id))
        # The URI is shown (log line, random-init artifact), with its secrets masked.
        assert "X-Amz-Signature=***" in shown and ("RANDOM" in shown) == weights.random_init
        assert "/prefect-results/fetch-weights-resnet18-" in shown  # the cache key, on the state
        leaked = [s for s in SECRETS if s in shown]
        assert not leaked, (leaked, shown)
    stored = [p for p in (harness / "prefect-results").rglob("*") if p.is_file()]
    assert stored
    for path in stored:
        assert not any(s in str(path) or s.encode() in path.read_bytes() for s in SECRETS), path

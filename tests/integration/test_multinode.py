"""Multi-node GoogLeNet on this machine: two node runs of the served ``ddp-node`` deployment.

A Prefect server (SQLite) and a ``serve`` process of the repo's deployments run as real
processes. The pipeline flow starts one flow run per node with ``run_deployment``; each runs
torchrun with a c10d rendezvous at 127.0.0.1, which node 0 hosts, and the two form one world.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.servers import free_port

from tests.processes import stop_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}




def _config(epochs: int) -> dict[str, Any]:
    return {
        "data": {"max_per_class": 12},
        "weights": {"uri": "torchvision:resnet18.IMAGENET1K_V1", "on_unavailable": "random-init",
                    "attempts": 1},
        "finetune": {"arch": "resnet18", "batch_size": 16, "phases": [
            {"name": "full", "trainable": ["*"], "epochs": 1, "lr": 2e-3}]},
        "googlenet": {"epochs": epochs, "batch_size": 8, "launch": {
            "nnodes": "2", "nproc_per_node": 1, "rdzv_endpoint": f"127.0.0.1:{free_port()}",
            "rdzv_timeout_s": 120, "timeout_s": 600}},
    }


class Cluster:
    def __init__(self, home: Path, env: dict[str, str], api: str) -> None:
        self.home, self.env, self.api = home, env, api
        self.serve: subprocess.Popen[bytes] | None = None
        self.die_once = home / "die-once"
        self.bug_once = home / "bug-once"

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.api}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_runs(self, flow: str) -> list[dict[str, Any]]:
        return list(self.post("/flow_runs/filter", {"flows": {"name": {"any_": [flow]}},
                                                    "sort": "START_TIME_ASC"}))

    def run_pipeline(self, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = self.home / "config.json"
        path.write_text(json.dumps(config))
        return subprocess.run([sys.executable, "-m", "flows", str(path)],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=900)

    def start_serving(self, *args: str) -> None:
        """(Re)start ``python -m deployments.serve`` and wait until ddp-node is served."""
        if self.serve is not None:
            stop_group(self.serve)
        log = self.home / "serve.log"
        self.serve = subprocess.Popen([sys.executable, "-m", "deployments.serve", *args], cwd=REPO,
                                      env=self.env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                      start_new_session=True)
        time.sleep(5)  # the new runner registers its deployments again
        _wait_deployment(self, self.serve, log)

    def run_node(self, job: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
        """A flow run of the served ddp-node deployment, started through the API like the UI."""
        deployment = self.get("/deployments/name/ddp-node/ddp-node")
        run = self.post(f"/deployments/{deployment['id']}/create_flow_run",
                        {"parameters": {"job": job}})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.get(f"/flow_runs/{run['id']}")
            if current["state"]["type"] in FINAL:
                return dict(current)
            time.sleep(1)
        raise AssertionError(f"node run {run['id']} did not finish in {timeout} s")


S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("nodes")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    base.update(S3_KEYS, AWS_ENDPOINT_URL_S3=s3_server)  # for checkpoints on S3
    boto3.client("s3", endpoint_url=s3_server, **_boto_keys()).create_bucket(Bucket="checkpoints")
    port = free_port()
    server_env = {**base, "PREFECT_HOME": str(home / "server"),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env, stdout=(home / "server.log").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    env = {**base, "PREFECT_API_URL": api, "PREFECT_HOME": str(home / "client"),
           "VISIONPIPE_HOME": str(home / "vp"), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "OMP_NUM_THREADS": "2",
           # Global rank 1 dies as its second epoch starts, only while the file is absent.
           # Node 1 fails at once (before its pre-flight), only while the file is absent.
           "VISIONPIPE_INJECT_FAULT": f"die:1@{home / 'die-once'},bug:node1@{home / 'bug-once'}"}
    for once in ("die-once", "bug-once"):
        (home / once).write_text("disarmed\n")
    cluster = Cluster(home, env, api)
    try:
        _wait_http(f"{api}/health", server, home / "server.log")
        cluster.start_serving()
        yield cluster
    finally:
        for proc in (cluster.serve, server):
            if proc is not None:
                stop_group(proc)
        leftover = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout
        assert not leftover.strip(), f"processes left behind: {leftover}"


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_KEYS["AWS_DEFAULT_REGION"]}


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer: {log.read_text()[-3000:]}")


def _wait_deployment(cluster: Cluster, serve: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert serve.poll() is None, log.read_text()[-3000:]
        try:
            cluster.get("/deployments/name/ddp-node/ddp-node")
            return
        except httpx.HTTPStatusError:
            time.sleep(1)
    raise AssertionError(f"ddp-node was not served: {log.read_text()[-3000:]}")


def _node_runs_of(cluster: Cluster, parent_flow_run_id: str) -> list[dict[str, Any]]:
    """The ddp-node runs started by a pipeline flow run: subflow runs of its task runs."""
    tasks = cluster.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [parent_flow_run_id]}}})
    ids = {t["id"] for t in tasks}
    return [r for r in cluster.flow_runs("ddp-node") if r["parent_task_run_id"] in ids]


def _pipeline_run(cluster: Cluster) -> dict[str, Any]:
    """The newest pipeline run that ran (the nightly deployment's scheduled runs never start)."""
    started = [r for r in cluster.flow_runs("train-image-classifiers") if r["start_time"]]
    return max(started, key=lambda r: r["start_time"])


def _mlflow(home: Path, query: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(home / "vp" / "mlflow.db") as db:
        return db.execute(query, args).fetchall()


def _googlenet_run(home: Path, parent_flow_run_id: str) -> str:
    """The candidate run of GoogLeNet, a child of the flow run's MLflow run."""
    rows = _mlflow(home, "SELECT r.run_uuid FROM runs r "
                   "JOIN tags child ON child.run_uuid = r.run_uuid AND child.key = 'mlflow.parentRunId' "
                   "JOIN tags flow ON flow.run_uuid = child.value AND flow.key = 'prefect.flow_run_id' "
                   "WHERE r.name = 'scratch-googlenet' AND flow.value = ?", parent_flow_run_id)
    assert len(rows) == 1, rows
    return str(rows[0][0])


def test_two_node_runs_form_one_world_and_only_rank_0_logs(cluster: Cluster) -> None:
    out = cluster.run_pipeline(_config(epochs=2))
    assert out.returncode == 0, out.stderr[-4000:]
    parent = _pipeline_run(cluster)
    nodes = _node_runs_of(cluster, parent["id"])
    assert sorted(n["name"].rsplit("-", 1)[-1] for n in nodes) == ["node0", "node1"]
    assert all(n["state"]["type"] == "COMPLETED" and n["deployment_id"] for n in nodes), nodes
    # Global rank 0's result, in the shared stage folder: one world of 2 ranks on 2 nodes.
    stage = cluster.home / "vp" / "runs" / parent["id"] / "scratch-googlenet"
    (result_file,) = stage.glob("result-*.json")
    result = json.loads(result_file.read_text())
    assert result["world_size"] == 2 and result["nnodes"] == 2 and result["epochs_run"] == 2
    digests = result["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "ranks ended with different weights"
    run_id = _googlenet_run(cluster.home, parent["id"])
    params = dict(_mlflow(cluster.home, "SELECT key, value FROM params WHERE run_uuid = ?", run_id))
    assert params["world_size"] == "2" and params["nnodes"] == "2"
    # One value per epoch: a second rank logging would double every step.
    steps = _mlflow(cluster.home, "SELECT step FROM metrics WHERE run_uuid = ? AND key = 'val_top1'",
                    run_id)
    assert sorted(s for (s,) in steps) == [1, 2]
    tags = dict(_mlflow(cluster.home, "SELECT key, value FROM tags WHERE run_uuid = ?", run_id))
    assert tags["ranks_identical_weights"] == "true"


def test_a_dead_node_fails_the_parent_fast_and_its_retry_resumes(cluster: Cluster) -> None:
    cluster.die_once.unlink()  # arm the fault: global rank 1 dies once, after epoch 1
    config = _config(epochs=2)
    # Checkpoints on S3: the retry's nodes start from empty local folders and download them.
    config["googlenet"]["launch"]["shared_dir"] = "s3://checkpoints/runs"
    out = cluster.run_pipeline(config)
    assert out.returncode == 0, out.stderr[-4000:]
    assert cluster.die_once.exists(), "the fault did not fire"
    parent = _pipeline_run(cluster)
    nodes = _node_runs_of(cluster, parent["id"])
    first = [n for n in nodes if "-a1-" in n["name"]]
    second = [n for n in nodes if "-a2-" in n["name"]]
    assert len(first) == 2 and len(second) == 2, [n["name"] for n in nodes]
    assert {n["state"]["type"] for n in first} <= {"FAILED", "CRASHED", "CANCELLED"}, first
    assert all(n["state"]["type"] == "COMPLETED" for n in second), second
    # Fail fast: the first attempt's nodes all ended within a minute of each other (the
    # collective timeout is 10 minutes), and before the retry's nodes started.
    ends = [datetime.fromisoformat(n["end_time"]) for n in first]
    assert (max(ends) - min(ends)).total_seconds() < 60, ends
    starts = [datetime.fromisoformat(n["start_time"]) for n in second]
    assert max(ends) <= min(starts)
    run_id = _googlenet_run(cluster.home, parent["id"])
    resumed = _mlflow(cluster.home, "SELECT value FROM metrics WHERE run_uuid = ? AND "
                      "key = 'resumed_from_epoch'", run_id)
    assert [v for (v,) in resumed] == [1.0]
    s3 = boto3.client("s3", endpoint_url=cluster.env["AWS_ENDPOINT_URL_S3"], **_boto_keys())
    keys = {o["Key"] for o in s3.list_objects_v2(
        Bucket="checkpoints", Prefix=f"runs/{parent['id']}/scratch-googlenet/")["Contents"]}
    stage = f"runs/{parent['id']}/scratch-googlenet"
    assert {f"{stage}/last.pt", f"{stage}/last.pt.sha256", f"{stage}/best.pt"} <= keys, keys
    assert any(k.startswith(f"{stage}/result-") and "-a2" in k for k in keys), keys
    # The parent's downloaded result files are gone, of the failed attempt too. (A failed node
    # keeps its scratch folder: it may hold a checkpoint whose upload failed.)
    assert not list((cluster.home / "vp" / "nodes").glob("*/parent")), \
        list((cluster.home / "vp" / "nodes").rglob("*"))


def test_a_node_failing_deterministically_cancels_the_waiting_node(cluster: Cluster) -> None:
    config = _config(epochs=1)
    config["googlenet"]["launch"]["rdzv_timeout_s"] = 300  # node 0 would wait this long alone
    cluster.bug_once.unlink()  # arm: node 1 raises an AssertionError before its pre-flight
    started = time.monotonic()
    out = cluster.run_pipeline(config)
    assert out.returncode != 0 and "InjectedBugError" in out.stderr, out.stderr[-3000:]
    assert time.monotonic() - started < 240, "the parent waited for the rendezvous timeout"
    nodes = {n["name"].rsplit("-", 1)[-1]: n for n in _node_runs_of(cluster, _pipeline_run(cluster)["id"])}
    assert set(nodes) == {"node0", "node1"}, "a deterministic failure is not retried"
    assert nodes["node1"]["state"]["type"] == "FAILED"
    deadline = time.monotonic() + 60  # the runner reports the cancelled process
    while cluster.get(f"/flow_runs/{nodes['node0']['id']}")["state"]["type"] != "CANCELLED":
        assert time.monotonic() < deadline, cluster.get(f"/flow_runs/{nodes['node0']['id']}")["state"]
        time.sleep(1)
    leftover = subprocess.run(["pgrep", "-f", "torch.distributed.run"], capture_output=True, text=True)
    assert not leftover.stdout.strip(), "node 0's torchrun outlived its cancelled run"


def test_preflight_names_a_gpu_shortage_and_an_unreachable_rendezvous(cluster: Cluster) -> None:
    from visionpipe.config import DataConfig, GoogLeNetConfig
    from visionpipe.data import prepare_dataset

    os.environ["VISIONPIPE_HOME"] = cluster.env["VISIONPIPE_HOME"]
    try:
        dataset = prepare_dataset(DataConfig(max_per_class=12)).model_dump(mode="json")
    finally:
        del os.environ["VISIONPIPE_HOME"]
    job = {"dataset": dataset, "node_count": 2, "rdzv_id": "preflight",
           "shared_dir": str(cluster.home / "shared-preflight")}
    nccl = GoogLeNetConfig.model_validate({"launch": {
        "nnodes": "2", "nproc_per_node": 2, "backend": "nccl", "rdzv_endpoint": "127.0.0.1:29400"}})
    run = cluster.run_node({**job, "config": nccl.model_dump(mode="json"), "node_index": 0,
                            "rdzv_endpoint": "127.0.0.1:29400"})
    message = run["state"]["message"]
    assert run["state"]["type"] == "FAILED"
    assert "2 NCCL process(es) but this host has 0 visible GPU(s)" in message, message
    assert "nproc_per_node" in message

    closed = free_port()  # nothing listens there
    quick = GoogLeNetConfig.model_validate({"launch": {
        "nnodes": "2", "nproc_per_node": 1, "rdzv_endpoint": f"127.0.0.1:{closed}",
        "rdzv_timeout_s": 3}})
    started = time.monotonic()
    run = cluster.run_node({**job, "config": quick.model_dump(mode="json"), "node_index": 1,
                            "rdzv_endpoint": f"127.0.0.1:{closed}"})
    message = run["state"]["message"]
    assert run["state"]["type"] == "FAILED"
    assert f"rendezvous endpoint 127.0.0.1:{closed} did not answer within 3 s" in message, message
    assert time.monotonic() - started < 120


def test_an_elastic_range_trains_with_the_nodes_that_joined(cluster: Cluster) -> None:
    # This host runs one flow run at a time: node 1 cannot start while node 0 trains.
    cluster.start_serving("--limit", "1")
    config = _config(epochs=1)
    config["googlenet"]["launch"]["nnodes"] = "1:2"
    out = cluster.run_pipeline(config)
    assert out.returncode == 0, out.stderr[-4000:]
    parent = _pipeline_run(cluster)
    nodes = {n["name"].rsplit("-", 1)[-1]: n for n in _node_runs_of(cluster, parent["id"])}
    assert nodes["node0"]["state"]["type"] == "COMPLETED"
    # Node 1 never joins: cancelled by the parent (a runner that has just started it may take a
    # while to stop it), or failing its own pre-flight wait; never part of the world.
    deadline = time.monotonic() + 240
    while cluster.get(f"/flow_runs/{nodes['node1']['id']}")["state"]["type"] not in {
            "CANCELLED", "FAILED", "CRASHED"}:
        assert time.monotonic() < deadline, cluster.get(f"/flow_runs/{nodes['node1']['id']}")["state"]
        time.sleep(1)
    stage = cluster.home / "vp" / "runs" / parent["id"] / "scratch-googlenet"
    (result_file,) = stage.glob("result-*.json")
    result = json.loads(result_file.read_text())
    assert result["world_size"] == 1 and result["nnodes"] == 1

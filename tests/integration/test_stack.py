"""The production-like stack: Prefect server and MLflow server on PostgreSQL, S3 on moto's server.

The deployments are deployed to a process work pool and run by a real `prefect worker`; a run is
started through the Prefect API with parameters, exactly as the UI's form does; the results are
checked on the servers themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.processes import stop_group
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TINY = {
    "data": {"max_per_class": 12},
    "weights": {"uri": "torchvision:resnet18.IMAGENET1K_V1", "on_unavailable": "random-init",
                "attempts": 1},
    "finetune": {"arch": "resnet18", "batch_size": 16, "phases": [
        {"name": "full", "trainable": ["*"], "epochs": 1, "lr": 2e-3}]},
    "googlenet": {"epochs": 1, "batch_size": 8, "launch": {"nproc_per_node": 2}},
    # One epoch on 120 digits can end at chance: no quality floor (the gate's tests check it).
    "registry": {"min_score": 0},
}


def _python(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("stackhome")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    base["VISIONPIPE_HOME"] = str(home)
    base["VISIONPIPE_STACK_DB"] = f"vp_test_{os.getpid()}"  # never the developer's own stack
    started = _python(["-m", "deployments.stack", "up"], base, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    env = {**base, **dict(line.split("=", 1) for line in (home / "stack.env").read_text().splitlines())}
    env["PREFECT_HOME"] = str(home / "client-prefect")
    # The deployments go to a process work pool, and a worker runs them, as on a GPU host.
    for args in (["-m", "deployments.pools", "--gpus", "2"], ["-m", "deployments.deploy", "--pool", "gpu-host"]):
        made = _python(args, env, timeout=300)
        assert made.returncode == 0, made.stderr[-3000:]
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu-host"], cwd=REPO,
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_HOME": str(home / "worker-prefect")},
        stdout=(home / "worker.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield env
    finally:
        stop_group(worker)
        stopped = _python(["-m", "deployments.stack", "down"], base, timeout=120)
        assert stopped.returncode == 0 and "stopped 3 process group(s)" in stopped.stdout, stopped
        leftover = subprocess.run(["pgrep", "-f", f"{home}"], capture_output=True, text=True).stdout
        assert not leftover.strip(), f"processes left behind: {leftover}"
        _drop_databases(base["VISIONPIPE_STACK_DB"])


def _drop_databases(prefix: str) -> None:
    import psycopg2

    conn = psycopg2.connect(user="postgres", host="127.0.0.1", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for suffix in ("prefect", "mlflow"):
            cur.execute(f'DROP DATABASE IF EXISTS "{prefix}_{suffix}" WITH (FORCE)')
    conn.close()


RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=900)
print(json.dumps({"state": run.state.type.value, "message": run.state.message}))
"""


def _run_deployment(env: dict[str, str], name: str, parameters: dict[str, object]) -> dict[str, str]:
    deadline = time.monotonic() + 120  # deployments are registered before the worker starts
    while True:
        out = _python(["-c", RUN_DEPLOYMENT, name, json.dumps(parameters)], env, timeout=1200)
        if out.returncode == 0 or time.monotonic() > deadline or "not found" not in out.stderr.lower():
            break
        time.sleep(3)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_run_started_through_the_api_trains_registers_and_is_consumable(stack: dict[str, str]) -> None:
    result = _run_deployment(stack, "train-image-classifiers/on-demand", {"config": TINY})
    assert result["state"] == "COMPLETED", result
    uri = stack["MLFLOW_TRACKING_URI"]  # both: an earlier test may have set a global registry URI
    mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = mlflow.search_model_versions("name='digits-classifier'")
    assert len(versions) == 2
    champion = mlflow.get_model_version_by_alias("digits-classifier", "champion")
    s3 = _s3(stack)
    keys = [o["Key"] for o in s3.list_objects_v2(  # type: ignore[attr-defined]
       Bucket="visionpipe-artifacts")["Contents"]]
    assert any(k.endswith("state_dict.pt") for k in keys), "model artifacts are objects in the bucket"
    consumer = _python(["-c", (
        "import mlflow, pandas as pd, glob, sys; mlflow.set_tracking_uri(sys.argv[1]);"
        "m = mlflow.pyfunc.load_model('models:/digits-classifier@champion');"
        "imgs = [open(p, 'rb').read() for p in sorted(glob.glob(sys.argv[2] + '/*/*.png'))[:5]];"
        "print(m.predict(pd.DataFrame({'image': imgs}))['class_name'].tolist())"),
        stack["MLFLOW_TRACKING_URI"], _digits_folder(stack)],
        {k: v for k, v in stack.items() if not k.startswith("AWS_")}, timeout=300)
    assert consumer.returncode == 0, consumer.stderr[-3000:]
    assert len(eval(consumer.stdout.strip().splitlines()[-1])) == 5  # noqa: S307 - our own output
    assert champion.version in {v.version for v in versions}


PROBE_CACHE = """
import json, sys
from prefect import flow
from tasks.data import prepare_dataset_task
from visionpipe.config import DataConfig

@flow
def probe(data: dict) -> str:
    return prepare_dataset_task(DataConfig.model_validate(data), return_state=True).name

print(json.dumps({"state": probe(json.loads(sys.argv[1]))}))
"""


def test_results_live_in_s3_so_another_worker_finds_the_cache(
        stack: dict[str, str], tmp_path: Path) -> None:
    # Run after the on-demand run above, which prepared this dataset on the served worker.
    keys = [o["Key"] for o in _s3(stack).list_objects_v2(  # type: ignore[attr-defined]
        Bucket="visionpipe-artifacts", Prefix="prefect-results/").get("Contents", [])]
    assert keys, "no Prefect result was written to the bucket"
    # Another worker: a fresh PREFECT_HOME, so nothing of the first one's local storage.
    other = {**stack, "PREFECT_HOME": str(tmp_path / "other-worker")}
    out = _python(["-c", PROBE_CACHE, json.dumps(TINY["data"])], other, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["state"] == "Cached"


def _s3(stack: dict[str, str]) -> object:
    return boto3.client("s3", endpoint_url=stack["AWS_ENDPOINT_URL_S3"],
                        aws_access_key_id=stack["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=stack["AWS_SECRET_ACCESS_KEY"],
                        region_name=stack["AWS_DEFAULT_REGION"])


def _digits_folder(stack: dict[str, str]) -> str:
    return str(Path(stack["VISIONPIPE_HOME"]) / "datasets" / "_sources" / "digits")


def test_the_nightly_deployment_is_scheduled_and_scoring_writes_to_s3(stack: dict[str, str]) -> None:
    check = _python(["-c", (
        "import asyncio, json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        d = await c.read_deployment_by_name('train-image-classifiers/nightly')\n"
        "        runs = await c.read_flow_runs(deployment_filter=DeploymentFilter(id={'any_': [d.id]}),"
        " flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=['SCHEDULED']))))\n"
        "        print(json.dumps({'cron': d.schedules[0].schedule.cron, 'tz': d.schedules[0].schedule.timezone, 'scheduled': len(runs)}))\n"
        "asyncio.run(main())\n")], stack, timeout=120)
    deadline = time.monotonic() + 60
    while check.returncode == 0 and json.loads(check.stdout.strip().splitlines()[-1])["scheduled"] == 0 \
            and time.monotonic() < deadline:
        time.sleep(5)  # the scheduler service runs every 5 s on this stack
        check = _python(check.args[1:], stack, timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    nightly = json.loads(check.stdout.strip().splitlines()[-1])
    assert nightly["cron"] == "0 2 * * *" and nightly["tz"] == "Europe/Berlin" and nightly["scheduled"] > 0
    folder = Path(stack["VISIONPIPE_HOME"]) / "to-score" / "3"
    folder.mkdir(parents=True, exist_ok=True)
    for png in sorted(Path(_digits_folder(stack), "3").glob("*.png"))[:4]:
        shutil.copy(png, folder / png.name)
    result = _run_deployment(stack, "score-images/on-demand", {
        "source": str(folder.parent), "output": "s3://visionpipe-datasets/predictions/today.parquet"})
    assert result["state"] == "COMPLETED", result
    s3 = _s3(stack)
    head = s3.head_object(Bucket="visionpipe-datasets", Key="predictions/today.parquet")
    assert head["ContentLength"] > 0


def test_work_pools_and_the_gpu_limit_are_created(stack: dict[str, str]) -> None:
    made = _python(["-m", "deployments.pools", "--gpus", "2", "--kubernetes"], stack, timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    again = _python(["-m", "deployments.pools", "--gpus", "4"], stack, timeout=120)
    assert "concurrency limit gpu = 4 (was 2)" in again.stdout
    read = _python(["-c", (
        "import asyncio, json\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        k8s = await c.read_work_pool('gpu-kubernetes')\n"
        "        host = await c.read_work_pool('gpu-host')\n"
        "        gcl = await c.read_global_concurrency_limit_by_name('gpu')\n"
        "        print(json.dumps({'host': host.type, 'k8s': k8s.base_job_template, 'gpu': gcl.limit}))\n"
        "asyncio.run(main())\n")], stack, timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    pools = json.loads(read.stdout.strip().splitlines()[-1])
    assert pools["host"] == "process" and pools["gpu"] == 4
    container = pools["k8s"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    resources = container["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["volumes"][0]["emptyDir"]["medium"] == "Memory"

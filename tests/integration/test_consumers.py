"""Consumers of the registry: the score-images flow and `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pandas as pd
import pytest

from tests.checkpoints import untrained_checkpoint
from tests.servers import free_port
from prefect.testing.utilities import prefect_test_harness

from visionpipe import registry, settings, tracking
from visionpipe.config import DataConfig, RegistryConfig
from visionpipe.data import prepare_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A registered champion (untrained weights: these tests check plumbing, not accuracy)."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("VISIONPIPE_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    dataset = prepare_dataset(DataConfig(max_per_class=5))
    checkpoint = untrained_checkpoint(home / "ck" / "best.pt", dataset)
    run_id = tracking.start_run(tracking.ensure_experiment("consumers"), "candidate")
    uri = registry.log_pyfunc_model(run_id, checkpoint, home / "export", dataset)
    version = registry.register_version("candidate", "digits-classifier", uri, run_id, {})
    registry.gate_champion(version, dataset, RegistryConfig(min_score=0))
    folder = home / "to-score"
    for cls in ("1", "7"):
        (folder / cls).mkdir(parents=True)
        for png in sorted((Path(dataset.root) / cls).glob("*.png"))[:3]:
            shutil.copy(png, folder / cls / png.name)
    (folder / "7" / "broken.png").write_bytes(b"not a png")
    with prefect_test_harness(server_startup_timeout=120):
        yield home, folder
    mp.undo()


def test_score_images_writes_parquet_locally_and_to_s3(
    champion: tuple[Path, Path], s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.score_images import score_images

    home, folder = champion
    local = home / "out" / "predictions.parquet"
    summary = score_images(str(folder), str(local))
    frame = pd.read_parquet(local)
    assert len(frame) == summary.images == 7 and summary.unreadable == 1
    assert set(frame.columns) >= {"path", "folder", "label", "class_name", "probability", "error"}
    assert frame.loc[frame["path"] == "7/broken.png", "error"].item() != ""
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="predictions")
    score_images(str(folder), "s3://predictions/nightly/out.parquet")
    body = boto3.client("s3", endpoint_url=s3_env).get_object(Bucket="predictions", Key="nightly/out.parquet")
    assert len(pd.read_parquet(__import__("io").BytesIO(body["Body"].read()))) == 7
    runs = tracking.client().search_runs(
        [tracking.client().get_experiment_by_name("visionpipe-scoring").experiment_id])
    assert len(runs) == 2 and runs[0].data.metrics["images"] == 7
    # record-scoring fails once after its run is complete: the retry continues that run.
    monkeypatch.setenv("VISIONPIPE_INJECT_FAULT", f"raise:record-scoring@{home / 'fired'}")
    score_images(str(folder), str(home / "out" / "again.parquet"))
    assert (home / "fired").exists()
    runs = tracking.client().search_runs(
        [tracking.client().get_experiment_by_name("visionpipe-scoring").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    monkeypatch.delenv("VISIONPIPE_INJECT_FAULT")
    from prefect.exceptions import ParameterTypeError

    for bad in (0, -1):  # refused at the form, before the model loads or a file is written
        with pytest.raises(ParameterTypeError, match="greater than 0"):
            score_images(str(folder), str(home / "out" / "bad.parquet"), batch_size=bad)
    assert not (home / "out" / "bad.parquet").exists()




def test_mlflow_models_serve_answers_an_encoded_image(champion: tuple[Path, Path]) -> None:
    home, folder = champion
    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow runs uvicorn from the environment's PATH
    env = {**os.environ, "VISIONPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": settings.tracking_uri(),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = bin_dir / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", "models:/digits-classifier@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server)
        png = next((folder / "1").glob("*.png")).read_bytes()
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        prediction = answer["predictions"][0]
        assert set(prediction) == {"label", "class_name", "probability", "probabilities"}
        assert 0 < prediction["probability"] <= 1 and prediction["class_name"] in [str(i) for i in range(10)]
        assert len(prediction["probabilities"]) == 10  # one per class, over REST as a list
        assert sum(prediction["probabilities"]) == pytest.approx(1.0)
        assert max(prediction["probabilities"]) == pytest.approx(prediction["probability"])
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _wait_for(url: str, server: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {server.stderr.read().decode()[-6000:]}")  # type: ignore[union-attr]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")

"""The MLflow UI our users pick models in, opened in headless Chromium (Debian's, no download).

A registered model with the champion alias, a model card and a run with per-epoch metrics and
the evaluation's pictures, served by ``mlflow server`` on the embedded SQLite store; Playwright
drives ``/usr/bin/chromium`` (the ``page`` fixture, ``tests/integration/conftest.py``). Screenshots go to the test's folder (``docs/images`` holds the
README's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import require_chromium
from tests.checkpoints import untrained_checkpoint
from tests.servers import free_port

pytestmark = pytest.mark.integration
@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """What a run of the pipeline leaves in MLflow, and ``mlflow server`` over it."""
    require_chromium()
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("VISIONPIPE_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    from visionpipe import registry, settings, tracking
    from visionpipe.config import DataConfig, RegistryConfig
    from visionpipe.data import prepare_dataset
    from visionpipe.evaluation import evaluate_checkpoint

    dataset = prepare_dataset(DataConfig(max_per_class=8))
    checkpoint = untrained_checkpoint(home / "ck" / "best.pt", dataset)
    experiment = tracking.ensure_experiment("browser")
    run_id = tracking.start_run(experiment, "finetune-resnet18")
    history = [{"epoch": e, "phase": "full", "phase_epoch": e, "train_loss": 2.0 / e,
                "val_loss": 2.1 / e, "train_top1": 0.2 * e, "val_top1": 0.2 * e, "lr": 0.01 / e}
               for e in range(1, 4)]
    for record in history:
        tracking.log_metrics(run_id, {k: record[k] for k in ("val_top1", "train_loss")},
                             step=int(record["epoch"]))
    evaluation = evaluate_checkpoint("finetune-resnet18", checkpoint, dataset, 64, home / "eval",
                                     history=history)
    for path in (evaluation.confusion_png, *evaluation.figures.values()):
        tracking.log_artifact(run_id, Path(path), "evaluation")
    uri = registry.log_pyfunc_model(run_id, checkpoint, home / "export", dataset)
    version = registry.register_version("finetune-resnet18", "digits-classifier", uri, run_id,
                                        {"arch": "resnet18"})
    decision = registry.gate_champion(version, dataset, RegistryConfig(min_score=0))
    card = registry.model_card(version, evaluation.metrics, dataset,
                               {"arch": "resnet18", "weights_source": "random-init"}, decision)
    registry.describe_version("digits-classifier", version.version, card)
    tracking.end_run(run_id)
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
         settings.tracking_uri(), "--default-artifact-root", str(settings.artifact_root()),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=(home / "mlflow.log").open("wb"), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    (home / "mlflow.log").read_text()[-2000:]
                time.sleep(1)
        yield {"url": f"http://127.0.0.1:{port}", "experiment": experiment, "run_id": run_id,
               "evaluation": evaluation, "version": version.version}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        mp.undo()


def _show(page: Any, url: str, text: str, shot: Path) -> str:
    """Open ``url``, wait for ``text`` to appear, screenshot, return the page's text."""
    page.goto(url)
    page.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)  # let the rest of the page settle for the screenshot
    page.screenshot(path=str(shot))
    return str(page.inner_text("body")).replace("\xa0", " ")


def test_the_registered_model_page_lists_the_versions_and_the_champion(
        mlflow_ui: dict[str, Any], page: Any, tmp_path: Path) -> None:
    model = f"{mlflow_ui['url']}/#/models/digits-classifier"
    body = _show(page, model, "champion", tmp_path / "mlflow-model.png")
    assert f"Version {mlflow_ui['version']}" in body and "@ champion" in body
    # The version's page: its model card, rendered from the description's markdown.
    body = _show(page, f"{model}/versions/{mlflow_ui['version']}", "RANDOM INIT",
                 tmp_path / "mlflow-version.png")
    assert "start: RANDOM INIT: no pretrained weights were reachable" in body
    assert "champion gate: promoted (rule first)" in body and "@ champion" in body


def test_the_champions_run_shows_its_metric_charts_and_evaluation_pictures(
        mlflow_ui: dict[str, Any], page: Any, tmp_path: Path) -> None:
    from PIL import Image

    run = f"{mlflow_ui['url']}/#/experiments/{mlflow_ui['experiment']}/runs/{mlflow_ui['run_id']}"
    body = _show(page, f"{run}/model-metrics", "(val_top1)", tmp_path / "mlflow-metrics.png")
    assert "finetune-resnet18 (val_top1)" in body and "finetune-resnet18 (train_loss)" in body
    for name, path in mlflow_ui["evaluation"].figures.items():
        file = Path(path).name
        with Image.open(path) as image:
            width = image.size[0]
        page.goto(f"{run}/artifacts/evaluation/{file}")
        page.reload()  # a new hash alone leaves the artifact pane on the file shown before
        # The PNG itself, decoded by the browser: an image of the file's own width appears.
        page.wait_for_function(
            f"[...document.images].some(i => i.complete && i.naturalWidth === {width})",
            timeout=60_000)
        page.screenshot(path=str(tmp_path / f"mlflow-{name}.png"))

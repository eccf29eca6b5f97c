"""The train-style-transfer and stylize-image flows end to end on tiny sizes on the CPU, under
Prefect's test server; the registered Stylizer through pyfunc and `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from PIL import Image

from flows.stylize_image import stylize_image
from flows.train_style_transfer import StyleSummary, train_style_transfer
from tests.integration.test_consumers import _wait_for
from tests.servers import free_port
from tests.style_fixtures import TINY_LOSS, TINY_TRAIN, vgg16_features
from visionpipe import registry, settings, tracking
from visionpipe.config import GatysConfig, StyleConfig
from visionpipe.digests import file_sha256

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def vgg_uri(harness: Path) -> dict[str, Any]:
    """A tiny VGG-16 (features up to relu2_2, seeded) served as a file:// URI with its digest."""
    path = vgg16_features(harness / "vgg16-features.pth")
    return {"uri": path.as_uri(), "sha256": file_sha256(path)}


def _config(vgg: dict[str, Any], **changes: Any) -> StyleConfig:
    return StyleConfig.model_validate({
        "data": {"max_per_class": 6, "image_size": 32}, "weights": vgg,
        "loss": TINY_LOSS.model_dump(), "train": TINY_TRAIN.model_dump(),
        "registry": {"heldout_images": 8}, **changes})


@pytest.fixture(scope="module")
def trained(harness: Path, vgg_uri: dict[str, Any]) -> StyleSummary:
    state = train_style_transfer(_config(vgg_uri), return_state=True)
    assert state.is_completed(), state.message
    return state.result()  # type: ignore[no-any-return]


def _image(size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_flow_trains_evaluates_and_registers_the_first_champion(trained: StyleSummary) -> None:
    assert trained.model_name == "waves-stylizer" and trained.champion_version == "1"
    assert trained.decision.promoted and trained.decision.rule == "first"
    assert {"heldout_total_loss", "heldout_style_loss", "heldout_content_loss",
            "stylize_images_per_s"} <= set(trained.metrics)
    with Image.open(trained.grid_png) as grid:  # 8 held-out images above their stylised versions
        assert grid.format == "PNG" and grid.size == (8 * 32, 2 * 32)
    version = tracking.client().get_model_version("waves-stylizer", "1")
    assert version.tags["style"] == "waves" and version.tags["gate_rule"] == "first"
    run = tracking.client().get_run(version.run_id)
    assert [m.step for m in tracking.client().get_metric_history(run.info.run_id, "total_loss")] == [1, 2]
    assert any(a.path == "evaluation" for a in tracking.client().list_artifacts(run.info.run_id))


def test_the_registered_model_returns_a_png_of_the_inputs_size(trained: StyleSummary) -> None:
    model = mlflow.pyfunc.load_model("models:/waves-stylizer@champion")
    inputs = [_image((37, 23), "JPEG"), _image((20, 48), "PNG")]
    out = model.predict(pd.DataFrame({"image": inputs}))
    for png, size in zip(out["image"], [(37, 23), (20, 48)], strict=True):
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.size == size and image.mode == "RGB"


def test_a_run_that_does_not_lower_the_loss_leaves_the_champion(
        trained: StyleSummary, vgg_uri: dict[str, Any]) -> None:
    # The same config trains the same weights (CPU, seeded): the same loss is not lower.
    again = train_style_transfer(_config(vgg_uri))
    assert not again.decision.promoted and again.decision.rule == "kept", again.decision
    assert again.decision.candidate_score == pytest.approx(again.decision.champion_score)
    assert again.champion_version == "1" and again.decision.candidate_version == "2"


def test_mlflow_models_serve_answers_with_a_base64_png(trained: StyleSummary, harness: Path) -> None:
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri(),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/waves-stylizer@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(
            _image((30, 18), "JPEG")).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        png = base64.b64decode(answer["predictions"][0]["image"])
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.size == (30, 18)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_stylize_image_optimises_one_picture_and_writes_its_png(
        harness: Path, vgg_uri: dict[str, Any], tmp_path: Path) -> None:
    content = tmp_path / "content.png"
    content.write_bytes(_image((40, 30), "PNG"))
    cfg = GatysConfig(steps=3, image_size=24, loss=TINY_LOSS, weights=vgg_uri, device="cpu")
    written = stylize_image(content.as_uri(), "bundled:waves", str(tmp_path / "out.png"), cfg)
    with Image.open(written) as image:
        assert image.format == "PNG" and image.size == (32, 24)  # short side 24, aspect kept


def test_the_gate_refuses_a_random_loss_network_and_a_retry_returns_the_decision_made(
        trained: StyleSummary, vgg_uri: dict[str, Any]) -> None:
    import torch

    from visionpipe.data import load_split, prepare_dataset
    from visionpipe.registry import Registration
    from visionpipe.style.images import bundled_style_path
    from visionpipe.style.network import StyleSpec
    from visionpipe.style.registry import gate_style
    from visionpipe.style.train import StyleInputs, perceptual_loss, style_image_tensor

    config = _config(vgg_uri)
    inputs = StyleInputs(dataset=prepare_dataset(config.data), style="waves",
                         style_path=str(bundled_style_path()),
                         style_sha256=file_sha256(bundled_style_path()),
                         loss_weights_path=vgg_uri["uri"].removeprefix("file://"),
                         loss_weights_sha256=vgg_uri["sha256"])
    criterion = perceptual_loss(config.loss, style_image_tensor(inputs, config.loss),
                                Path(inputs.loss_weights_path), inputs.loss_weights_sha256,
                                torch.device("cpu"))
    images = load_split(inputs.dataset, "test")[0][:4]
    spec = StyleSpec(style="waves", style_sha256=inputs.style_sha256, channels=4,
                     residual_blocks=1, image_size=32)

    def registration(version: str) -> Registration:
        run_id = tracking.client().get_model_version("waves-stylizer", version).run_id
        return Registration(candidate="style-waves", model_name="waves-stylizer", version=version,
                            model_uri=f"models:/waves-stylizer/{version}", run_id=run_id)

    def champion() -> str:
        return str(tracking.client().get_model_version_by_alias("waves-stylizer", "champion").version)

    holder = champion()
    # The same network registered as another style's first version, trained (say) against a
    # random VGG: no champion yet, and still refused.
    first = registry.register_version("style-waves", "waves-random-stylizer",
                                      f"models:/waves-stylizer/{holder}",
                                      registration(holder).run_id, {})
    refused = gate_style(first, spec, images, criterion, "champion", random_init=True)
    assert not refused.promoted and refused.rule == "random_init", refused
    assert registry.champion_version("waves-random-stylizer", "champion") is None
    # register-model retried after its promotion: the decision as it was made, from the tags.
    again = gate_style(registration(holder), spec, images, criterion, "champion")
    assert again.promoted and again.rule == "first" and again.candidate_version == holder
    assert champion() == holder

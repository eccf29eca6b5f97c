"""The Prefect UI's run form, opened in headless Chromium against a real Prefect server.

``prefect server start`` on SQLite in the module's own folder; ``python -m deployments.serve``
(what ``make serve`` runs) registers and serves the deployments of ``prefect.yaml``; the tests
open ``train-image-classifiers/on-demand`` -> Run -> Custom run as a person would, and read
what the server recorded through its API. Screenshots go to the test's folder (``docs/images``
holds the README's).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.serve import load_specs
from flows.prefect_database import seed_database
from tests.browser import require_chromium
from tests.processes import stop_group
from tests.servers import free_port
from visionpipe.config import PipelineConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = "on-demand"


def _api(base: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"{base}{path}", data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _wait(what: str, ready: Any, log: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = ready()
            if value:
                return value
        except OSError:
            pass
        assert proc.poll() is None, f"{what} exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} not ready after {timeout_s} s: {log.read_text()[-3000:]}"
        time.sleep(1)


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A Prefect server with the UI, and ``deployments.serve`` serving the training flow."""
    require_chromium()
    home = tmp_path_factory.mktemp("prefect-ui")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(VISIONPIPE_HOME=str(home / "state"), PREFECT_HOME=str(home / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=f"{url}/api",
               # The UI's own calls go to this server, not to the default port 4200.
               PREFECT_UI_API_URL=f"{url}/api")
    seed_database(home / "prefect" / "prefect.db")  # migrated at install: a faster start
    server_log = home / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=server_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    serve_log = home / "serve.log"
    serve = None
    try:
        _wait("prefect server", lambda: _api(url, "/api/health"), server_log, server, 180)
        serve = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve", "--flows", "train-image-classifiers"],
            cwd=REPO, env=env, stdout=serve_log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deployment = _wait(
            "deployments.serve",
            lambda: next((d for d in _api(url, "/api/deployments/filter", {})
                          if d["name"] == DEPLOYMENT), None), serve_log, serve, 180)
        yield {"url": url, "api": f"{url}/api", "deployment": deployment, "home": home,
               "serve_log": serve_log}
    finally:
        if serve is not None:
            stop_group(serve)
        stop_group(server)


def _field(scope: Any, label: str) -> Any:
    """The form property whose own label (not a nested property's) is ``label``."""
    return scope.locator(
        "xpath=.//div[contains(concat(' ', @class, ' '), ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]//span[contains(@class, "
        f"'schema-form-property__label') and normalize-space(.)='{label}']]").first


def _open_form(page: Any, ui: dict[str, Any]) -> None:
    page.goto(f"{ui['url']}/deployments/deployment/{ui['deployment']['id']}/run")
    page.get_by_text("Max Per Class (Optional)").first.wait_for(timeout=60_000)


def _flat(text: str) -> str:
    return " ".join(text.replace("\xa0", " ").replace("`", "").split())


def _runs_of_the_deployment(ui: dict[str, Any]) -> list[dict[str, Any]]:
    return _api(ui["api"], "/flow_runs/filter", {
        "flow_runs": {"deployment_id": {"any_": [ui["deployment"]["id"]]}}})  # type: ignore[no-any-return]


def test_the_form_shows_every_section_with_its_description_defaults_and_choices(
        prefect_ui: dict[str, Any], page: Any, tmp_path: Path) -> None:
    _open_form(page, prefect_ui)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(tmp_path / "prefect-form.png"))
    body = _flat(page.inner_text("body"))
    schema = PipelineConfig.model_json_schema()
    for name, prop in schema["properties"].items():
        section = schema["$defs"][prop["$ref"].split("/")[-1]] if "$ref" in prop else prop
        title = prop.get("title") or section["title"]
        if "$ref" in prop:
            title = name.replace("_", " ").title()
        assert f"{title} (Optional)" in body, f"section {name} is not in the form"
        description = prop.get("description") or section.get("description")
        if description:
            assert _flat(description) in body, f"{name}'s description is not shown"
    # Defaults: the deployment's parameters, expanded to every field.
    data = _field(page, "Data (Optional)")
    assert _field(data, "Image Size (Optional)").locator("input").input_value() == "32"
    assert _field(data, "Source (Optional)").locator("textarea, input").first.input_value() == "digits"
    alias = _field(_field(page, "Registry (Optional)"), "Alias (Optional)")
    assert alias.locator("textarea, input").first.input_value() == "champion"
    # A Literal is a choice among its values, the default selected.
    recipe = _field(data, "Recipe (Optional)")
    assert "auto" in recipe.inner_text()
    recipe.locator("button.p-select-button__control").focus()
    page.keyboard.press("Space")  # opens the list (a headless click leaves it closed)
    options = page.get_by_role("option")
    options.first.wait_for(timeout=10_000)
    assert {_flat(o) for o in options.all_inner_texts()} >= {"auto", "small", "photo"}
    page.keyboard.press("Escape")


@pytest.mark.parametrize(("section", "label", "value", "message"), [
    ("Googlenet (Optional)", "Batch Size (Optional)", "-4",
     "Validation failed for field 'config.googlenet.batch_size'. Failure reason: -4 is less "
     "than or equal to the minimum of 0"),
    ("Registry (Optional)", "Alias (Optional)", "latest",
     "Validation failed for field 'config.registry.alias'. Failure reason: 'latest' should "
     "not be valid"),
])
def test_a_bad_value_is_refused_by_the_form_before_any_run_starts(
        prefect_ui: dict[str, Any], page: Any, tmp_path: Path, section: str, label: str,
        value: str, message: str) -> None:
    before = len(_runs_of_the_deployment(prefect_ui))
    _open_form(page, prefect_ui)
    _field(_field(page, section), label).locator("textarea, input").first.fill(value)
    page.get_by_role("button", name="Submit").click()
    toast = page.get_by_text("Error creating flow run").first
    toast.wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "prefect-refused.png"))
    assert message in _flat(toast.inner_text())
    assert "/run" in page.url, "the form stays open with what was typed"
    assert len(_runs_of_the_deployment(prefect_ui)) == before, "a run was created"


def test_a_custom_run_from_the_form_completes_and_its_page_shows_the_artifacts(
        prefect_ui: dict[str, Any], page: Any, tmp_path: Path) -> None:
    ui = prefect_ui
    _open_form(page, ui)
    max_per_class = _field(_field(page, "Data (Optional)"), "Max Per Class (Optional)")
    max_per_class.get_by_role("button", name="int").click()  # int | None: None until chosen
    max_per_class.locator("input").fill("12")
    _field(_field(page, "Googlenet (Optional)"), "Epochs (Optional)").locator("input").fill("1")
    _field(_field(page, "Registry (Optional)"), "Min Score (Optional)").get_by_role(
        "button", name="float").click()
    _field(_field(page, "Registry (Optional)"), "Min Score (Optional)").locator("input").fill("0")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(r".*/deployments/deployment/.*\?tab=Runs"), timeout=30_000)
    (run,) = _runs_of_the_deployment(ui)
    # What the form sent is the deployment's configuration with the two changes.
    (spec,) = [s for s in load_specs() if s["name"] == DEPLOYMENT
               and s["entrypoint"].endswith("train_image_classifiers")]
    expected = PipelineConfig.model_validate(spec["parameters"]["config"]).model_copy(deep=True)
    expected.data.max_per_class = 12
    expected.googlenet.epochs = 1
    expected.registry.min_score = 0.0
    assert PipelineConfig.model_validate(run["parameters"]["config"]) == expected
    deadline = time.monotonic() + 600
    while run["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() < deadline, ui["serve_log"].read_text()[-3000:]
        time.sleep(3)
        run = _api(ui["api"], f"/flow_runs/{run['id']}")
    assert run["state_type"] == "COMPLETED", ui["serve_log"].read_text()[-3000:]

    page.goto(f"{ui['url']}/runs/flow-run/{run['id']}")
    page.get_by_text("Completed").first.wait_for(timeout=60_000)
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("champion-decision").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)  # the graph above draws its last artifacts
    page.screenshot(path=str(tmp_path / "prefect-flow-run.png"))
    body = _flat(page.inner_text("body"))
    keys = ("candidate-metrics", "candidate-comparison", "champion-decision", "dataset-report",
            "finetune-resnet50-progress", "scratch-googlenet-progress")
    assert all(key in body for key in keys), body[-2000:]
    artifacts = {a["key"]: a for a in _api(ui["api"], "/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    for key in ("finetune-resnet50-progress", "scratch-googlenet-progress"):
        page.goto(f"{ui['url']}/artifacts/artifact/{artifacts[key]['id']}")
        page.get_by_text("Progress: 100%").first.wait_for(timeout=30_000)
    page.goto(f"{ui['url']}/artifacts/artifact/{artifacts['champion-decision']['id']}")
    page.get_by_text("champion moved to version").first.wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "prefect-champion-decision.png"))
    page.goto(f"{ui['url']}/artifacts/artifact/{artifacts['candidate-metrics']['id']}")
    page.get_by_text("finetune-resnet50").first.wait_for(timeout=30_000)
    table = _flat(page.inner_text("body"))
    assert "scratch-googlenet" in table and "top1" in table and "test_images" in table

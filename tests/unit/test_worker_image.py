"""The GPU worker image: what can be checked without building it (no daemon, no registry here).

Its build context holds what the Dockerfile copies, it agrees with the Kubernetes job templates
on the state path and the image name, and its entrypoint runs the given command or says why not.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
ENTRYPOINT = REPO / "deployments" / "docker" / "entrypoint.sh"
TEMPLATES = sorted((REPO / "deployments" / "pools").glob("kubernetes-*-job-template.json"))


def _instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(f"{name} ")]


def _env() -> dict[str, str]:
    """The image's ENV (one instruction, continued lines)."""
    text = DOCKERFILE[DOCKERFILE.index("\nENV ") + 5:].split("\n\n", 1)[0]
    return dict(re.findall(r"([A-Z_]+)=(\S+)", text))


def test_every_copied_path_is_in_the_build_context() -> None:
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [part for copy in _instructions("COPY") for part in copy.split()[:-1]]
    assert {"src", "flows", "tasks", "deployments", "prefect.yaml", "pyproject.toml"} <= set(copies)
    for path in copies:
        assert (REPO / path).exists(), path
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), (path, ignored)


def test_the_image_and_the_job_templates_agree_on_paths_variables_and_name() -> None:
    env = _env()
    assert env["VISIONPIPE_HOME"] == "/state" and env["PYTHONPATH"] == env["VISIONPIPE_CHECKOUT"]
    assert _instructions("WORKDIR") == [env["VISIONPIPE_CHECKOUT"]]
    assert _instructions("USER") == ["visionpipe"], "the worker runs as a non-root user"
    tag = re.search(r"docker build -t (\S+) \.", DOCKERFILE).group(1)  # type: ignore[union-attr]
    assert tag in (REPO / "docs" / "deploy.md").read_text()
    for path in TEMPLATES:
        template = json.loads(path.read_text())
        assert template["variables"]["properties"]["image"]["default"] == tag, path.name
        pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        names = {e["name"]: e for e in container["env"]}
        assert names["VISIONPIPE_HOME"]["value"] == env["VISIONPIPE_HOME"]
        assert {"name": "state", "mountPath": env["VISIONPIPE_HOME"]} in container["volumeMounts"]
        assert container["args"] == "{{ command }}", "Prefect's command reaches the entrypoint"
        assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID"} <= names.keys()


def test_the_image_installs_the_pinned_torch_and_the_kubernetes_extra() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("prefect-kubernetes") for dep in extras["kubernetes"])
    runs = " ".join(_instructions("RUN"))
    assert "pip install '.[kubernetes]'" in runs
    pins = re.search(r"pip install -q (torch==\S+ torchvision==\S+)", (REPO / "Makefile").read_text())
    assert pins is not None and f"pip install {pins.group(1)}" in runs, "the Makefile's pins"
    assert json.loads(_instructions("ENTRYPOINT")[0]) == [f"{_env()['VISIONPIPE_CHECKOUT']}/"
                                                         "deployments/docker/entrypoint.sh"]


def _entrypoint(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VISIONPIPE_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_the_entrypoint_runs_the_command_with_the_flows_importable(tmp_path: Path) -> None:
    probe = "import flows.train_image_classifiers, flows.ddp_node, flows.score_images; print('ok')"
    out = _entrypoint([sys.executable, "-c", probe], tmp_path / "state", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert (tmp_path / "state" / "prefect").is_dir()


def test_the_entrypoint_refuses_a_state_path_that_is_a_file_or_no_command(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    out = _entrypoint(["true"], tmp_path / "file", cwd=tmp_path)
    assert out.returncode == 78 and "VISIONPIPE_HOME" in out.stderr and "Fix:" in out.stderr
    out = _entrypoint([], tmp_path / "state", cwd=tmp_path)
    assert out.returncode == 64 and "no command given" in out.stderr

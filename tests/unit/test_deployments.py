"""The deployments carry the schedule and the parameters their users expect; the Kubernetes pool
templates and the DDP headless service agree with each other and with the node launch."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import yaml

from deployments.serve import deployments
from visionpipe.config import PipelineConfig, StyleConfig
from visionpipe.training.multinode import render_job_variables, rendezvous_id


def test_nightly_is_scheduled_in_a_timezone_and_on_demand_runs_offline() -> None:
    by_name = {(d.flow_name, d.name): d for d in deployments()}
    nightly = by_name[("train-image-classifiers", "nightly")]
    schedule = nightly.schedules[0].schedule
    assert schedule.cron == "0 2 * * *" and schedule.timezone == "Europe/Berlin"
    config = PipelineConfig.model_validate(nightly.parameters["config"])
    assert config.data.source.startswith("s3://") and config.weights.on_unavailable == "fail"
    on_demand = by_name[("train-image-classifiers", "on-demand")]
    assert not on_demand.schedules
    assert PipelineConfig.model_validate(on_demand.parameters["config"]).weights.on_unavailable == "random-init"
    # The UI form comes from the pydantic model: enums and bounds are in the schema.
    schema = on_demand._parameter_openapi_schema.model_dump()
    assert "FinetuneConfig" in str(schema["definitions"]) and "resnet50" in str(schema)
    assert ("score-images", "on-demand") in by_name


def test_every_deployment_of_prefect_yaml_validates_and_names_its_work_pool() -> None:
    from deployments.serve import PREFECT_YAML

    raw = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    assert len(raw) == len(deployments()) == 6
    for spec in raw:
        assert spec["work_pool"]["name"], spec["name"]
        if spec["entrypoint"].endswith(":train_image_classifiers"):
            PipelineConfig.model_validate(spec["parameters"]["config"])
        if spec["entrypoint"].endswith(":train_style_transfer"):
            StyleConfig.model_validate(spec["parameters"]["config"])


def test_the_style_flows_have_their_own_deployments_the_schedule_off_by_default() -> None:
    by_name = {(d.flow_name, d.name): d for d in deployments()}
    weekly = by_name[("train-style-transfer", "weekly")]
    (schedule,) = weekly.schedules
    assert schedule.active is False and schedule.schedule.cron == "0 3 * * 0"
    config = StyleConfig.model_validate(weekly.parameters["config"])
    assert config.style_image == "bundled:waves" and config.model_name == "waves-stylizer"
    assert config.weights.uri == "torchvision:vgg16.IMAGENET1K_V1"
    assert ("stylize-image", "on-demand") in by_name


def test_an_operator_changes_the_nightly_in_yaml_and_a_bad_value_names_the_deployment(
        tmp_path: Path) -> None:
    from deployments.serve import PREFECT_YAML, DeploymentFileError

    spec = yaml.safe_load(PREFECT_YAML.read_text())
    nightly = spec["deployments"][0]
    nightly["schedules"] = [{"cron": "30 1 * * 1-5", "timezone": "America/New_York"}]
    nightly["parameters"]["config"]["data"]["source"] = "/mnt/photos"
    nightly["work_pool"] = {"name": "gpu-a100", "job_variables": {"env": {"X": "1"}}}
    edited = tmp_path / "prefect.yaml"
    edited.write_text(yaml.safe_dump(spec))
    deployment = deployments(path=edited, only=["train-image-classifiers"])[0]
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("30 1 * * 1-5", "America/New_York")
    config = PipelineConfig.model_validate(deployment.parameters["config"])
    assert config.data.source == "/mnt/photos" and config.googlenet.epochs == 5  # defaults filled
    assert deployment.work_pool_name == "gpu-a100" and deployment.job_variables == {"env": {"X": "1"}}
    nightly["parameters"]["config"]["googlenet"] = {"epochz": 3}
    edited.write_text(yaml.safe_dump(spec))
    with pytest.raises(DeploymentFileError, match=r"(?s)deployment .nightly.: parameters.config is "
                                                  r"not a valid PipelineConfig.*epochz"):
        deployments(path=edited)


# --- Kubernetes pools for multi-node DDP (no server: the files are parsed as they are) ------------

POOLS = Path(__file__).resolve().parents[2] / "deployments" / "pools"
BASE_TEMPLATE = POOLS / "kubernetes-base-job-template.json"
DDP_TEMPLATE = POOLS / "kubernetes-ddp-node-job-template.json"
DDP_SERVICE = POOLS.parent / "kubernetes" / "ddp-headless-service.yaml"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


def _pod_spec(template: dict) -> dict:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]


def test_the_node_deployment_can_be_served_alone_with_its_own_limit() -> None:
    from deployments.serve import ENTRYPOINTS

    assert [(d.flow_name, d.name) for d in deployments(only=["ddp-node"])] == [("ddp-node", "ddp-node")]
    rest = deployments(only=["train-image-classifiers", "score-images"])
    assert {d.flow_name for d in rest} == {"train-image-classifiers", "score-images"}
    assert {d.flow_name for d in deployments()} == set(ENTRYPOINTS)


@pytest.mark.parametrize("path", [BASE_TEMPLATE, DDP_TEMPLATE], ids=lambda p: p.name)
def test_every_placeholder_of_a_pool_template_is_a_declared_variable(path: Path) -> None:
    template = json.loads(path.read_text())
    used = set(PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used and used <= declared, f"undeclared: {sorted(used - declared)}"


def test_the_ddp_node_template_keeps_prefects_fields_and_adds_a_stable_pod_name() -> None:
    base = json.loads(BASE_TEMPLATE.read_text())
    ddp = json.loads(DDP_TEMPLATE.read_text())
    config = ddp["job_configuration"]
    for key in ("command", "env", "labels", "name", "namespace", "cluster_config",
                "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"):
        assert config[key] == base["job_configuration"][key] == f"{{{{ {key} }}}}"
    job = config["job_manifest"]
    assert job["metadata"] == base["job_configuration"]["job_manifest"]["metadata"]
    assert job["spec"]["backoffLimit"] == 0  # the parent retries the whole world, never one pod
    assert job["spec"]["template"]["metadata"]["labels"]["visionpipe.io/ddp-node"] == "true"
    pod = _pod_spec(ddp)
    assert pod["hostname"] == "{{ rdzv_hostname }}" and pod["subdomain"] == "visionpipe-ddp"
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["args"] == "{{ command }}"
    assert container["env"] == _pod_spec(base)["containers"][0]["env"]  # same secrets and state
    assert {"name": "rdzv", "containerPort": 29400, "protocol": "TCP"} in container["ports"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}
    variables = ddp["variables"]["properties"]
    assert variables["rdzv_hostname"]["type"] == "string" and variables["shm_size"]["default"]
    assert variables["rdzv_hostname"]["pattern"] == DNS_LABEL.pattern


def test_prefect_renders_the_hostname_only_when_the_node_run_sets_it() -> None:
    from prefect.utilities.templating import apply_values

    ddp = json.loads(DDP_TEMPLATE.read_text())
    # As the worker does: defaults that are not None, then the run's job variables.
    defaults = {k: v["default"] for k, v in ddp["variables"]["properties"].items()
                if v.get("default") is not None}
    unset = apply_values(ddp["job_configuration"], defaults)
    assert "hostname" not in _pod_spec({"job_configuration": unset})
    node = apply_values(ddp["job_configuration"], {**defaults, "rdzv_hostname": "vp-abc123-a1-1"})
    pod = _pod_spec({"job_configuration": node})
    assert pod["hostname"] == "vp-abc123-a1-1" and pod["subdomain"] == "visionpipe-ddp"
    assert pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1


def test_the_headless_service_selects_the_node_pods_and_publishes_them_before_ready() -> None:
    service = yaml.safe_load(DDP_SERVICE.read_text())
    ddp = json.loads(DDP_TEMPLATE.read_text())
    assert service["kind"] == "Service" and service["apiVersion"] == "v1"
    assert service["metadata"]["name"] == _pod_spec(ddp)["subdomain"] == "visionpipe-ddp"
    namespace = ddp["variables"]["properties"]["namespace"]["default"]
    assert service["metadata"]["namespace"] == namespace
    spec = service["spec"]
    assert spec["clusterIP"] == "None"  # YAML `None` is the string, not null: headless
    assert spec["publishNotReadyAddresses"] is True
    pod_labels = ddp["job_configuration"]["job_manifest"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"] and spec["selector"].items() <= pod_labels.items()
    (port,) = spec["ports"]
    assert port["port"] == 29400 and port["name"] == "rdzv"


def test_node_job_variables_render_to_a_dns_label_per_node() -> None:
    template = {"rdzv_hostname": "vp-{rdzv_id}-{node_index}"}
    assert render_job_variables(template, "abc123-a1", 1) == {"rdzv_hostname": "vp-abc123-a1-1"}
    rdzv = rendezvous_id(str(uuid.uuid4()), 3)
    for node_index in (0, 1, 15):
        hostname = render_job_variables(template, rdzv, node_index)["rdzv_hostname"]
        assert isinstance(hostname, str) and DNS_LABEL.match(hostname) and len(hostname) <= 63
        assert hostname == f"vp-{rdzv}-{node_index}"


def test_pools_creates_the_ddp_pool_with_its_template(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.pools import __main__ as pools

    created: list[object] = []

    class FakeClient:
        async def __aenter__(self) -> FakeClient:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def create_work_pool(self, pool: object) -> None:
            created.append(pool)

        async def create_global_concurrency_limit(self, limit: object) -> None:
            return None

    monkeypatch.setattr(pools, "get_client", FakeClient)
    assert pools.main(["--gpus", "2", "--ddp-kubernetes"]) == 0
    by_name = {pool.name: pool for pool in created}
    assert set(by_name) == {"gpu-host", "gpu-kubernetes-ddp"}
    ddp = by_name["gpu-kubernetes-ddp"]
    assert ddp.type == "kubernetes"
    assert ddp.base_job_template == json.loads(DDP_TEMPLATE.read_text())

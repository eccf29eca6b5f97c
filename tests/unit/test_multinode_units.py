"""Multi-node pieces without an orchestrator: ids, pre-flight checks, shared checkpoint storage."""

from __future__ import annotations

import re
import socket
import time
import uuid
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError

from visionpipe.config import GoogLeNetConfig, LaunchConfig
from visionpipe.training.launch import torchrun_command
from visionpipe.training.multinode import (
    PreflightError,
    RendezvousUnreachable,
    check_can_host,
    check_gpus,
    rendezvous_id,
    resolve_endpoint,
    wait_for_endpoint,
    wait_for_token,
)
from visionpipe.training.shared import SharedStore


def _cfg(**launch: object) -> GoogLeNetConfig:
    return GoogLeNetConfig.model_validate({"launch": launch})


def test_launch_config_accepts_ranges_and_needs_a_fixed_port_for_several_nodes() -> None:
    assert LaunchConfig(nnodes="2:4", rdzv_endpoint="10.0.0.5:29400").node_range == (2, 4)
    assert not LaunchConfig().multinode and LaunchConfig(nnodes="1:2", rdzv_endpoint="h:1").multinode
    with pytest.raises(ValidationError, match="fixed host:port"):
        LaunchConfig(nnodes="2")  # the default endpoint picks a random port: one node only
    with pytest.raises(ValidationError, match="min above max"):
        LaunchConfig(nnodes="3:2", rdzv_endpoint="h:29400")


def test_rendezvous_ids_differ_per_attempt_and_fit_in_a_dns_label() -> None:
    run = str(uuid.uuid4())
    first, second = rendezvous_id(run, 1), rendezvous_id(run, 2)
    assert first != second and first.startswith(run.replace("-", "")[:12])
    assert all(re.fullmatch(r"[a-z0-9][-a-z0-9]*[a-z0-9]", i) for i in (first, second))
    assert resolve_endpoint("vp-{rdzv_id}-0.svc:29400", first) == f"vp-{first}-0.svc:29400"
    # A configured base leads, and each run still gets its own id: tonight's node runs are not
    # last night's (their idempotency keys are built from it).
    tonight, last_night = (rendezvous_id(str(uuid.uuid4()), 1, base="Nightly_GoogLeNet")
                           for _ in range(2))
    assert tonight != last_night and tonight.startswith("nightlygoogl-") and tonight.endswith("-a1")
    assert all(re.fullmatch(r"[a-z0-9][-a-z0-9]*[a-z0-9]", i) for i in (tonight, last_night))


def test_torchrun_command_names_the_host_of_the_store() -> None:
    launch = LaunchConfig(nnodes="1:2", rdzv_endpoint="10.0.0.5:29400", rdzv_timeout_s=90)
    cmd = torchrun_command(launch, Path("job.json"), 4, "abc-a1", endpoint="10.0.0.5:29400",
                           is_host=False)
    assert "--nnodes=1:2" in cmd and "--rdzv-id=abc-a1" in cmd and "--rdzv-backend=c10d" in cmd
    configured = torchrun_command(launch.model_copy(update={"rdzv_id": "base"}), Path("job.json"),
                                  4, "base-1234abcd-a2")
    assert "--rdzv-id=base-1234abcd-a2" in configured, "the computed id, never the bare base"
    assert "--rdzv-conf=join_timeout=90,is_host=false" in cmd


def test_gpu_check_names_the_shortage_and_the_fix() -> None:
    with pytest.raises(PreflightError) as err:
        check_gpus(_cfg(backend="nccl", nproc_per_node=4), node_index=1, gpus=2)
    message = str(err.value)
    assert "4 NCCL process(es) but this host has 2 visible GPU(s)" in message
    assert "nproc_per_node to at most 2" in message and "'gloo'" in message
    with pytest.raises(PreflightError, match="0 visible GPU"):
        check_gpus(_cfg(backend="nccl"), node_index=0, gpus=0)  # one per GPU: none here
    assert check_gpus(_cfg(backend="nccl", nproc_per_node=2), node_index=0, gpus=2) == 2
    assert check_gpus(_cfg(backend="gloo", nproc_per_node=3), node_index=0, gpus=0) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_node_0_must_be_able_to_host_the_store() -> None:
    check_can_host(f"127.0.0.1:{_free_port()}", 0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RendezvousUnreachable, match=f"port {port} .* already in use"):
            check_can_host(f"127.0.0.1:{port}", 0)
    with pytest.raises(PreflightError, match="names another host"):
        check_can_host("192.0.2.1:29400", 0)  # TEST-NET-1: never an address of this host
    with pytest.raises(RendezvousUnreachable, match="does not resolve"):
        check_can_host("no-such-host.invalid:29400", 0)


def test_waiting_for_the_endpoint_ends_with_a_clear_error_or_a_connection() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert wait_for_endpoint(f"127.0.0.1:{server.getsockname()[1]}", 5, 1) < 5
    closed = _free_port()
    started = time.monotonic()
    with pytest.raises(RendezvousUnreachable) as err:
        wait_for_endpoint(f"127.0.0.1:{closed}", 2, 1, poll_s=0.2)
    assert time.monotonic() - started < 10
    assert f"node 1: the rendezvous endpoint 127.0.0.1:{closed} did not answer within 2 s" in str(err.value)
    assert "rdzv_timeout_s" in str(err.value)


def test_a_folder_that_is_not_shared_is_named(tmp_path: Path) -> None:
    node0, node1 = SharedStore(str(tmp_path / "host-a")), SharedStore(str(tmp_path / "host-b"))
    node0.write_token("r-a1.node0", "host-a")
    assert wait_for_token(node0, "r-a1.node0", 1, 1) == "host-a"
    with pytest.raises(PreflightError, match="not shared between the hosts"):
        wait_for_token(node1, "r-a1.node0", 1, 1)


def test_a_volume_is_used_in_place(tmp_path: Path) -> None:
    store = SharedStore(str(tmp_path / "shared"))
    assert store.working_dir(tmp_path / "local") == tmp_path / "shared"
    assert store.pull(tmp_path / "local") == []  # nothing to copy


def test_s3_checkpoints_go_up_and_come_back_down(s3_env: str, tmp_path: Path) -> None:
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="ckpt")
    store = SharedStore("s3://ckpt/runs/flow-1/scratch-googlenet")
    writer = store.working_dir(tmp_path / "a")
    for name, text in (("last.pt", "weights"), ("last.pt.sha256", "{}"), ("notes.txt", "x")):
        (writer / name).write_text(text)
    store.push(writer)
    store.write_token("r-a1.node0", "host-a")
    reader = tmp_path / "b"
    assert sorted(store.pull(reader)) == ["last.pt", "last.pt.sha256"]  # checkpoint files only
    assert (reader / "last.pt").read_text() == "weights"
    assert store.read_token("r-a1.node0") == "host-a" and store.read_token("other") is None


@pytest.mark.parametrize(("state", "transient"), [
    ({"type": "FAILED", "name": "FailedDeterministic"}, False),  # PreflightError, a rank's bug
    ({"type": "FAILED", "name": "FailedTransient"}, True),  # a killed rank, no rendezvous
    ({"type": "FAILED", "name": "Failed"}, False),  # its parameters were refused: never ran
    ({"type": "CRASHED", "name": "Crashed"}, True),  # its infrastructure went away
    ({"type": "CANCELLED", "name": "Cancelled"}, True),
])
def test_a_failed_node_run_is_retried_only_when_a_retry_can_help(
    state: dict[str, str], transient: bool
) -> None:
    from prefect.client.schemas.objects import FlowRun, State

    from tasks.node_runs import node_runs_failure

    message = "Flow run encountered an exception: SomeError: node 1 went wrong"
    run = FlowRun(flow_id=uuid.uuid4(), name="scratch-googlenet-x-a1-node1",
                  state=State(type=state["type"], name=state["name"], message=message))
    error = node_runs_failure([run])
    assert error.transient is transient
    assert "node1" in str(error) and message in str(error)


def test_one_deterministic_node_makes_the_whole_failure_deterministic() -> None:
    from prefect.client.schemas.objects import FlowRun, State

    from tasks.node_runs import node_runs_failure

    runs = [FlowRun(flow_id=uuid.uuid4(), name=f"stage-x-node{i}",
                    state=State(type="FAILED", name=name, message=f"node {i}"))
            for i, name in enumerate(["FailedTransient", "FailedDeterministic"])]
    error = node_runs_failure(runs)
    assert not error.transient and "node1" in str(error)


@pytest.mark.parametrize(("exc", "name"), [
    (ValueError("bad input"), "FailedDeterministic"),
    (ConnectionError("refused"), "FailedTransient"),
])
def test_a_node_run_names_its_failure_by_the_one_rule(exc: Exception, name: str) -> None:
    from prefect.logging import disable_run_logger

    from tasks.multinode import node_failed

    with disable_run_logger():
        state = node_failed(exc)
    assert state.type.value == "FAILED" and state.name == name
    assert f"{type(exc).__name__}: {exc}" in (state.message or "")


def _tail(lines: list[str]) -> object:
    from visionpipe.training.launch import _Tail

    tail = _Tail()
    for line in lines:
        tail.add(line)
    return tail


def test_a_rank_killed_by_a_signal_is_named_even_when_torchrun_observed_another_first() -> None:
    from visionpipe.training.launch import RankFailure, _failure

    killed = _tail([
        "[default0]:RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:4242",
        "[default1]:epoch 1 done",
        "Failures:", "[1]:", "  time      : 2026-11-28_03:00:01", "  host      : h",
        "  rank      : 1 (local_rank: 1)", "  exitcode  : -9 (pid: 12)",
        "  error_file: <N/A>", "  traceback : Signal 9 (SIGKILL) received by PID 12",
        "Root Cause (first observed failure):", "[0]:", "  time      : 2026-11-28_03:00:00",
        "  host      : h", "  rank      : 0 (local_rank: 0)", "  exitcode  : 1 (pid: 11)",
        "  traceback : RuntimeError: [gloo] Connection closed by peer"])
    died_of_it = [RankFailure(0, "DistBackendError", True, "Connection closed by peer", 10)]
    error = _failure(1, killed, died_of_it)  # type: ignore[arg-type]
    assert error.rank == 1 and error.rank_exit_code == -9 and error.transient
    assert "rank 1 ended with" in str(error) and error.exception is None


def test_a_launch_is_classified_by_what_its_ranks_recorded() -> None:
    from visionpipe.training.launch import RankFailure, _failure

    raised = _tail(["[default0]:Traceback (most recent call last):", "[default1]:ValueError: bad",
                    "Root Cause (first observed failure):", "[0]:",
                    "  rank      : 0 (local_rank: 0)", "  exitcode  : 1 (pid: 11)"])
    records = [RankFailure(0, "DistBackendError", True, "DistBackendError: closed", 10),
               RankFailure(1, "ValueError", False, "ValueError: bad", 10)]
    error = _failure(1, raised, records)  # type: ignore[arg-type]
    assert error.exception == "ValueError" and not error.transient
    assert "ValueError: bad" in str(error), "the lines of the rank that raised it"
    error = _failure(1, raised, records[:1])  # type: ignore[arg-type]
    assert error.exception == "DistBackendError" and error.transient
    error = _failure(1, raised, [])  # type: ignore[arg-type]
    assert error.exception is None and error.transient, "no rank raised: the machine's failure"

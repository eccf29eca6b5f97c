"""One node of a multi-node DDP launch: pre-flight checks, then torchrun with a c10d rendezvous.

The orchestrator (a Prefect flow run per node) builds a ``NodeJob`` and calls ``run_node``.
torch's elastic launcher does the rest: rendezvous, ranks, the world; node 0 hosts the c10d
store at the rendezvous endpoint. Checkpoints live in a folder every node reaches
(``SharedStore``), so a retry on other hosts resumes where the last attempt stopped.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

from visionpipe import faults, settings
from visionpipe.config import GoogLeNetConfig
from visionpipe.data import PreparedDataset
from visionpipe.training import launch
from visionpipe.training.result import TrainResult
from visionpipe.training.shared import SharedStore
from visionpipe.errors import NodeRunFailed, PreflightError, RendezvousUnreachable
from visionpipe.training.jobs import write_worker_job

log = logging.getLogger(__name__)


class NodeJob(BaseModel):
    """What one node run receives: the stage config and where the nodes meet."""

    config: GoogLeNetConfig
    dataset: PreparedDataset
    node_index: int  # 0 hosts the rendezvous store; the ranks are assigned by torch
    node_count: int  # node runs started (the top of the elastic range)
    rdzv_id: str
    rdzv_endpoint: str  # resolved: host:port
    shared_dir: str  # the stage's checkpoint folder, a path or an s3:// prefix
    mlflow_run_id: str | None = None


class NodeOutcome(BaseModel):
    """What a node run returns; ``result`` is set on the node that held global rank 0."""

    node_index: int
    hostname: str
    nproc: int
    result: TrainResult | None = None


def rendezvous_id(run_id: str, attempt: int, base: str | None = None) -> str:
    """Unique to the parent's task run and its attempt, and a valid DNS label part.

    A new attempt gets a new id, so a straggler of the failed attempt never joins its world. A
    configured ``base`` leads the id, and the run still follows it: tonight's run must not meet
    (or, through the node runs' idempotency keys, reuse) last night's.
    """
    def clean(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    if base and clean(base):
        return f"{clean(base)[:12]}-{clean(run_id)[:8]}-a{attempt}"
    return f"{clean(run_id)[:12]}-a{attempt}"


def resolve_endpoint(template: str, rdzv_id: str) -> str:
    return template.replace("{rdzv_id}", rdzv_id)


def render_job_variables(template: dict[str, object], rdzv_id: str, node_index: int) -> dict[str, object]:
    """``node_job_variables`` with ``{rdzv_id}`` and ``{node_index}`` filled in string values."""
    def render(value: object) -> object:
        if isinstance(value, str):
            return value.replace("{rdzv_id}", rdzv_id).replace("{node_index}", str(node_index))
        if isinstance(value, dict):
            return {k: render(v) for k, v in value.items()}
        if isinstance(value, list):
            return [render(v) for v in value]
        return value
    return {k: render(v) for k, v in template.items()}


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def wants_nccl(cfg: GoogLeNetConfig) -> bool:
    backend = cfg.launch.backend
    return backend == "nccl" or (backend == "auto" and torch.cuda.is_available())


def check_gpus(cfg: GoogLeNetConfig, node_index: int, gpus: int | None = None) -> int:
    """Fail when NCCL is asked for more processes than this host has GPUs; return nproc."""
    nproc = launch.default_nproc(cfg.launch)
    if not wants_nccl(cfg):
        return nproc
    visible = torch.cuda.device_count() if gpus is None else gpus
    if nproc > visible or visible == 0:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={devices})" if devices is not None else ""
        raise PreflightError(
            f"node {node_index} on {socket.gethostname()}: googlenet.launch asks for "
            f"{nproc} NCCL process(es) but this host has {visible} visible GPU(s){shown}. "
            f"Fix: set googlenet.launch.nproc_per_node to at most {visible} (or leave it empty "
            "for one per GPU), run this node on a host with enough GPUs, or set "
            "googlenet.launch.backend to 'gloo' to train on the CPU.")
    return nproc


def check_can_host(endpoint: str, node_index: int) -> None:
    """Node 0 hosts the c10d store: the endpoint must name this host and a free port."""
    host, port = split_endpoint(endpoint)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RendezvousUnreachable(
            f"node {node_index}: rendezvous host {host!r} does not resolve here ({exc}). Fix: "
            "name node 0's host in googlenet.launch.rdzv_endpoint (for Kubernetes, the pod's "
            "name under the headless service)") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PreflightError(
                    f"node 0 runs on {socket.gethostname()} but the rendezvous endpoint "
                    f"{endpoint} names another host: node 0 hosts the rendezvous store, so the "
                    "endpoint must name node 0's host. Fix googlenet.launch.rdzv_endpoint or "
                    "the node's placement") from exc
            if exc.errno == errno.EADDRINUSE:
                raise RendezvousUnreachable(
                    f"node 0: port {port} of the rendezvous endpoint {endpoint} is already in "
                    "use on this host (another run's rendezvous?). Fix: pick another port in "
                    "googlenet.launch.rdzv_endpoint") from exc
            raise


def wait_for_endpoint(endpoint: str, timeout_s: float, node_index: int,
                      poll_s: float = 1.0) -> float:
    """Wait until something accepts connections at ``endpoint``; return the seconds waited."""
    host, port = split_endpoint(endpoint)
    start = time.monotonic()
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return time.monotonic() - start
        except OSError as exc:
            last = exc
        if time.monotonic() - start + poll_s > timeout_s:
            raise RendezvousUnreachable(
                f"node {node_index}: the rendezvous endpoint {endpoint} did not answer within "
                f"{timeout_s:.0f} s ({last}). Node 0 hosts it: check that node 0's run started "
                f"and is not failing, that {host} resolves and port {port} is open from this "
                "host, or raise googlenet.launch.rdzv_timeout_s when nodes start slowly")
        time.sleep(poll_s)


def wait_for_token(store: SharedStore, name: str, timeout_s: float, node_index: int) -> str:
    """Node 0's token in the shared folder: proof that both nodes see the same storage."""
    deadline = time.monotonic() + timeout_s
    while True:
        token = store.read_token(name)
        if token is not None:
            return token
        if time.monotonic() > deadline:
            raise PreflightError(
                f"node {node_index}: node 0's marker {name} never appeared in the checkpoint "
                f"folder {store.uri}, although node 0 answers at the rendezvous: the folder is "
                "not shared between the hosts. Fix: set googlenet.launch.shared_dir to a "
                "mounted volume every node mounts at the same path, or to an s3:// prefix")
        time.sleep(1.0)


def preflight(job: NodeJob, store: SharedStore) -> int:
    """Everything that can be checked before torchrun; return the processes to start."""
    nproc = check_gpus(job.config, job.node_index)
    if not job.dataset.is_available():
        raise PreflightError(
            f"node {job.node_index} on {socket.gethostname()}: dataset {job.dataset.name}@"
            f"{job.dataset.version} is not at {job.dataset.manifest_path}. Fix: put "
            "VISIONPIPE_HOME on storage every node mounts, or prepare the dataset on each host")
    token = f"{job.rdzv_id}.node0"
    timeout = job.config.launch.rdzv_timeout_s
    if job.node_index == 0:
        check_can_host(job.rdzv_endpoint, 0)
        store.write_token(token, socket.gethostname())
    else:
        waited = wait_for_endpoint(job.rdzv_endpoint, timeout, job.node_index)
        wait_for_token(store, token, max(5.0, timeout - waited), job.node_index)
    return nproc


def run_node(job: NodeJob, local_dir: Path, on_line: Callable[[int | None, str], None]) -> NodeOutcome:
    """Pre-flight, fetch the newest checkpoints, launch torchrun; report global rank 0's result.

    ``local_dir`` is this host's working folder for the stage (the S3 mirror, the job file).
    """
    faults.inject("bug", f"node{job.node_index}")  # test hook: a node that fails at once
    store = SharedStore(job.shared_dir)
    nproc = preflight(job, store)
    out_dir = store.working_dir(local_dir)
    pulled = store.pull(out_dir)
    if pulled:
        log.info("node %d: fetched %s from %s", job.node_index, ", ".join(pulled), store.uri)
    job_path = local_dir / f"node{job.node_index}-job.json"
    write_worker_job(job_path, job.config, job.dataset, out_dir, out_dir / result_name(job.rdzv_id),
                     job.mlflow_run_id, shared_dir=job.shared_dir if store.is_s3 else None,
                     node_index=job.node_index)
    cmd = launch.torchrun_command(job.config.launch, job_path, nproc, job.rdzv_id,
                                  endpoint=job.rdzv_endpoint, is_host=job.node_index == 0)
    log.info("node %d of %d: %s", job.node_index, job.node_count, " ".join(cmd))
    launch.run_torchrun(cmd, job.config.launch.timeout_s, on_line, env=launch.worker_env(nproc))
    outcome = NodeOutcome(node_index=job.node_index, hostname=socket.gethostname(), nproc=nproc)
    written = read_result(store, out_dir, job.rdzv_id)
    if written is not None and written.node_index == job.node_index:
        outcome.result = written
    # This host's working files: the job file, and on S3 the checkpoint copies (S3 holds them).
    shutil.rmtree(local_dir, ignore_errors=True)
    return outcome


def result_name(rdzv_id: str) -> str:
    """One result file per attempt: an earlier attempt's file is never taken for this one's."""
    return f"result-{rdzv_id}.json"


def read_result(store: SharedStore, out_dir: Path, rdzv_id: str) -> TrainResult | None:
    """Global rank 0's result file of attempt ``rdzv_id`` in the shared folder, if written.

    ``out_dir`` is where an S3 store's file is downloaded to; a volume is read in place.
    """
    name = result_name(rdzv_id)
    folder = store.working_dir(out_dir)
    store.pull(folder, [name])
    path = folder / name
    return TrainResult.model_validate_json(path.read_text()) if path.is_file() else None


def shared_stage_dir(cfg: GoogLeNetConfig, flow_run_id: str, stage: str) -> str:
    """The stage's checkpoint folder on the configured shared storage (or the state folder)."""
    root = cfg.launch.shared_dir or str(settings.cache_dir("runs"))
    return f"{root.rstrip('/')}/{flow_run_id}/{stage}"


def localize_checkpoints(result: TrainResult, store: SharedStore, local_dir: Path) -> TrainResult:
    """Point the result at checkpoints this process can open: downloaded from S3 into
    ``local_dir``, or on the shared volume, which this host must mount at the same path."""
    if store.is_s3:
        names = ["best.pt", "best.pt.sha256", "last.pt", "last.pt.sha256"]
        store.pull(local_dir, names)
        return result.model_copy(update={"best_checkpoint": str(local_dir / "best.pt"),
                                         "last_checkpoint": str(local_dir / "last.pt")})
    for path in (result.best_checkpoint, result.last_checkpoint):
        if not Path(path).is_file():
            raise NodeRunFailed(
                f"global rank 0 wrote {path}, which this host cannot see: the flow run that "
                "evaluates and registers must mount googlenet.launch.shared_dir at the same "
                "path as the nodes, or use an s3:// prefix", transient=False)
    return result

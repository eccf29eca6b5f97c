"""Start the DDP worker with torch's elastic launcher in its own processes and watch it."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from visionpipe.config import LaunchConfig
from visionpipe.errors import (
    LaunchError,
    LaunchStopped,
    LaunchTimeout,
    rank_failure_record,
)

P = ParamSpec("P")
R = TypeVar("R")

WORKER_MODULE = "visionpipe.training.worker"  # GoogLeNet
FINETUNE_WORKER_MODULE = "visionpipe.training.finetune_worker"
# torchrun's --tee prefixes each line of local rank N with "[default<N>]:" (the role name).
_PREFIX = re.compile(r"^\[(?:default|rank)(\d+)\]:(.*)$")
_FAILED_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")


_EXIT_CODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
# One failed rank of torchrun's summary: its global and local rank, and its exit code.
_FAILURE_BLOCK = re.compile(
    r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
# torchrun keeps each rank's error file here, below the folder of the job file it was given.
LOG_DIR_NAME = "torchrun-logs"
_LOG_DIR_FLAG = "--log-dir="


@dataclass(frozen=True)
class RankFailure:
    """What a rank that raised wrote into its torchrun error file."""

    local_rank: int
    name: str  # the exception's class name
    transient: bool  # ``errors.is_transient`` of it, asked in the rank
    message: str
    timestamp: int


def record_failures(fn: Callable[P, R]) -> Callable[P, R | None]:
    """torch's ``record`` with the rank's own ``is_transient`` answer in the error file."""
    return record(fn, error_handler=_RankErrorHandler())


class _RankErrorHandler(ErrorHandler):
    def record_exception(self, e: BaseException) -> None:
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if not path:  # not under torchrun: the traceback on stderr says it all
            return
        # torch's format (the launcher reads "message" and "timestamp"), plus our record.
        data = {"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": {
            "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time())),
            "visionpipe": rank_failure_record(e)}}}
        Path(path).write_text(json.dumps(data))


def read_rank_failures(log_dir: Path) -> list[RankFailure]:
    """The failures the ranks of the launch's last attempt recorded, oldest first."""
    attempts = sorted(log_dir.glob("*/attempt_*"), key=lambda p: int(p.name.split("_")[1]))
    failures = []
    for path in sorted(attempts[-1].glob("*/error.json")) if attempts else []:
        try:
            message = json.loads(path.read_text())["message"]
            ours = message["extraInfo"]["visionpipe"]
            failures.append(RankFailure(
                local_rank=int(path.parent.name), name=str(ours["name"]),
                transient=bool(ours["transient"]), message=str(message["message"]),
                timestamp=int(message["extraInfo"]["timestamp"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not written by our handler (a crash inside torch itself)
    return sorted(failures, key=lambda f: (f.timestamp, f.local_rank))


def default_nproc(launch: LaunchConfig) -> int:
    """Processes per node: as configured, else one per visible GPU, else (or with the gloo
    backend) 2 CPU processes."""
    if launch.nproc_per_node:
        return launch.nproc_per_node
    if launch.backend == "gloo":
        return 2
    return torch.cuda.device_count() or 2


def torchrun_command(launch: LaunchConfig, job_path: Path, nproc: int, rdzv_id: str,
                     endpoint: str | None = None, is_host: bool | None = None,
                     module: str = WORKER_MODULE) -> list[str]:
    """The ``python -m torch.distributed.run`` command line for a worker ``module``.

    ``endpoint`` is the resolved rendezvous endpoint of a multi-node launch; ``is_host`` says
    whether this node hosts the c10d store there (node 0 does), instead of torch guessing it
    from host names, which cannot tell two nodes on one machine apart.
    """
    conf = [f"join_timeout={int(launch.rdzv_timeout_s)}"]
    if is_host is not None:
        conf.append(f"is_host={str(is_host).lower()}")
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={launch.nnodes}", f"--nproc-per-node={nproc}",
        f"--rdzv-backend={launch.rdzv_backend}",
        f"--rdzv-endpoint={endpoint or launch.rdzv_endpoint}",
        f"--rdzv-id={rdzv_id}", f"--rdzv-conf={','.join(conf)}",
        f"--max-restarts={launch.max_restarts}",
        f"{_LOG_DIR_FLAG}{job_path.parent / LOG_DIR_NAME}",  # the ranks' error files
        "--tee=3",  # every line of every rank comes back through our pipe, prefixed by its rank
        "-m", module, str(job_path),
    ]


def worker_env(nproc: int) -> dict[str, str]:
    """The launcher's environment, with CPU threads split between the local ranks."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class _Tail:
    """The last lines of each rank, for the error message of a failed launch."""

    size: int = 20
    by_rank: dict[int, collections.deque[str]] = field(default_factory=dict)
    launcher: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=400))

    def add(self, line: str) -> int | None:
        match = _PREFIX.match(line)
        if not match:
            self.launcher.append(line)
            return None
        rank = int(match.group(1))
        self.by_rank.setdefault(rank, collections.deque(maxlen=self.size)).append(match.group(2))
        return rank


def run_torchrun(cmd: list[str], timeout_s: float, on_line: Callable[[int | None, str], None],
                 env: dict[str, str] | None = None, stop: threading.Event | None = None) -> None:
    """Run ``cmd``, stream its lines to ``on_line(rank, text)``; raise LaunchError on failure.

    Setting ``stop`` kills the launch (within half a second) and raises LaunchStopped.
    """
    tail = _Tail()
    log_dir = _log_dir_of(cmd)
    if log_dir is not None:  # error files of an earlier attempt must not speak for this one
        shutil.rmtree(log_dir, ignore_errors=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, bufsize=1)
    reader = threading.Thread(target=_pump, args=(proc, tail, on_line), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                code = proc.wait(timeout=max(0.0, min(left, 0.5) if stop is not None else left))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise LaunchTimeout(f"torchrun ran past its timeout of {timeout_s:.0f} s and was "
                                        "killed; raise googlenet.launch.timeout_s or shorten the "
                                        "run") from None
                if stop is not None and stop.is_set():
                    raise LaunchStopped("torchrun was stopped: another stage of the run failed "
                                        "(its error is the run's)") from None
    except BaseException:
        _kill_group(proc)  # timed out, stopped or interrupted: never leave ranks holding the GPUs
        raise
    finally:
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    if code != 0:
        raise _failure(code, tail, read_rank_failures(log_dir) if log_dir is not None else [])


def _log_dir_of(cmd: list[str]) -> Path | None:
    """The ``--log-dir`` that ``torchrun_command`` put into ``cmd``."""
    return next((Path(arg[len(_LOG_DIR_FLAG):]) for arg in cmd if arg.startswith(_LOG_DIR_FLAG)),
                None)


def _pump(proc: subprocess.Popen[str], tail: _Tail, on_line: Callable[[int | None, str], None]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        rank = tail.add(line)
        on_line(rank, _PREFIX.sub(r"\2", line) if rank is not None else line)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the launcher's whole process group, then SIGKILL what is left of it."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader; its ranks may outlive it
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _failure(code: int, tail: _Tail, failures: list[RankFailure]) -> LaunchError:
    """The launch's error: classified by what the ranks recorded, shown with a rank's last lines.

    Any rank that raised deterministically makes the failure deterministic (the others usually
    died of it: a closed connection); no record at all means no rank raised (killed, lost).
    """
    summary = "\n".join(tail.launcher)
    # torchrun's summary lists every failed rank, then the "Root Cause (first observed failure)".
    root = summary[summary.find("Root Cause"):] if "Root Cause" in summary else summary
    match = _FAILED_RANK.search(root)
    rank = int(match.group(1)) if match else next(iter(sorted(tail.by_rank)), None)
    local = int(match.group(2)) if match else rank
    exit_match = _EXIT_CODE.search(root)
    rank_exit = int(exit_match.group(1)) if exit_match else None
    # A SIGKILLed rank (the out-of-memory killer, a lost host) is the cause: the others died of
    # its broken connections, and torchrun may observe one of them first. (torchrun itself stops
    # the survivors with SIGTERM, so only SIGKILL marks the culprit.)
    killed = next((m for m in _FAILURE_BLOCK.finditer(summary)
                   if int(m.group(3)) == -signal.SIGKILL), None)
    if killed is not None:
        rank, local, rank_exit = int(killed.group(1)), int(killed.group(2)), int(killed.group(3))
        failures = []  # the others' records are what they died of
    cause = next((f for f in failures if not f.transient), failures[0] if failures else None)
    if cause is not None:
        local = cause.local_rank
    lines = list(tail.by_rank.get(local, [])) if local is not None else []
    text = "\n".join(lines) or (cause.message if cause else summary)
    return LaunchError(f"DDP worker failed (torchrun exit code {code}); rank {rank} ended with:\n{text}",
                       rank=rank, exit_code=code, rank_exit_code=rank_exit,
                       exception=cause.name if cause else None,
                       rank_transient=all(f.transient for f in failures) if failures else None)

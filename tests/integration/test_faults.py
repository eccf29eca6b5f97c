"""Real faults on real torchrun processes: preemption (SIGTERM) and a killed rank (SIGKILL)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from visionpipe.config import DataConfig, GoogLeNetConfig, LaunchConfig
from visionpipe.data import PreparedDataset, prepare_dataset
from visionpipe.training.checkpoint import latest_checkpoint, load_checkpoint
from visionpipe.training.launch import LaunchError, run_torchrun, torchrun_command, worker_env
from visionpipe.training.jobs import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, WorkerJob

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CFG = GoogLeNetConfig(epochs=3, batch_size=8, launch=LaunchConfig(nproc_per_node=2, timeout_s=300))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    mp = pytest.MonkeyPatch()
    mp.setenv("VISIONPIPE_HOME", str(tmp_path_factory.mktemp("home")))
    try:
        return prepare_dataset(DataConfig(max_per_class=20))
    finally:
        mp.undo()


def _job(dataset: PreparedDataset, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    job = WorkerJob(config=CFG, dataset=dataset, out_dir=str(out), result_path=str(out / "result.json"))
    path = out / "job.json"
    path.write_text(job.model_dump_json())
    return path


def _worker_pids(job_path: Path) -> dict[int, int]:
    """rank -> pid of the worker processes that run ``job_path``."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"visionpipe.training.worker" in cmdline and str(job_path).encode() in cmdline \
                and b"torch.distributed.run" not in cmdline:
            env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
            if b"RANK" in env:
                pids[int(env[b"RANK"])] = int(entry.name)
    return pids


def _launch(job_path: Path, on_epoch: tuple[str, int, signal.Signals] | None = None) -> None:
    """Run the job; optionally send ``signal`` to ``rank`` when rank 0 logs ``text``."""
    fired = threading.Event()

    def on_line(rank: int | None, line: str) -> None:
        if on_epoch and not fired.is_set() and on_epoch[0] in line:
            fired.set()
            os.kill(_worker_pids(job_path)[on_epoch[1]], on_epoch[2])

    run_torchrun(torchrun_command(CFG.launch, job_path, 2, job_path.parent.name), 300, on_line,
                 env=worker_env(2))


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "last.pt")["model"]


@pytest.fixture(scope="module")
def straight(dataset: PreparedDataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight")
    _launch(_job(dataset, out))
    return _final_weights(out)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        if key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def _interrupted(dataset: PreparedDataset, out: Path, sig: signal.Signals) -> tuple[Path, LaunchError]:
    """Launch the job and send ``sig`` to rank 1 once rank 0 has finished epoch 1."""
    job = _job(dataset, out)
    with pytest.raises(LaunchError) as err:
        _launch(job, on_epoch=("epoch 1/3", 1, sig))
    return job, err.value


def test_sigterm_on_one_rank_checkpoints_mid_epoch_and_the_retry_ends_with_the_same_weights(
    dataset: PreparedDataset, straight: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    job, error = _interrupted(dataset, tmp_path, signal.SIGTERM)
    assert error.rank_exit_code == PREEMPTED_EXIT_CODE and error.transient
    assert (tmp_path / PREEMPTED_MARKER).exists()
    saved = latest_checkpoint(tmp_path)
    assert saved is not None and saved["epoch"] == 1 and saved["step"] > 0, "not a mid-epoch checkpoint"
    _launch(job)
    resumed = load_checkpoint(tmp_path / "last.pt")
    assert resumed["epoch"] == 3
    _assert_same(straight, resumed["model"])


def test_a_sigkilled_rank_takes_the_launch_down_and_the_retry_resumes(
    dataset: PreparedDataset, straight: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    job, error = _interrupted(dataset, tmp_path, signal.SIGKILL)
    assert error.rank == 1 and error.rank_exit_code == -signal.SIGKILL and error.transient
    assert not _worker_pids(job), "the launcher left a rank running"
    assert latest_checkpoint(tmp_path)["epoch"] >= 1  # type: ignore[index]
    _launch(job)
    _assert_same(straight, _final_weights(tmp_path))

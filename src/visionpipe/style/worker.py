"""The style network's training on several GPUs of one host: the process torchrun starts.

    python -m torch.distributed.run --nproc-per-node 8 -m visionpipe.style.worker job.json

Only rank 0 writes checkpoints, logs to MLflow, prints the epoch records the launching task
reads and writes the result file.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visionpipe.config import StyleLossConfig, StyleTrainConfig
from visionpipe.style.train import StyleInputs, StyleResult, train_style
from visionpipe.training.core import log_world, print_epoch
from visionpipe.training.distributed import distributed
from visionpipe.training.jobs import Logger, processes_per_gpu, run_job
from visionpipe.training.launch import record_failures
from visionpipe.training.result import write_result

log = logging.getLogger(__name__)
MODULE = "visionpipe.style.worker"


class StyleJob(BaseModel):
    train: StyleTrainConfig
    loss: StyleLossConfig
    inputs: StyleInputs
    out_dir: str
    result_path: str
    mlflow_run_id: str | None = None


def style_processes(train: StyleTrainConfig) -> int:
    """Ranks on this host: as configured, else one per visible GPU; one without any."""
    return processes_per_gpu(train.launch, train.device)


def launch_style(train: StyleTrainConfig, loss: StyleLossConfig, inputs: StyleInputs, out_dir: Path,
                 mlflow_run_id: str | None, rdzv_id: str,
                 on_line: Callable[[int | None, str], None], *,
                 hold_compute: Callable[[int], AbstractContextManager[Any]] = lambda n: nullcontext(),
                 stop: threading.Event | None = None, logger: Logger = log) -> StyleResult:
    """Train with torchrun on ``style_processes(train)`` ranks; return rank 0's result."""
    job = StyleJob(train=train, loss=loss, inputs=inputs, out_dir=str(out_dir),
                   result_path=str(out_dir / "result.json"), mlflow_run_id=mlflow_run_id)
    return StyleResult.model_validate_json(run_job(
        "train-style-network", job, train.launch, style_processes(train), out_dir, MODULE,
        rdzv_id, on_line, hold_compute, stop, logger))


@record_failures  # each rank's error file: what it raised, and whether a retry can help
def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m {MODULE} <job.json>", file=sys.stderr)
        return 2
    job = StyleJob.model_validate_json(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    launch = job.train.launch
    with distributed(job.train.device, launch.timeout_s, launch.backend) as ctx:
        log.info("rank %d of %d on %s", ctx.rank, ctx.world_size, ctx.device)
        if ctx.is_main and job.mlflow_run_id:
            log_world(job.mlflow_run_id, ctx)
        result = train_style(job.train, job.loss, job.inputs, Path(job.out_dir), print_epoch,
                             job.mlflow_run_id, ctx)
        if ctx.is_main:
            write_result(result, Path(job.result_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

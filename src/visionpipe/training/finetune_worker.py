"""The fine-tune on several GPUs of one host: the process torchrun starts for each of them.

    python -m torch.distributed.run --nproc-per-node 8 -m visionpipe.training.finetune_worker job.json

``training.finetune`` does the work with the process group's context; only rank 0 writes
checkpoints, logs to MLflow, prints the epoch records the launching task reads, and writes the
result file.
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

from visionpipe.training.core import log_world, print_epoch
from visionpipe.training.distributed import distributed
from visionpipe.training.finetune import finetune
from visionpipe.training.jobs import FinetuneJob
from visionpipe.training.launch import record_failures
from visionpipe.training.result import write_result

log = logging.getLogger(__name__)


@record_failures  # each rank's error file: what it raised, and whether a retry can help
def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m visionpipe.training.finetune_worker <job.json>", file=sys.stderr)
        return 2
    gc.freeze()  # the imports' objects: out of the cyclic collector's sight (see worker.main)
    job = FinetuneJob.model_validate_json(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = job.config
    with distributed(cfg.device, cfg.launch.timeout_s, cfg.launch.backend) as ctx:
        log.info("rank %d of %d on %s", ctx.rank, ctx.world_size, ctx.device)
        if ctx.is_main and job.mlflow_run_id:
            log_world(job.mlflow_run_id, ctx)
        result = finetune(cfg, job.dataset, Path(job.weights_path), Path(job.out_dir),
                          on_epoch=print_epoch, random_init=job.random_init,
                          weights_sha256=job.weights_sha256, mlflow_run_id=job.mlflow_run_id,
                          ctx=ctx)
        if ctx.is_main:
            write_result(result, Path(job.result_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Create the work pools and the ``gpu`` global concurrency limit on the Prefect server.

    python -m deployments.pools --gpus 4                 # a process pool for one GPU host
    python -m deployments.pools --gpus 8 --kubernetes    # and a Kubernetes pool
    python -m deployments.pools --gpus 8 --ddp-kubernetes  # and the pool of multi-node DDP nodes

``gpu-host`` (type process) runs flow runs as processes on the host whose worker polls it; a
deployment picks its GPUs with the job variable ``env: {CUDA_VISIBLE_DEVICES: "0,1"}``.
``gpu-kubernetes`` uses ``kubernetes-base-job-template.json``: GPU requests, a memory-backed
``/dev/shm``, the tracking and S3 settings from the ``visionpipe`` secret, and the state folder
on a shared claim so a retried pod resumes from the checkpoints. ``gpu-kubernetes-ddp`` uses
``kubernetes-ddp-node-job-template.json`` for the node runs of a multi-node GoogLeNet launch: the
same, plus the pod label that the headless service ``visionpipe-ddp``
(``deployments/kubernetes/ddp-headless-service.yaml``) selects, ``subdomain: visionpipe-ddp``, the
job variable ``rdzv_hostname`` as the pod's hostname (node 0 is then reachable by name), port
29400 and no pod retries (the parent retries the whole world). The concurrency limit ``gpu``
has one slot per GPU; each training task holds one slot per process it starts on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists

TEMPLATE = Path(__file__).with_name("kubernetes-base-job-template.json")
DDP_TEMPLATE = Path(__file__).with_name("kubernetes-ddp-node-job-template.json")


async def create(gpus: int, kubernetes: bool, ddp_kubernetes: bool = False) -> list[str]:
    made = []
    async with get_client() as client:
        pools = [WorkPoolCreate(name="gpu-host", type="process",
                                description="Single GPU hosts; pick GPUs with CUDA_VISIBLE_DEVICES.")]
        if kubernetes:
            pools.append(WorkPoolCreate(name="gpu-kubernetes", type="kubernetes",
                                        base_job_template=json.loads(TEMPLATE.read_text())))
        if ddp_kubernetes:
            pools.append(WorkPoolCreate(
                name="gpu-kubernetes-ddp", type="kubernetes",
                description="Multi-node DDP node runs; needs the visionpipe-ddp headless service.",
                base_job_template=json.loads(DDP_TEMPLATE.read_text())))
        for pool in pools:
            try:
                await client.create_work_pool(pool)
                made.append(f"work pool {pool.name}")
            except ObjectAlreadyExists:
                made.append(f"work pool {pool.name} (existed)")
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="gpu", limit=gpus))
            made.append(f"concurrency limit gpu = {gpus}")
        except ObjectAlreadyExists:
            limit = await client.read_global_concurrency_limit_by_name("gpu")
            from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

            await client.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=gpus))
            made.append(f"concurrency limit gpu = {gpus} (was {limit.limit})")
    return made


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the pool")
    parser.add_argument("--kubernetes", action="store_true", help="also the Kubernetes pool")
    parser.add_argument("--ddp-kubernetes", action="store_true",
                        help="also the Kubernetes pool of multi-node DDP node runs")
    args = parser.parse_args(argv)
    for line in asyncio.run(create(args.gpus, args.kubernetes, args.ddp_kubernetes)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Deploy the flows to their work pools, whose workers run them (``python -m deployments.deploy``).

    python -m deployments.deploy                                  # each to prefect.yaml's pool
    python -m deployments.deploy --pool gpu-host                  # all to one pool
    python -m deployments.deploy --source /opt/visionpipe

The deployments of ``prefect.yaml`` (the same ``make serve`` serves), registered on the Prefect
server at ``PREFECT_API_URL`` with their job variables and the flows loaded from ``--source``: a
checkout every worker host has at that path, or a git URL the workers clone. A worker then runs
them: ``prefect worker start --pool gpu-host``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import deploy
from prefect.deployments.runner import RunnerDeployment

from deployments.serve import deployments

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", help="deploy every deployment to this work pool instead of "
                        "the one prefect.yaml names")
    parser.add_argument("--source", default=str(REPO), help="checkout path or git URL")
    args = parser.parse_args(argv)
    by_pool: dict[str, list[RunnerDeployment]] = {}
    for deployment in deployments(args.source):
        pool = args.pool or deployment.work_pool_name
        if not pool:
            print(f"error: deployment {deployment.name!r} of {deployment.flow_name} names no "
                  "work pool. Fix: add work_pool.name to it in prefect.yaml, or pass --pool",
                  file=sys.stderr)
            return 2
        by_pool.setdefault(pool, []).append(deployment)
    for pool, group in by_pool.items():
        ids = deploy(*group, work_pool_name=pool, build=False, push=False,
                     print_next_steps_message=False)
        print(f"deployed {len(ids)} deployment(s) to work pool {pool} from {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

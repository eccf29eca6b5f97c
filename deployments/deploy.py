"""Deploy the flows to a work pool, whose workers run them (``python -m deployments.deploy``).

    python -m deployments.deploy --pool gpu-host                  # this checkout, a process pool
    python -m deployments.deploy --pool gpu-host --source /opt/visionpipe

The same deployments as ``make serve`` (``deployments.serve.deployments``), registered on the
Prefect server at ``PREFECT_API_URL`` with the flows loaded from ``--source``: a checkout every
worker host has at that path, or a git URL the workers clone. A worker then runs them:
``prefect worker start --pool gpu-host``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import deploy

from deployments.serve import deployments

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="work pool name, e.g. gpu-host")
    parser.add_argument("--source", default=str(REPO), help="checkout path or git URL")
    args = parser.parse_args(argv)
    ids = deploy(*deployments(args.source), work_pool_name=args.pool, build=False, push=False,
                 print_next_steps_message=False)
    print(f"deployed {len(ids)} deployment(s) to work pool {args.pool} from {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

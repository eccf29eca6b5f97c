"""One node of a multi-node GoogLeNet launch: the flow behind the ``ddp-node`` deployment.

The GoogLeNet task of ``train-image-classifiers`` starts one run of it per node with
``run_deployment``; the work pool places each on a GPU host.

1. launch-node: pre-flight checks (GPUs, rendezvous endpoint, shared checkpoint folder), then
   torchrun with the c10d rendezvous that node 0 hosts
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State

from tasks.multinode import launch_node, node_failed
from visionpipe.training.multinode import NodeJob, NodeOutcome


@flow(name="ddp-node")
def ddp_node(job: NodeJob) -> NodeOutcome | State[Any]:
    """Run one node of the world; global rank 0's node returns the training result.

    A failure ends the run in a state named for whether a retry can help, which the parent reads.
    """
    try:
        return launch_node(job)
    except Exception as exc:  # noqa: BLE001 - logged and classified into the final state
        return node_failed(exc)

"""One node of a multi-node GoogLeNet launch: the flow behind the ``ddp-node`` deployment.

The GoogLeNet task of ``train-image-classifiers`` starts one run of it per node with
``run_deployment``; the work pool places each on a GPU host.

1. launch-node: pre-flight checks (GPUs, rendezvous endpoint, shared checkpoint folder), then
   torchrun with the c10d rendezvous that node 0 hosts
"""

from __future__ import annotations

from prefect import flow

from tasks.multinode import launch_node
from visionpipe.training.multinode import NodeJob, NodeOutcome


@flow(name="ddp-node")
def ddp_node(job: NodeJob) -> NodeOutcome:
    """Run one node of the world; global rank 0's node returns the training result."""
    return launch_node(job)

"""``python -m cluster.local``: a Ray cluster of several nodes on this machine, bound to 127.0.0.1.

For trying, and testing, what only shows on a cluster: batch stage actors spread over nodes, jobs
that join an existing cluster with ``--address``, a node dying under a job. Every node is a real
raylet with its own object store (``ray.cluster_utils.Cluster``); the nodes share this machine's
cores, so the CPUs they advertise are logical. The command prints one JSON line (the address and
the node ids) once every node is up, then runs until SIGINT or SIGTERM and shuts every node down.

    python -m cluster.local --nodes 2 --cpus 2 &
    python -m batch run --address 127.0.0.1:PORT --input data.parquet --output out/
    kill %1
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

HOST = "127.0.0.1"


def node_args(cpus: float, object_store_mb: int) -> dict[str, Any]:
    return {
        "num_cpus": cpus,
        "object_store_memory": object_store_mb * 1024 * 1024,
        "node_ip_address": HOST,
        "include_dashboard": False,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.local", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--nodes", type=int, default=2, help="nodes, head included (default: 2)")
    parser.add_argument("--cpus", type=float, default=2, help="logical CPUs per node (default: 2)")
    parser.add_argument(
        "--object-store-mb", type=int, default=256, help="object store per node (default: 256)"
    )
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.cpus <= 0:
        parser.error("need at least one node and a positive CPU count")

    from ray.cluster_utils import Cluster

    stop = threading.Event()
    cluster = Cluster()
    try:
        for _ in range(args.nodes):  # the first is the head
            cluster.add_node(**node_args(args.cpus, args.object_store_mb))
        cluster.wait_for_nodes()
        # After the nodes: each one installs a SIGTERM handler that drains for 30 s and exits.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        nodes = [cluster.head_node, *cluster.worker_nodes]
        print(
            json.dumps({"address": cluster.address, "nodes": [n.node_id for n in nodes]}),
            flush=True,
        )
        stop.wait()
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

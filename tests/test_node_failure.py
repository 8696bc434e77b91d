"""A worker node dies under load: the service goes on and Serve reschedules its replicas.

Issue 7, point 6: on a local two-node cluster (``ray.cluster_utils.Cluster``), every deployment
of the graph (gateway and the shipped config's stage group, fake stage classes so nothing loads
weights) runs two replicas, one per node. Client threads post predictions over real HTTP while
the worker node is killed without warning; Serve must notice, answer every request (a client
retries a failed one once, the standard the project holds a replica loss to), and bring each
deployment back to two running replicas on the surviving head node.

The cluster lives in a child process, ``python -m tests.node_failure_drill --elastic`` (the
session's ``cluster_drill``; its docstring tells how placement is arranged), which runs the elastic
drill of ``tests/test_elastic.py`` on the same two nodes first: the test session runs its own Ray
instance and a driver connects to one cluster only. The drill prints its facts as one JSON line;
this test judges them. Measured on a 2-core machine with the fully split graph (seven deployments):
Serve saw the replicas die 2-3 s after the kill, and all fourteen replicas ran again 31-39 s after
it (52 s while other test runs kept the machine busy), most of that spent starting seven Python
worker processes at once on two cores. Between 200 and 300 requests were answered after the kill;
none failed after its retry, and most runs had no failed first attempt either. With the shipped
grouping there are two deployments, four replicas.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import PIPELINE_GROUP

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)

DEPLOYMENTS = ["Gateway", PIPELINE_GROUP]
RESCHEDULE_BOUND_S = 90
"""Kill to every deployment back at two running replicas: measured 31-39 s on two cores, 52 s on
a busy machine (the drill itself waits up to 120 s, so a miss reports the actual time)."""
MIN_SERVED_AFTER_REMOVAL = 50
"""Requests sent after the kill and answered: the service must go on, not merely survive."""


def test_losing_the_worker_node_under_load_fails_no_request_and_replicas_come_back(cluster_drill):
    report, tail = cluster_drill, cluster_drill["stderr_tail"]
    facts = {k: v for k, v in report.items() if k != "timeline"}
    logger.info("node failure drill: %s", json.dumps(facts))
    context = f"\nreport: {json.dumps(facts)}\ntimeline: {report.get('timeline')}\n{tail}"

    # Not vacuous: half of every deployment was on the node that died, and that node is gone.
    assert report["replicas_before"] == {name: {"head": 1, "worker": 1} for name in DEPLOYMENTS}, (
        context
    )
    assert report["live_nodes"] == 1, context

    # The service went on: nothing failed beyond one client retry, and it kept answering.
    assert report["failures_after_retry"] == 0, context
    assert report["served_after_removal"] >= MIN_SERVED_AFTER_REMOVAL, context

    # Serve replaced the lost replicas on the surviving node, and requests are answered after.
    assert report["recovered"], context
    assert report["reschedule_s"] <= RESCHEDULE_BOUND_S, context
    assert report["replicas_after"] == {name: {"head": 2} for name in DEPLOYMENTS}, context
    assert report["serve_states_after"] == {name: {"RUNNING": 2} for name in DEPLOYMENTS}, context
    assert report["served_after_recovery"] > 0, context

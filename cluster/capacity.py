"""``python -m cluster.capacity``: replicas, CPUs and GPUs for a target load, from measured numbers.

The queueing assumption, stated once. Requests arrive as a Poisson stream at the target rate; a
deployment's ``c`` replicas each serve ``replica_rps`` requests per second at saturation (the
measured throughput of one replica, its batching included), with exponentially distributed
service. Where a request waits depends on how it reaches the deployment:

* an ingress deployment (the ``Gateway``) is fed by HAProxy, which sends each request to the
  replica with the fewest open requests: close to one shared queue, planned as M/M/c
  (Erlang C: ``P(wait > t) = C(c, a) * exp(-(c * replica_rps - rate) * t)``);
* a deployment called through a handle (the model groups) gets each request routed on arrival
  to one replica, where it waits (Serve's router picks the shorter of two cached queue lengths):
  planned as ``c`` separate M/M/1 queues fed ``rate / c`` each (a random split, an upper bound on
  what the router does; measured here, two handle-fed replicas of a fixed-cost model served 60
  req/s where two HAProxy-fed ones served 79, so the router is not better than that bound).

A request's latency at quantile ``q`` is its unloaded latency (the measured ``c=1`` p50, end to
end) plus, per deployment on its path, the ``q`` quantile of its wait. Summed per-stage
quantiles and exponential service (a model replica's varies far less) both err on the safe side:
the replicas planned are an upper bound for steady Poisson traffic; ``tests/test_capacity.py``
measures by how much. Bursts beyond Poisson are what the
headroom of ``max_replicas`` is for. Each deployment is also kept at or below ``--utilization``
of its capacity (0.8: room to absorb a lost replica's share while Serve replaces it).

Where the per-replica numbers come from (``--bench``, ``--gpu-bench``: the benchmark's JSON):

* ``cpu`` (``serve_config.yaml``): the model group ``Pipeline`` (1 CPU per replica) serves
  ``1000 / cpu_ms`` requests per second, ``cpu_ms`` being the CPU time its process spent per
  request in the benchmark's c=32 run (measured; its replicas' CPUs are their own on a real node,
  which they are not on the 2-core benchmark machine); the ``Gateway`` likewise from its own
  CPU per request, one CPU per replica recommended at scale; the unloaded latency is the
  benchmark's c=1 p50.
* ``gpu`` (``serve_config.gpu.yaml``): the ``Encoder`` on a quarter of a GPU serves a quarter of
  what four processes sharing one card did at batch 8 in float16 (measured on the GPU run); the
  CPU stages around it (``Preprocess``: tokenizer and bag-of-words) from the CPU run's per-stage
  shares of the Pipeline's CPU time (extrapolated: the stages never ran apart on this machine);
  the unloaded latency is the CPU path without the encoder's compute plus the GPU's batch-8 p50
  (extrapolated).

    python -m cluster.capacity --rps 100 1000 10000 --slo-ms 150
    python -m cluster.capacity --replica-rps 38 --base-ms 27 --rps 55 --slo-ms 200
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "results" / "latest.json"
GPU_BENCH = ROOT / "bench" / "results" / "gpu-latest.json"


@dataclass(frozen=True)
class Stage:
    """One deployment: what a replica serves at saturation and what it reserves."""

    name: str
    replica_rps: float
    cpus: float
    gpus: float = 0.0
    source: str = "measured"
    shared_queue: bool = False
    """Fed by HAProxy (least connections: one queue, M/M/c), not through a handle (M/M/1 each)."""


@dataclass(frozen=True)
class Profile:
    name: str
    config: str
    base_ms: float
    """Unloaded end-to-end latency (c=1 p50)."""
    stages: tuple[Stage, ...]
    base_source: str = "measured"


@dataclass
class StagePlan:
    stage: Stage
    replicas: int
    utilization: float
    wait_ms: float
    """Waiting time at the plan's quantile."""
    mean_wait_ms: float
    autoscaling_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    profile: str
    rps: float
    slo_ms: float
    quantile: float
    latency_ms: float
    mean_latency_ms: float
    stages: list[StagePlan]
    cpus: float
    gpus: float


def erlang_c(servers: int, offered: float) -> float:
    """Probability that a request waits, M/M/c with ``offered = rate / replica_rate`` (Erlang B
    by its stable recursion, then C from B)."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1.0 - rho * (1.0 - b))


def wait_ms(
    servers: int, rate: float, replica_rps: float, quantile: float, shared: bool = False
) -> tuple[float, float]:
    """(quantile, mean) of the waiting time in milliseconds; infinite when overloaded.

    Per-replica queues (``shared=False``): M/M/1 at ``rate / servers`` each; one shared queue:
    M/M/c."""
    spare = servers * replica_rps - rate
    if spare <= 0:
        return math.inf, math.inf
    if shared:
        waits = erlang_c(servers, rate / replica_rps)
    else:
        waits = rate / (servers * replica_rps)  # M/M/1: the chance to wait is the load
        spare = replica_rps - rate / servers
    mean = waits / spare
    tail = 1.0 - quantile
    at_quantile = math.log(waits / tail) / spare if waits > tail else 0.0
    return at_quantile * 1000.0, mean * 1000.0


def plan(
    profile: Profile,
    rps: float,
    slo_ms: float,
    quantile: float = 0.99,
    utilization: float = 0.8,
    headroom: float = 0.5,
) -> Plan:
    """The fewest replicas per deployment that keep each at most ``utilization`` busy and the
    ``quantile`` latency within ``slo_ms``; ``ValueError`` if no replica count can."""
    if profile.base_ms >= slo_ms:
        raise ValueError(
            f"the objective {slo_ms:g} ms is below the unloaded latency {profile.base_ms:.1f} ms: "
            "no number of replicas meets it (make a request cheaper instead)"
        )
    counts = {
        s.name: max(1, math.ceil(rps / (s.replica_rps * utilization) - 1e-9))
        for s in profile.stages
    }

    def waits() -> dict[str, tuple[float, float]]:
        return {
            s.name: wait_ms(counts[s.name], rps, s.replica_rps, quantile, s.shared_queue)
            for s in profile.stages
        }

    found = waits()
    while profile.base_ms + sum(q for q, _ in found.values()) > slo_ms:
        worst = max(found, key=lambda name: found[name][0])
        counts[worst] += 1
        found = waits()
    stages = []
    for stage in profile.stages:
        replicas = counts[stage.name]
        at_quantile, mean = found[stage.name]
        peak = max(replicas, math.ceil(replicas * (1 + headroom)))
        in_replica_s = (mean + 1000.0 / stage.replica_rps) / 1000.0
        scaling = {
            "min_replicas": max(1, math.ceil(replicas / 2)),
            "initial_replicas": replicas,
            "max_replicas": peak,
            # Little's law: requests in one replica at the planned load (in service + waiting).
            "target_ongoing_requests": round(max(0.1, rps * in_replica_s / replicas), 2),
        }
        stages.append(
            StagePlan(
                stage,
                replicas,
                rps / (replicas * stage.replica_rps),
                at_quantile,
                mean,
                scaling,
            )
        )
    return Plan(
        profile=profile.name,
        rps=rps,
        slo_ms=slo_ms,
        quantile=quantile,
        latency_ms=profile.base_ms + sum(s.wait_ms for s in stages),
        mean_latency_ms=profile.base_ms + sum(s.mean_wait_ms for s in stages),
        stages=stages,
        cpus=sum(s.replicas * s.stage.cpus for s in stages),
        gpus=sum(s.replicas * s.stage.gpus for s in stages),
    )


# --- profiles from the benchmark's JSON -------------------------------------------------------


def cpu_profile(bench: dict[str, Any]) -> Profile:
    results = bench["results"]
    spent = results["served_c32"]["detail"]["encoder"]["cpu_ms_per_request"]
    return Profile(
        name="cpu",
        config="serve_config.yaml",
        base_ms=float(results["served_c1"]["p50_ms"]),
        stages=(
            Stage("Gateway", 1000.0 / float(spent["Gateway"]), cpus=1.0, shared_queue=True),
            Stage("Pipeline", 1000.0 / float(spent["Pipeline"]), cpus=1.0),
        ),
    )


def gpu_profile(bench: dict[str, Any], gpu_bench: dict[str, Any]) -> Profile:
    results = bench["results"]
    spent = results["served_c32"]["detail"]["encoder"]["cpu_ms_per_request"]
    share = results["raw"]["detail"]["stage_share"]
    pipeline_ms = float(spent["Pipeline"])
    encoder_share = float(share["Encoder"])
    # The Pipeline's CPU without the encoder's compute: tokenizer, bag-of-words, heads, the
    # replica's own request handling. In the GPU layout the first two and one hop's handling are
    # the Preprocess group; the encoder replica keeps a hop's handling on its CPU.
    around_ms = pipeline_ms * (1.0 - encoder_share)
    shared = next(
        p
        for p in gpu_bench["points"]
        if p["mode"] == "shared"
        and p["dtype"] == "float16"
        and p["batch_size"] == 8
        and p["processes"] == 4
    )
    per_replica = float(shared["texts_per_s"]) / 4.0
    c1_ms = float(results["served_c1"]["p50_ms"])
    encoder_c1_ms = float(results["raw"]["p50_ms"]) / 32.0 * encoder_share * 8  # one chunk of 8
    base = c1_ms - min(encoder_c1_ms, c1_ms / 2) + float(shared["p50_ms"])
    return Profile(
        name="gpu",
        config="serve_config.gpu.yaml",
        base_ms=base,
        base_source="extrapolated",
        stages=(
            Stage("Gateway", 1000.0 / float(spent["Gateway"]), cpus=1.0, shared_queue=True),
            Stage("Preprocess", 1000.0 / around_ms, cpus=1.0, source="extrapolated"),
            Stage("Encoder", per_replica, cpus=1.0, gpus=0.25),
        ),
    )


def measured_profile(
    replica_rps: float, base_ms: float, name: str, cpus: float, gpus: float, shared: bool
) -> Profile:
    stage = Stage(name, replica_rps, cpus, gpus, shared_queue=shared)
    return Profile(name=name, config="-", base_ms=base_ms, stages=(stage,))


# --- output -----------------------------------------------------------------------------------


def table(plans: Sequence[Plan]) -> str:
    lines = [
        "| profile | target req/s | deployment | replicas | busy | CPUs | GPUs | "
        f"p{int(plans[0].quantile * 100)} latency | autoscaling_config |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in plans:
        for i, s in enumerate(p.stages):
            scaling = ", ".join(f"{k}: {v}" for k, v in s.autoscaling_config.items())
            lines.append(
                f"| {p.profile if i == 0 else ''} | {p.rps:,.0f} | {s.stage.name} | {s.replicas} "
                f"| {s.utilization:.0%} | {s.replicas * s.stage.cpus:g} | "
                f"{s.replicas * s.stage.gpus:g} | "
                f"{f'{p.latency_ms:.0f} ms' if i == 0 else ''} | {{{scaling}}} |"
            )
    return "\n".join(lines)


def describe(profile: Profile) -> str:
    head = f"{profile.name} ({profile.config}): unloaded {profile.base_ms:.1f} ms"
    parts = [f"{head} ({profile.base_source})"]
    for s in profile.stages:
        gpus = f", {s.gpus:g} GPU" if s.gpus else ""
        queue = "one queue" if s.shared_queue else "a queue per replica"
        parts.append(
            f"  {s.name}: {s.replica_rps:,.0f} req/s per replica ({s.cpus:g} CPU{gpus}; "
            f"{queue}; {s.source})"
        )
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.capacity", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rps", type=float, nargs="+", required=True, help="target requests/s")
    parser.add_argument("--slo-ms", type=float, required=True, help="latency objective (ms)")
    parser.add_argument("--quantile", type=float, default=0.99, help="of the objective (0.99)")
    parser.add_argument("--utilization", type=float, default=0.8)
    parser.add_argument("--headroom", type=float, default=0.5, help="max_replicas above the plan")
    parser.add_argument("--bench", type=Path, default=BENCH)
    parser.add_argument("--gpu-bench", type=Path, default=GPU_BENCH)
    parser.add_argument("--profile", choices=["cpu", "gpu", "all"], default="all")
    parser.add_argument("--replica-rps", type=float, help="one measured deployment instead")
    parser.add_argument("--base-ms", type=float, help="its unloaded latency (with --replica-rps)")
    parser.add_argument("--deployment", default="Model")
    parser.add_argument("--cpus", type=float, default=1.0, help="per replica (with --replica-rps)")
    parser.add_argument("--gpus", type=float, default=0.0, help="per replica (with --replica-rps)")
    parser.add_argument("--json", action="store_true", help="the plans as JSON")
    parser.add_argument(
        "--queue",
        choices=["per-replica", "shared"],
        default="per-replica",
        help="with --replica-rps: requests wait at the replica a handle routed them to "
        "(default), or in one queue (an ingress deployment behind HAProxy)",
    )
    args = parser.parse_args(argv)

    profiles: list[Profile] = []
    if args.replica_rps is not None:
        if args.base_ms is None:
            parser.error("--replica-rps needs --base-ms")
        profiles.append(
            measured_profile(
                args.replica_rps,
                args.base_ms,
                args.deployment,
                args.cpus,
                args.gpus,
                shared=args.queue == "shared",
            )
        )
    else:
        bench = json.loads(args.bench.read_text())
        if args.profile in ("cpu", "all"):
            profiles.append(cpu_profile(bench))
        if args.profile in ("gpu", "all"):
            if args.gpu_bench.exists():
                profiles.append(gpu_profile(bench, json.loads(args.gpu_bench.read_text())))
            elif args.profile == "gpu":
                parser.error(f"{args.gpu_bench} does not exist: run the GPU benchmark first")
    plans = []
    for profile in profiles:
        for rps in args.rps:
            try:
                plans.append(
                    plan(
                        profile,
                        rps,
                        args.slo_ms,
                        args.quantile,
                        args.utilization,
                        args.headroom,
                    )
                )
            except ValueError as e:
                print(f"error: {profile.name}: {e}", file=sys.stderr)
                return 1
    if args.json:
        print(json.dumps([asdict(p) for p in plans], indent=2))
        return 0
    print("Queueing assumption: Poisson arrivals, exponential service; an ingress deployment")
    print("behind HAProxy is one M/M/c queue, a handle-fed one an M/M/1 queue per replica;")
    print("latency = unloaded c=1 p50 + each deployment's waiting-time quantile.\n")
    for profile in profiles:
        print(describe(profile))
    print()
    print(table(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())

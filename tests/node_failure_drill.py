"""``python -m tests.node_failure_drill``: kill the worker node of a two-node cluster under load.

A drill for "a node dies, the service goes on": a head and one worker node
(``ray.cluster_utils.Cluster``, both on 127.0.0.1) run Serve with the real gateway and stage
wrapper around the instant fake stages of ``tests/fixtures.py``, every deployment with two
replicas, one on each node. Client threads send predictions over HTTP while the worker node is
killed without warning (``remove_node(allow_graceful=False)``, as a lost machine goes); the drill
then waits until Serve has every deployment back at two running replicas on the surviving node,
keeps the load on them a little longer, and prints one JSON line of facts (the last line on
stdout) for ``tests/test_node_failure.py`` to judge. A client retries a failed request once,
after ``Retry-After`` (at most a second): the standard the project holds a replica loss to.
Each attempt may take 30 s: a call whose encoder replica dies under it can hang until the
gateway's 20 s graph deadline answers 504 (Ray Serve 2.60 keeps rerouting the next stage's call,
taking the lost encoder result for that stage's replicas being unavailable).

Placement is arranged, not left to chance. Serve spreads replicas over nodes, but per cluster,
not per deployment: runs with the default placement had both replicas of the ensemble (or of the
gateway) on one node, and losing that node is an outage however many replicas there are. Each
deployment here asks for one unit of its own resource (``drill_<Deployment>``); the worker has
one of each, the head two, and while the application deploys a placeholder actor holds one of
each on the head. So every deployment gets exactly one replica per node, and once the
placeholder is gone the head has room for the replacements.

The cluster runs in this process, not in the test's: the test session runs its own Ray instance,
and a driver connects to one cluster only. The registry comes from the environment
(``MLFLOW_TRACKING_URI``): the gateway resolves its releases at start-up.

With ``--elastic`` the two nodes first run the elastic drill of ``python -m cluster.elastic``
(scale up, down and from zero, real models; its report under ``elastic``), which deletes its
applications before this drill deploys: the test suite pays for one cluster, not two.

    MLFLOW_TRACKING_URI=sqlite:///…/mlflow.db python -m tests.node_failure_drill [--elastic]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
APP = "drill"
REPLICAS = 2
HEALTH_CHECK_PERIOD_S = 2.0  # as every deployment in serve_config.yaml

logger = logging.getLogger("node_failure_drill")

Placement = dict[str, dict[str, int]]
"""Replicas per deployment and node."""


def resource_of(deployment: str) -> str:
    """The custom resource that places one deployment's replicas (see the module docstring)."""
    return f"drill_{deployment}"


# --- load -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One client request: when it was sent, how its first and (if any) retried attempt went."""

    sent_s: float
    took_s: float
    first_ok: bool
    final_ok: bool
    first_error: str | None = None
    final_error: str | None = None


@dataclass
class Load:
    """Client threads that post predictions at a steady pace until stopped or out of budget.

    Every request carries texts no other request has, so the gateway's response cache cannot
    answer it without the graph. A failed attempt (an exception or any status but 200) is retried
    once, after ``Retry-After`` (at most 1 s) or half a second.
    """

    url: str
    clients: int
    rate_per_client: float
    max_requests: int
    started: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _numbers: itertools.count = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, name=f"client-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def now(self) -> float:
        return time.monotonic() - self.started

    def served(self) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.final_ok)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def _attempt(self, client: Any, texts: list[str]) -> tuple[bool, str | None, float]:
        """(success, what went wrong, seconds to wait before a retry)."""
        import httpx

        try:
            response = client.post(self.url, json={"texts": texts})
        except httpx.HTTPError as e:
            return False, f"{type(e).__name__}: {e}", 0.5
        if response.status_code == 200:
            return True, None, 0.0
        try:
            wait = min(float(response.headers.get("retry-after", 0.5)), 1.0)
        except ValueError:
            wait = 0.5
        return False, f"HTTP {response.status_code}: {response.text[:200]}", wait

    def _run(self) -> None:
        import httpx

        interval = 1.0 / self.rate_per_client
        with httpx.Client(timeout=30.0) as client:
            while not self.stop.is_set():
                with self._lock:
                    if len(self.outcomes) >= self.max_requests:
                        return
                n = next(self._numbers)
                texts = [f"please reset my password ({n})", f"what is my balance ({n})"]
                sent = self.now()
                first_ok, first_error, wait = self._attempt(client, texts)
                final_ok, final_error = first_ok, first_error
                if not first_ok:
                    time.sleep(wait)
                    final_ok, final_error, _ = self._attempt(client, texts)
                took = self.now() - sent
                with self._lock:
                    self.outcomes.append(
                        Outcome(sent, took, first_ok, final_ok, first_error, final_error)
                    )
                self.stop.wait(max(0.0, interval - took))


# --- where the replicas are -----------------------------------------------------------------


def replica_placement(deployments: Sequence[str]) -> Placement:
    """Live replica actors per deployment and node id, as the GCS sees them (not Serve's view).

    Serve names a replica's actor class ``ServeReplica:<app>:<deployment>``. The state API
    (``ray.util.state``) needs the dashboard, which this cluster runs without, so this reads the
    GCS actor table directly.
    """
    import ray._private.state

    placement: Placement = {name: {} for name in deployments}
    for actor in ray._private.state.actors(actor_state_name="ALIVE").values():
        parts = actor["ActorClassName"].split(":")
        if len(parts) == 3 and parts[0] == "ServeReplica" and parts[1] == APP:
            nodes = placement.setdefault(parts[2], {})
            node = actor["Address"]["NodeID"]
            nodes[node] = nodes.get(node, 0) + 1
    return placement


def serve_replica_states(deployments: Sequence[str]) -> Placement:
    """Replica states per deployment as Serve reports them (``serve.status()``)."""
    from ray import serve

    app = serve.status().applications.get(APP)
    found = app.deployments if app is not None else {}
    return {
        name: {str(state): n for state, n in found[name].replica_states.items()}
        if name in found
        else {}
        for name in deployments
    }


def is_recovered(placement: Placement, states: Placement, dead_node: str) -> bool:
    """Every deployment at its replica count, all running, none left on the dead node."""
    return all(
        not nodes.get(dead_node)
        and sum(nodes.values()) == REPLICAS
        and states.get(name) == {"RUNNING": REPLICAS}
        for name, nodes in placement.items()
    )


def by_role(placement: Placement, roles: dict[str, str]) -> dict[str, dict[str, int]]:
    """Node ids replaced by "head" / "worker" for a readable report."""
    return {
        name: {roles.get(node, node): n for node, n in sorted(nodes.items())}
        for name, nodes in placement.items()
    }


def summarize(placement: Placement, states: Placement, roles: dict[str, str]) -> dict[str, str]:
    """One short line per deployment for the timeline: ``head:1 worker:1 | RUNNING:2``."""
    lines = {}
    for name, nodes in by_role(placement, roles).items():
        where = " ".join(f"{role}:{n}" for role, n in nodes.items())
        serve_view = " ".join(f"{state}:{n}" for state, n in sorted(states.get(name, {}).items()))
        lines[name] = f"{where} | {serve_view}"
    return lines


# --- cluster and application ----------------------------------------------------------------


def deployment_names() -> list[str]:
    from servecore.config_check import load_app_spec

    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    return ["Gateway", *(group.name for group in spec.group_plans())]


def node_resources(deployments: Sequence[str], per_deployment: int) -> dict[str, float]:
    return {resource_of(name): float(per_deployment) for name in deployments}


def build_graph() -> Any:
    """:func:`tests.fixtures.fake_graph` with a placement resource per deployment. The response
    cache is off: the drill is about the graph answering, not the cache."""
    from servecore.config_check import load_app_spec
    from tests.fixtures import fake_graph

    def options(name: str) -> dict[str, Any]:
        return {
            "num_replicas": REPLICAS,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "ray_actor_options": {"resources": {resource_of(name): 1}},
        }

    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    return fake_graph(
        spec,
        gateway_config={"cache": {"enabled": False}},
        gateway_options=options("Gateway"),
        stage_options={group.name: options(group.name) for group in spec.group_plans()},
    )


def deploy(port: int, deployments: Sequence[str], head_node_id: str, start: bool = True) -> None:
    """Serve with its proxy on the head only (both nodes share 127.0.0.1, so a proxy per node
    would fight over the port; ``start=False``: already started), then the graph, one replica of
    each deployment per node."""
    import ray
    from ray import serve
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from graphs.deploy import start_serve
    from servecore.config_check import load_config

    @ray.remote(num_cpus=0)
    class Placeholder:
        def ready(self) -> bool:
            return True

    if start:
        start_serve(load_config(ROOT / "serve_config.yaml"), http_port=port)
    # Holds one of the head's two units per deployment while the replicas are placed.
    placeholder = Placeholder.options(
        resources=node_resources(deployments, 1),
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_node_id, soft=False),
    ).remote()
    ray.get(placeholder.ready.remote(), timeout=60)
    try:
        serve.run(build_graph(), name=APP, route_prefix=f"/{APP}")
    finally:
        ray.kill(placeholder)


NODE_DEATH_TIMEOUT_S = 60.0
"""How long the GCS may take to declare the removed node dead. Serve can have every replica back
before that (measured: replicas back in ~10 s with two deployments), so the drill waits for it
rather than reading the node table once."""


def wait_for_live_nodes(wanted: int, timeout_s: float) -> int:
    """Live nodes in the GCS's table, once there are ``wanted`` of them or at the timeout."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        live = sum(1 for node in ray.nodes() if node["Alive"])
        if live == wanted or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


def run_drill(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster.local import node_args
    from graphs.deploy import quiet_port, serve_env

    report: dict[str, Any] = {"ok": False}
    deployments = deployment_names()
    # Serve as shipped, HAProxy on ports of its own: the test session that started this process
    # runs a cluster of its own with HAProxy on the ports in the inherited environment.
    os.environ.update(serve_env())
    # A gateway being deleted (the elastic drill's, Serve's shutdown) keeps its port open this
    # long for load balancers to deregister it; nothing deregisters here, and the cluster goes.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
    cluster = Cluster()
    load: Load | None = None
    try:
        head = cluster.add_node(
            **node_args(args.cpus, args.object_store_mb),
            resources=node_resources(deployments, REPLICAS),
        )
        worker = cluster.add_node(
            **node_args(args.cpus, args.object_store_mb),
            resources=node_resources(deployments, 1),
        )
        cluster.wait_for_nodes()
        roles = {head.node_id: "head", worker.node_id: "worker"}
        report["nodes"] = {"head": head.node_id, "worker": worker.node_id}
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        # After the nodes and ray.init (each installs a handler of its own; the driver's aborts):
        # a SIGTERM, such as the test's on a timeout, unwinds through ``finally``, which shuts
        # Serve and every node down.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

        port = quiet_port()  # HAProxy binds it: outside the ephemeral range
        if args.elastic:
            # The elastic drill first, on the same two nodes (one cluster's start-up and
            # shutdown for both drills in the test suite): it deletes its applications after.
            from cluster.elastic import DrillOptions, drill_phases
            from graphs.deploy import start_serve
            from servecore.config_check import load_config

            start_serve(load_config(ROOT / "serve_config.yaml"), http_port=port)
            report["elastic"] = drill_phases(port, DrillOptions(), clean_up=True)
        started = time.monotonic()
        deploy(port, deployments, head.node_id, start=not args.elastic)
        report["deploy_s"] = round(time.monotonic() - started, 1)
        before = replica_placement(deployments)
        report["replicas_before"] = by_role(before, roles)
        report["replicas_on_worker_before"] = sum(n.get(worker.node_id, 0) for n in before.values())
        if report["replicas_on_worker_before"] == 0:
            report["error"] = "no replica was placed on the worker node: nothing to drill"
            return report

        load = Load(
            f"http://{HOST}:{port}/{APP}/v1/predict",
            args.clients,
            args.rate_per_client,
            args.max_requests,
        )
        load.start()
        # Kill only once requests flow end to end, so the kill lands on a serving system.
        warm_deadline = time.monotonic() + args.max_load_s / 4
        while load.served() < args.warmup_requests and time.monotonic() < warm_deadline:
            time.sleep(0.1)
        report["served_before_removal"] = load.served()

        killed_at = load.now()
        cluster.remove_node(worker, allow_graceful=False)
        report["removal_took_s"] = round(load.now() - killed_at, 2)

        recovered_at: float | None = None
        placement, states = before, {}
        timeline: list[dict[str, Any]] = []
        load_deadline = load.started + args.max_load_s
        recover_deadline = min(load_deadline, time.monotonic() + args.recover_timeout_s)
        while time.monotonic() < recover_deadline:
            placement = replica_placement(deployments)
            states = serve_replica_states(deployments)
            seen = summarize(placement, states, roles)
            if not timeline or timeline[-1]["deployments"] != seen:
                timeline.append({"after_s": round(load.now() - killed_at, 2), "deployments": seen})
            if is_recovered(placement, states, worker.node_id):
                recovered_at = load.now()
                break
            time.sleep(0.25)
        report["replicas_after"] = by_role(placement, roles)
        report["serve_states_after"] = states
        report["timeline"] = timeline
        report["recovered"] = recovered_at is not None
        report["reschedule_s"] = (
            None if recovered_at is None else round(recovered_at - killed_at, 2)
        )

        # Keep the load on the rescheduled replicas for a while, then stop.
        if recovered_at is not None:
            load.stop.wait(max(0.0, min(load_deadline - time.monotonic(), args.after_recovery_s)))
        load.join()
        outcomes = load.snapshot()
        failed = [o for o in outcomes if not o.final_ok]
        first_failed = [o for o in outcomes if not o.first_ok]
        after_removal = [o for o in outcomes if o.sent_s >= killed_at]
        report.update(
            ok=True,
            clients=args.clients,
            load_s=round(load.now(), 1),
            killed_at_s=round(killed_at, 2),
            requests=len(outcomes),
            in_flight_at_removal=sum(
                1 for o in outcomes if o.sent_s <= killed_at <= o.sent_s + o.took_s
            ),
            first_attempt_failures=len(first_failed),
            failures_after_retry=len(failed),
            served_after_removal=sum(1 for o in after_removal if o.final_ok),
            served_after_recovery=(
                0
                if recovered_at is None
                else sum(1 for o in outcomes if o.sent_s >= recovered_at and o.final_ok)
            ),
            slowest_request_s=round(max((o.took_s for o in outcomes), default=0.0), 2),
            slowest_after_removal_s=round(max((o.took_s for o in after_removal), default=0.0), 2),
            first_attempt_errors=dict(
                collections.Counter((o.first_error or "")[:120] for o in first_failed)
            ),
            final_errors=dict(collections.Counter((o.final_error or "")[:120] for o in failed)),
            live_nodes=wait_for_live_nodes(1, NODE_DEATH_TIMEOUT_S),
        )
        return report
    finally:
        if load is not None:
            load.join()
        try:
            if ray.is_initialized():
                serve.shutdown()
        except Exception:  # noqa: BLE001 - the cluster goes down next whatever Serve says
            logger.exception("serve.shutdown failed")
        ray.shutdown()
        cluster.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.node_failure_drill", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--clients", type=int, default=4, help="client threads (default: 4)")
    parser.add_argument(
        "--rate-per-client",
        type=float,
        default=5,
        help="requests per second per client, at most (default: 5)",
    )
    parser.add_argument(
        "--max-requests", type=int, default=2000, help="requests in all, at most (default: 2000)"
    )
    parser.add_argument(
        "--max-load-s", type=float, default=150, help="seconds of load, at most (default: 150)"
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=20,
        help="requests answered before the node is killed (default: 20)",
    )
    parser.add_argument(
        "--recover-timeout-s",
        type=float,
        default=120,
        help="seconds to wait for the replicas to be back (default: 120)",
    )
    parser.add_argument(
        "--after-recovery-s",
        type=float,
        default=5,
        help="seconds of load on the rescheduled replicas (default: 5)",
    )
    parser.add_argument("--cpus", type=float, default=2, help="logical CPUs per node (default: 2)")
    parser.add_argument(
        "--elastic",
        action="store_true",
        help="run python -m cluster.elastic's drill on the same cluster first",
    )
    parser.add_argument(
        "--object-store-mb", type=int, default=128, help="object store per node (default: 128)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    # Before any node starts, so every raylet and replica inherits them: the nodes listen on
    # 127.0.0.1 only (Ray would otherwise rewrite it to the machine's IP), this private cluster
    # needs no token, and replicas import tests.fixtures from the checkout.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    report = run_drill(args)
    print(json.dumps(report), flush=True)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m cluster.elastic``: elastic scaling on a local multi-node cluster, shown and measured.

Two nodes (``ray.cluster_utils.Cluster``, as ``python -m cluster.local`` starts them) run Serve as
shipped (HAProxy ingress on ports of their own). Each command prints one JSON line of facts (the
last line on stdout): ``tests/test_elastic.py`` judges the drill, ``make bench-autoscale`` saves
the ramp's.

``drill``: the intent application of ``serve_config.yaml``, its model group (``Pipeline``)
between its minimum and maximum replicas (one and two, as shipped), under a bounded closed-loop
load until it runs the maximum, then idle until it is back at one; every request through both
transitions is counted, and none may fail.
Then **scale to zero**: the breast-cancer application under another name, its model with
``min_replicas: 0`` and no replica; clients arrive while it has none (one of them half a second
into the cold start), and every one must get its answer; the cold start is timed, and the
deployment goes back to zero.

``ramp``: the same bounded open-loop ramp of arrivals against a deployment whose replicas have a
fixed capacity and a start-up time (:class:`FixedCostModel`: it stands for an accelerator-bound
model, whose replicas are independent servers; on this machine's two cores real model replicas
share the CPUs, so more of them cannot show more capacity), once per autoscaling policy: Serve's
default and :class:`servecore.autoscaling.LookAheadPolicy`. Reported: requests over the latency
objective and replica-seconds held.

    MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db python -m cluster.elastic drill
    python -m cluster.elastic ramp --output bench/results/autoscale-latest.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
HELD_STATES = ("STARTING", "RUNNING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")
"""Replica states that hold the replica's resources (what a replica-second costs)."""

logger = logging.getLogger("cluster.elastic")


# --- the cluster ------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_cluster(nodes: int = 2, cpus: float = 2, object_store_mb: int = 256) -> Iterator[int]:
    """A local cluster of ``nodes`` with Serve started as shipped; yields the HTTP port.

    Everything is shut down on the way out, a SIGTERM included (the tests' timeout sends one)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster.local import node_args
    from graphs.deploy import quiet_port, serve_env, start_serve
    from servecore.config_check import load_config

    # HAProxy on ports of its own: a test session or a served app may hold the defaults.
    os.environ.update(serve_env())
    cluster = Cluster()
    try:
        for _ in range(nodes):
            cluster.add_node(**node_args(cpus, object_store_mb))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        port = quiet_port()
        start_serve(load_config(ROOT / "serve_config.yaml"), http_port=port)
        yield port
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.shutdown()


_STATUS_LOCK = threading.Lock()
"""``serve.status()`` is not safe from two threads at once: it (de)registers a custom autoscaling
policy's module for pickling on a global (seen here: "is not registered for pickle by value")."""


def replica_states(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    with _STATUS_LOCK:
        status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    states = status.deployments[deployment].replica_states
    return {str(getattr(k, "value", k)): int(n) for k, n in states.items() if n}


def running(app: str, deployment: str) -> int:
    return replica_states(app, deployment).get("RUNNING", 0)


def held(app: str, deployment: str) -> int:
    return sum(n for state, n in replica_states(app, deployment).items() if state in HELD_STATES)


@dataclass
class Sampler:
    """Replica counts of one deployment, every ``period_s``, on a thread: the timeline and the
    replica-seconds held (replicas starting count: they hold their resources)."""

    app: str
    deployment: str
    period_s: float = 0.25
    started: float = field(default_factory=time.monotonic)
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def latest(self) -> tuple[float, int, int]:
        return self.samples[-1] if self.samples else (0.0, 0, 0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sample()  # the state it stopped on, whatever the period

    def _sample(self) -> None:
        with contextlib.suppress(Exception):
            now = time.monotonic() - self.started
            self.samples.append(
                (now, running(self.app, self.deployment), held(self.app, self.deployment))
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period_s)

    def replica_seconds(self, until_s: float | None = None) -> float:
        total = 0.0
        points = [s for s in self.samples if until_s is None or s[0] <= until_s]
        for (t0, _, held0), (t1, _, _) in zip(points, points[1:], strict=False):
            total += held0 * (t1 - t0)
        return total

    def timeline(self) -> list[dict[str, Any]]:
        """The samples where the counts changed."""
        changes: list[dict[str, Any]] = []
        for t, run, hold in self.samples:
            if not changes or (changes[-1]["running"], changes[-1]["held"]) != (run, hold):
                changes.append({"at_s": round(t, 2), "running": run, "held": hold})
        return changes


def wait_until(check: Callable[[], bool], timeout_s: float, period_s: float = 0.25) -> float | None:
    """Seconds until ``check()`` held, or ``None`` at the timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - started
        time.sleep(period_s)
    return None


# --- load -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    sent_s: float
    latency_s: float
    ok: bool
    error: str | None = None


@dataclass
class LoadLog:
    """Every request of a load run: nothing is dropped, failures keep their reason."""

    started: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> dict[str, Any]:
        from bench.loadgen import percentiles

        failed = self.failures()
        found = percentiles([o.latency_s for o in self.outcomes if o.ok])
        return {
            "requests": len(self.outcomes),
            "failed": len(failed),
            "errors": sorted({o.error or "?" for o in failed})[:5],
            **{k: None if v is None else round(v, 1) for k, v in found.items()},
        }


async def _send(client: Any, url: str, body: dict[str, Any], log: LoadLog) -> None:
    sent = log.now()
    try:
        response = await client.post(url, json=body)
        ok = response.status_code == 200
        error = None if ok else f"HTTP {response.status_code}: {response.text[:160]}"
    except Exception as e:  # noqa: BLE001 - every failure is counted with its reason
        ok, error = False, f"{type(e).__name__}: {e}"
    log.outcomes.append(Outcome(sent, log.now() - sent, ok, error))


async def closed_loop(
    url: str,
    body: Callable[[int], dict[str, Any]],
    clients: int,
    until: Callable[[], bool],
    max_requests: int,
    max_s: float,
    log: LoadLog,
) -> None:
    """``clients`` back-to-back senders until ``until()`` holds, ``max_requests`` or ``max_s``."""
    import httpx

    counter = iter(range(max_requests))
    deadline = time.monotonic() + max_s

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            if until():
                return
            n = next(counter, None)
            if n is None:
                return
            await _send(client, url, body(n), log)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60.0, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))


async def open_loop(
    url: str,
    body: Callable[[int], dict[str, Any]],
    rate_at: Callable[[float], float],
    duration_s: float,
    max_requests: int,
    log: LoadLog,
    seed: int = 7,
) -> None:
    """Poisson arrivals at ``rate_at(t)`` requests per second for ``duration_s`` (at most
    ``max_requests``); each request waits for its answer however long the system takes."""
    import httpx

    rng = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120.0, limits=limits, trust_env=False) as client:
        started = time.monotonic()
        t = 0.0
        n = 0
        while n < max_requests:
            rate = max(rate_at(t), 1e-6)
            t += rng.expovariate(rate)
            if t >= duration_s:
                break
            delay = started + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(client, url, body(n), log)))
            n += 1
        await asyncio.gather(*tasks)


# --- drill: up, down, and from zero -----------------------------------------------------------

SCALE_APP = "intent"
SCALE_DEPLOYMENT = "Pipeline"
ZERO_APP = "breast-cancer-cold"
FAST = {"metrics_interval_s": 0.5, "look_back_period_s": 2, "upscale_delay_s": 1}
"""Second-scale autoscaling reactions, so that a test sees every transition within a minute."""


def drill_config(max_replicas: int) -> dict[str, Any]:
    """Two applications of ``serve_config.yaml``: the intent application as shipped, its model
    group (``Pipeline``: every model stage, one CPU per replica) scaling between one and
    ``max_replicas`` with the gateway keeping as many graph calls in flight (one per replica at
    full scale, as shipped), and the breast-cancer application under another name, its model
    scaling from zero (a rarely used model)."""
    from servecore.config_check import find_app, load_config

    shipped = load_config(ROOT / "serve_config.yaml")
    intent = copy.deepcopy(find_app(shipped, "intent"))
    for deployment in intent["deployments"]:
        if deployment["name"] == "Gateway":
            deployment["user_config"]["max_concurrent_batches"] = max_replicas
        if deployment["name"] == SCALE_DEPLOYMENT:
            deployment["autoscaling_config"].update(
                max_replicas=max_replicas, downscale_delay_s=3, **FAST
            )
    cold = copy.deepcopy(find_app(shipped, "breast-cancer"))
    cold["name"] = ZERO_APP
    cold["route_prefix"] = f"/{ZERO_APP}"
    for deployment in cold["deployments"]:
        if deployment["name"] == "Model":
            deployment["autoscaling_config"] = {
                "min_replicas": 0,
                "initial_replicas": 0,
                "max_replicas": 1,
                "target_ongoing_requests": 1,
                "downscale_delay_s": 3,
                "downscale_to_zero_delay_s": 1,
                **FAST,
            }
    return {
        **{k: v for k, v in shipped.items() if k != "applications"},
        "applications": [intent, cold],
    }


def intent_body(n: int) -> dict[str, Any]:
    """A text no other request has: the gateway's cache cannot answer it without the model."""
    return {"texts": [f"please reset the password of account {n}, it is locked"]}


def cancer_body() -> Callable[[int], dict[str, Any]]:
    from training.breast_cancer import feature_names, load_frame

    frame = load_frame()
    columns = feature_names()
    rows = frame[columns].to_numpy().tolist()

    def body(n: int) -> dict[str, Any]:
        return {"dataframe_split": {"columns": columns, "data": [rows[n % len(rows)]]}}

    return body


def scale_up_and_down(port: int, args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/v1/predict"
    log = LoadLog()
    reached: dict[str, float] = {}
    with Sampler(SCALE_APP, SCALE_DEPLOYMENT) as sampler:

        def at_max_long_enough() -> bool:  # on the load's event loop: no Serve call here
            if sampler.latest()[1] >= args.max_replicas:
                reached.setdefault("at", log.now())
            return "at" in reached and log.now() - reached["at"] >= args.hold_s

        asyncio.run(
            closed_loop(
                url,
                intent_body,
                args.clients,
                at_max_long_enough,
                args.max_requests,
                args.max_load_s,
                log,
            )
        )
        load_stopped = log.now()
        down_s = wait_until(lambda: held(SCALE_APP, SCALE_DEPLOYMENT) == 1, args.down_timeout_s)
    return {
        "deployment": f"{SCALE_APP}/{SCALE_DEPLOYMENT}",
        "min_replicas": 1,
        "max_replicas": args.max_replicas,
        "clients": args.clients,
        "reached_max_s": None if "at" not in reached else round(reached["at"], 2),
        "load_s": round(load_stopped, 2),
        "back_to_min_s": None if down_s is None else round(down_s, 2),
        "peak_running": max((s[1] for s in sampler.samples), default=0),
        "timeline": sampler.timeline(),
        **log.summary(),
    }


def from_zero(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Clients arrive while the model has no replica; one more half a second into the cold start."""
    url = f"http://{HOST}:{port}/{ZERO_APP}/invocations"
    body = cancer_body()
    report: dict[str, Any] = {"replicas_before": held(ZERO_APP, "Model")}
    with Sampler(ZERO_APP, "Model", period_s=0.1) as sampler:
        report.update(_cold_start(url, body, args))
        back = wait_until(lambda: held(ZERO_APP, "Model") == 0, args.down_timeout_s)
    report["back_to_zero_s"] = None if back is None else round(back, 2)
    report["timeline"] = sampler.timeline()
    return report


def _cold_start(
    url: str, body: Callable[[int], dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    log = LoadLog()

    async def arrivals() -> None:
        import httpx

        async with httpx.AsyncClient(timeout=120.0, trust_env=False) as client:
            first = [_send(client, url, body(n), log) for n in range(args.cold_clients)]

            async def late() -> None:
                await asyncio.sleep(0.5)
                await _send(client, url, body(99), log)

            await asyncio.gather(*first, late())

    asyncio.run(arrivals())
    first_answer = min((o.sent_s + o.latency_s for o in log.outcomes if o.ok), default=None)
    late = [o.latency_s for o in log.outcomes if o.sent_s >= 0.4]
    return {
        **log.summary(),
        "cold_start_s": None if first_answer is None else round(first_answer, 2),
        "late_client_s": round(max(late), 2) if late else None,
        "replicas_after": held(ZERO_APP, "Model"),
    }


@dataclass
class DrillOptions:
    """The drill's knobs (the ``drill`` command's options)."""

    max_replicas: int = 2
    clients: int = 16
    hold_s: float = 1.0
    max_requests: int = 50_000
    max_load_s: float = 90.0
    down_timeout_s: float = 60.0
    cold_clients: int = 3


def drill_phases(port: int, options: Any, clean_up: bool = False) -> dict[str, Any]:
    """Up, down and from zero on a running Serve at ``port``; with ``clean_up``, the two
    applications are deleted after (a caller that drills more on the same cluster)."""
    from ray import serve

    from graphs.deploy import deploy

    started = time.monotonic()
    config = deploy(drill_config(options.max_replicas))
    report: dict[str, Any] = {"deploy_s": round(time.monotonic() - started, 1)}
    report["scale"] = scale_up_and_down(port, options)
    report["zero"] = from_zero(port, options)
    if clean_up:
        names = {app["name"] for app in config["applications"]}
        for name in names:
            serve.delete(name, _blocking=False)
        wait_until(lambda: not names & set(serve.status().applications), 120)
    return report


def run_drill(args: argparse.Namespace) -> dict[str, Any]:
    with serve_cluster(args.nodes, args.cpus) as port:
        return {**drill_phases(port, args), "ok": True}


# --- ramp: the default policy against the look-ahead one --------------------------------------


def build_fixed_cost_app(args: dict[str, Any]) -> Any:
    """:class:`FixedCostModel` alone, as its application's HTTP ingress (import path for a Serve
    config): HAProxy sends each request straight to the replica with the fewest connections."""
    from ray import serve

    @serve.deployment(name="FixedCostModel", max_ongoing_requests=32)
    class FixedCostModel:
        """A model replica with a fixed cost: ``startup_s`` to load, ``service_ms`` per request,
        one request at a time on a device of its own (a single worker thread: the next request
        starts the moment the last ends, whatever the replica's event loop is doing), no CPU used
        while it works. It stands for a replica whose model runs on an accelerator; the requests
        waiting for the device wait in the replica, where Serve counts them."""

        def __init__(self, startup_s: float, service_ms: float) -> None:
            from concurrent.futures import ThreadPoolExecutor

            time.sleep(startup_s)
            self.service_s = service_ms / 1000.0
            self.device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
            self.replica = serve.get_replica_context().replica_id.unique_id

        async def __call__(self, request: Any) -> dict[str, Any]:
            body = await request.json()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.device, time.sleep, self.service_s)
            return {"n": int(body.get("n", 0)), "replica": self.replica}

    return FixedCostModel.bind(float(args["startup_s"]), float(args["service_ms"]))


@dataclass(frozen=True)
class Ramp:
    """Arrivals from ``low`` to ``high`` per second over ``rise_s``, held ``hold_s``, then back to
    ``low`` for ``tail_s``; objective ``slo_ms`` on each request's latency."""

    low: float = 4.0
    high: float = 60.0
    rise_s: float = 30.0
    hold_s: float = 15.0
    tail_s: float = 15.0
    slo_ms: float = 300.0
    service_ms: float = 50.0
    startup_s: float = 6.0
    max_replicas: int = 4
    target_ongoing: float = 1.0
    """Requests per replica, in service and waiting: about 60% busy for these replicas (at 2,
    measured, Serve held three replicas at the 60 req/s peak, 100% busy, and the queue grew)."""

    @property
    def duration_s(self) -> float:
        return self.rise_s + self.hold_s + self.tail_s

    def rate_at(self, t: float) -> float:
        if t < self.rise_s:
            return self.low + (self.high - self.low) * t / self.rise_s
        if t < self.rise_s + self.hold_s:
            return self.high
        return self.low


POLICIES: dict[str, dict[str, Any] | None] = {
    "default": None,
    "look-ahead": {
        "policy_function": "servecore.autoscaling:LookAheadPolicy",
        "policy_kwargs": {"window_s": 8.0, "startup_s": 6.0},
    },
}


def fixed_cost_config(
    name: str,
    service_ms: float,
    startup_s: float,
    replicas: int | None = None,
    autoscaling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Serve config with one :func:`build_fixed_cost_app` application at ``/<name>``."""
    model: dict[str, Any] = {
        "name": "FixedCostModel",
        "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
    }
    if autoscaling is not None:
        model["autoscaling_config"] = autoscaling
    else:
        model["num_replicas"] = replicas or 1
    return {
        "applications": [
            {
                "name": name,
                "route_prefix": f"/{name}",
                "import_path": "cluster.elastic:build_fixed_cost_app",
                "args": {"startup_s": startup_s, "service_ms": service_ms},
                "deployments": [model],
            }
        ]
    }


def ramp_config(ramp: Ramp, policy: dict[str, Any] | None) -> dict[str, Any]:
    scaling: dict[str, Any] = {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": ramp.max_replicas,
        "target_ongoing_requests": ramp.target_ongoing,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 10,
    }
    if policy is not None:
        scaling["policy"] = policy
    return fixed_cost_config("ramp", ramp.service_ms, ramp.startup_s, autoscaling=scaling)


def run_ramp(port: int, ramp: Ramp, policy_name: str) -> dict[str, Any]:
    from ray import serve

    from graphs.deploy import deploy

    deploy(ramp_config(ramp, POLICIES[policy_name]))
    try:
        log = LoadLog()
        max_requests = int(ramp.high * ramp.duration_s * 2)
        url = f"http://{HOST}:{port}/ramp"
        with Sampler("ramp", "FixedCostModel") as sampler:
            asyncio.run(
                open_loop(url, lambda n: {"n": n}, ramp.rate_at, ramp.duration_s, max_requests, log)
            )
        over = sum(1 for o in log.outcomes if not o.ok or o.latency_s * 1000 > ramp.slo_ms)
        return {
            "policy": policy_name,
            "over_slo": over,
            "over_slo_share": round(over / max(1, len(log.outcomes)), 4),
            "replica_seconds": round(sampler.replica_seconds(ramp.duration_s), 1),
            "peak_replicas": max((s[2] for s in sampler.samples), default=0),
            "timeline": sampler.timeline(),
            **log.summary(),
        }
    finally:
        serve.delete("ramp")


def run_ramps(args: argparse.Namespace) -> dict[str, Any]:
    ramp = Ramp(high=args.high, startup_s=args.startup_s, slo_ms=args.slo_ms)
    capacity = 1000.0 / ramp.service_ms
    report: dict[str, Any] = {
        "ok": False,
        "ramp": asdict(ramp),
        "replica_capacity_rps": capacity,
        "replicas_needed_at_peak": math.ceil(ramp.high / capacity),
        "runs": [],
    }
    with serve_cluster(args.nodes, args.cpus) as port:
        for _ in range(args.repeats):
            for name in POLICIES:
                report["runs"].append(run_ramp(port, ramp, name))
    report["ok"] = True
    return report


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.elastic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=2)
    commands = parser.add_subparsers(dest="command", required=True)
    drill = commands.add_parser("drill", help="scale up, down and from zero, under load")
    defaults = DrillOptions()
    drill.add_argument("--max-replicas", type=int, default=defaults.max_replicas)
    drill.add_argument("--clients", type=int, default=defaults.clients)
    drill.add_argument("--hold-s", type=float, default=defaults.hold_s, help="load at full scale")
    drill.add_argument("--max-requests", type=int, default=defaults.max_requests)
    drill.add_argument("--max-load-s", type=float, default=defaults.max_load_s)
    drill.add_argument("--down-timeout-s", type=float, default=defaults.down_timeout_s)
    drill.add_argument("--cold-clients", type=int, default=defaults.cold_clients)
    ramp = commands.add_parser("ramp", help="default vs look-ahead autoscaling on one ramp")
    ramp.add_argument("--high", type=float, default=Ramp.high)
    ramp.add_argument("--startup-s", type=float, default=Ramp.startup_s)
    ramp.add_argument("--slo-ms", type=float, default=Ramp.slo_ms)
    ramp.add_argument("--repeats", type=int, default=1)
    ramp.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    report = run_drill(args) if args.command == "drill" else run_ramps(args)
    line = json.dumps(report)
    if getattr(args, "output", None):
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(line, flush=True)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

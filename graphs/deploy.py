"""Deploy a Serve config file from Python exactly as ``serve run CONFIG`` does (tests, benchmarks).

``serve.run(build_app(...))`` would ignore the config's ``deployments`` section (resources,
autoscaling, user_config); this path applies the whole file, so what is tested is what ships.
"""

from __future__ import annotations

import copy
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from servecore.config_check import load_config
from servecore.monitoring.telemetry import LATENCY_MS_BUCKETS

SERVE_ENV: dict[str, str] = {
    # HTTP goes from HAProxy straight to the gateway replica's own HTTP server, not through
    # Serve's Python proxy actor: 1.5 ms instead of 7.2 ms per request on a null deployment.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Ray's throughput profile: handle calls between deployments over gRPC instead of Ray actor
    # tasks, user code and the handle router on the replica's own event loop, GC frozen after
    # start-up. Measured here (one text per request): p50 at c=1 21.9 -> 16.8 ms, c=32 111 ->
    # 120 req/s; the gRPC transport is what counts (without it: 21.6 ms). README, Benchmarks.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... but request logs written at once (the profile buffers 1000 lines, which at low traffic
    # holds an access line for minutes) and replica logs still on stderr, so that `serve run`
    # shows them; neither changed the numbers above measurably.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
    # Serve's request-latency histograms with the buckets of the project's own latency metrics
    # (servecore.monitoring.telemetry): Ray exports a histogram's sum from its buckets' midpoints,
    # and its default buckets (1, 2, 5, 10, 20, 50 ms, ...) leave a 20 ms request anywhere in 20-50.
    "RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS": ",".join(f"{b:g}" for b in LATENCY_MS_BUCKETS),
    # A gateway replica that stops (app deleted, scaled down, replaced by a new version) keeps
    # its direct-ingress port open this long so that load balancers in front of it deregister
    # it first. Serve's 30 s default is sized for external ones (an ALB); here the only one in
    # front of that port is the HAProxy on the same node, which has the new backends within a
    # second (a long-poll update and a reload: 0.5 s in the logs). 5 s keeps a margin and takes
    # 25 s off every ingress replica's stop (a redeploy, `serve shutdown`, each test module).
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}
"""How every process of a Serve cluster of this project runs: in the environment of the process
that starts Ray (each Serve process reads these when it imports Serve). ``make serve`` exports
the same values (a test checks that they agree)."""

HAPROXY_PORT_VARIABLES = (
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
"""Fixed ports of Serve's HAProxy ingress (9101, 8404, 8500, 9500 by default) besides the HTTP
port: two clusters on one machine (a test session and a benchmark, say) would fight over them."""


def quiet_port(rng: random.Random | None = None) -> int:
    """A TCP port free on every address now and outside the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` may be handed out again once closed: Ray's own
    processes (workers, agents) draw theirs from that range, and one took HAProxy's metrics port
    between choosing it and HAProxy binding it, so HAProxy could not start (seen in CI). Below the
    range only explicit binds compete."""
    draw = rng or random.SystemRandom()
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = draw.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # noqa: S104 - a bind test; HAProxy binds the same
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below {low} after 200 tries")


def serve_env(port: Callable[[], int] = quiet_port) -> dict[str, str]:
    """:data:`SERVE_ENV` for a private cluster, with HAProxy's fixed ports moved to free ones
    (:func:`quiet_port` unless told otherwise)."""
    return {**SERVE_ENV, **{name: str(port()) for name in HAPROXY_PORT_VARIABLES}}


def start_serve(
    config: dict[str, Any], http_port: int | None = None, grpc_port: int | None = None
) -> None:
    """Start Serve on the connected Ray cluster with the config's HTTP and gRPC options."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    http_options = schema.http_options.model_dump()
    if http_port is not None:
        http_options["port"] = http_port
    grpc_options = schema.grpc_options.model_dump()
    if grpc_port is not None:
        grpc_options["port"] = grpc_port
    serve_api.serve_start(
        http_options=http_options,
        grpc_options=grpc_options,
        proxy_location=schema.proxy_location,
        global_logging_config=schema.logging_config,
    )


def deploy(config: dict[str, Any] | str | Path, timeout_s: float = 300.0) -> dict[str, Any]:
    """Deploy (or update in place) every application of a config and wait until all run.

    Returns the config used. Raises with Serve's own message when a deployment fails.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    data = load_config(config) if isinstance(config, str | Path) else copy.deepcopy(config)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(data), _blocking=False)
    wait_running([a["name"] for a in data["applications"]], timeout_s)
    return data


def wait_running(apps: list[str], timeout_s: float = 300.0) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = serve.status().applications
        states = {name: statuses.get(name) for name in apps}
        for name, state in states.items():
            if state is not None and state.status == ApplicationStatus.DEPLOY_FAILED:
                raise RuntimeError(f"application {name!r} failed to deploy: {state.message}")
        if all(s is not None and s.status == ApplicationStatus.RUNNING for s in states.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"applications {apps} not running after {timeout_s}s: {serve.status()}")


def wait_ready(
    base_url: str,
    timeout_s: float = 180.0,
    path: str = "/readyz",
    still_alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``path`` until it answers 200; ``still_alive`` raises if the server died meanwhile."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if still_alive is not None:
            still_alive()
        try:
            response = httpx.get(f"{base_url}{path}", timeout=15, trust_env=False)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready after {timeout_s}s: {last}")

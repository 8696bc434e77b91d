"""The served graph under load: a private Ray cluster in this process, the config deployed as
``serve run`` would, then the measured HTTP runs, then everything shut down again.

Ray is started with ``address="local"`` (never attaching to someone else's cluster), two CPUs, no
dashboard and free ports; it is stopped with ``serve.shutdown()`` and ``ray.shutdown()`` only.
Before each measured run the same load runs for a few seconds, and longer while the encoder's
autoscaler is still adding or removing replicas, so measurements see a settled replica set.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import (
    LOOPBACK,
    LoadResult,
    LoadSpec,
    TextCycler,
    free_port,
    measure,
    warm_up,
)
from bench.pipeline import APP_NAME, ENCODER

logger = logging.getLogger(__name__)

RAY_NUM_CPUS = 2
SETTLE_CHUNK_S = 2.0


@dataclass
class ServedGraph:
    base_url: str
    ray_session_dir: str

    @property
    def predict_url(self) -> str:
        return f"{self.base_url}/v1/predict"


@contextmanager
def serve_graph(config_path: str | Path) -> Iterator[ServedGraph]:
    """Start a private Ray cluster, deploy ``config_path`` and wait for ``/readyz``; shut all down
    on exit, also when deploying or measuring failed."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from graphs.deploy import haproxy_env

    # HTTP through HAProxy, as `make serve` runs it (before Ray starts: Serve reads it at import).
    os.environ.update(haproxy_env(free_port))
    import ray
    from ray import serve

    from graphs.deploy import deploy, start_serve, wait_ready
    from servecore.config_check import load_config

    config = load_config(config_path)
    started = time.perf_counter()
    context = ray.init(
        address="local",
        num_cpus=RAY_NUM_CPUS,
        include_dashboard=False,
        _metrics_export_port=free_port(),
        logging_level="WARNING",
        # Replica logs (an access line per request) stay in the session folder, not on stderr.
        log_to_driver=False,
    )
    try:
        session_dir = str(context.address_info.get("session_dir", "unknown"))
        logger.info("ray started (logs under %s)", session_dir)
        port = free_port()
        start_serve(config, http_port=port)
        base_url = f"http://{LOOPBACK}:{port}"
        deploy(config)
        wait_ready(base_url)
        logger.info(
            "graph deployed and ready at %s in %.0fs", base_url, time.perf_counter() - started
        )
        yield ServedGraph(base_url=base_url, ray_session_dir=session_dir)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            logger.info("serve and ray shut down")


def encoder_replicas(app: str = APP_NAME) -> dict[str, Any]:
    """The encoder deployment's status and replica count per state (``RUNNING``, ...)."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    status = deployments[ENCODER]
    return {
        "status": str(getattr(status.status, "value", status.status)),
        "replica_states": {str(k): int(v) for k, v in status.replica_states.items()},
    }


def _settled(replicas: dict[str, Any]) -> bool:
    states = replicas["replica_states"]
    return replicas["status"] == "HEALTHY" and set(states) <= {"RUNNING"}


def warm_settle_measure(
    graph: ServedGraph,
    spec: LoadSpec,
    texts: TextCycler,
    warmup_s: float,
    max_settle_s: float,
    label: str,
) -> tuple[LoadResult, dict[str, Any]]:
    """Warm up, keep the load on while the encoder autoscaler is still moving (at most
    ``max_settle_s`` more), then measure. Returns the result and the encoder replicas seen."""
    warm_up(graph.predict_url, spec, texts, warmup_s, label)
    settle_started = time.perf_counter()
    replicas = encoder_replicas()
    while not _settled(replicas) and time.perf_counter() - settle_started < max_settle_s:
        logger.info("%s: encoder not settled yet (%s); more warm-up", label, replicas)
        warm_up(graph.predict_url, spec, texts, SETTLE_CHUNK_S, label)
        replicas = encoder_replicas()
    if not _settled(replicas):
        logger.warning("%s: encoder still not settled, measuring anyway: %s", label, replicas)
    before_cpu = cpu_seconds_by_process()
    result = measure(graph.predict_url, spec, texts, label)
    cpu = cpu_breakdown(before_cpu, cpu_seconds_by_process(), max(result.ok, 1))
    after = encoder_replicas()
    if after != replicas:
        logger.warning(
            "%s: encoder replicas changed while measuring: %s → %s", label, replicas, after
        )
    return result, {"before": replicas, "after": after, "cpu_ms_per_request": cpu}


def _process_group(cmdline: str) -> str:
    """Name a process by its role in the served path."""
    if cmdline.startswith("ray::ServeReplica:"):
        return cmdline.split(":")[-1].split()[0]  # the deployment: Gateway, Encoder, ...
    if cmdline.startswith("ray::ProxyActor"):
        return "Serve proxy"
    if cmdline.startswith("ray::ServeController"):
        return "Serve controller"
    return "Ray control plane and other"


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """User+system CPU seconds of every process on the machine, with its role."""
    import psutil

    snapshot: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            times = process.cpu_times()
            cmdline = " ".join(process.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        group = "load generator" if process.info["pid"] == os.getpid() else _process_group(cmdline)
        snapshot[process.info["pid"]] = (group, times.user + times.system)
    return snapshot


def cpu_breakdown(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], requests: int
) -> dict[str, float]:
    """Milliseconds of CPU per request spent by each role during a measurement."""
    totals: dict[str, float] = {}
    for pid, (group, seconds) in after.items():
        spent = seconds - before.get(pid, (group, 0.0))[1]
        if spent > 0:
            totals[group] = totals.get(group, 0.0) + spent
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return {group: 1000.0 * seconds / requests for group, seconds in ranked}

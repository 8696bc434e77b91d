"""The MLflow store going away, at start-up and at run time, through real Serve over HTTP (issue 7).

The application is the real gateway and stage wrapper around the fake stages of
``tests/fixtures.py``, except the bag-of-words member: that one is the real stage class, loading
its registered model. Its replicas talk to a real MLflow tracking server
(``tests/mlflow_server.py``) over the session's registry, which the test starts and stops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from servecore.config_check import load_app_spec
from tests.conftest import ROOT, free_port
from tests.fixtures import delete_app, fake_graph
from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.serve, pytest.mark.slow]

APP = "outage"


@pytest.fixture(scope="module")
def store(registry) -> Iterator[MlflowServer]:
    server = MlflowServer(registry.tracking_uri, free_port())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def outage(serve_instance) -> Iterator[str]:

    yield f"{serve_instance.base_url}/{APP}"
    delete_app(APP)


def deploy(store: MlflowServer) -> None:
    from ray import serve

    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    bow = next(p for p in spec.stage_plans() if p.deployment == "BagOfWords")
    env = {
        "MLFLOW_TRACKING_URI": store.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # fail fast: the default retries for seconds
        "PYTHONPATH": str(ROOT),
    }
    options = {"num_cpus": 0, "num_gpus": 0, "runtime_env": {"env_vars": env}}
    graph = fake_graph(
        spec,
        {"BagOfWords": (bow.stage_class, bow.init_kwargs)},
        {"registry_poll_s": 1},
        options,
    )
    serve.run(graph, name=APP, route_prefix=f"/{APP}")


def deployment_messages() -> str:
    from ray import serve

    app = serve.status().applications[APP]
    return "\n".join([app.message, *(d.message for d in app.deployments.values())])


def predict(url: str) -> httpx.Response:
    texts = ["I was charged twice for my order", "reset my password please"]
    return httpx.post(
        f"{url}/v1/predict",
        json={"texts": texts},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    )


def test_an_unreachable_store_at_start_up_fails_the_deployment_clearly_and_is_not_ready(
    store, outage
):
    with pytest.raises(RuntimeError):
        deploy(store)  # nothing listens on the store's port yet
    messages = deployment_messages()
    assert f"the model registry at {store.uri} is unreachable" in messages, messages
    # Not ready, and not merely absent: Serve says why (a 404 would also be "not 200").
    ready = httpx.get(f"{outage}/readyz", timeout=10)
    assert ready.status_code == 503, ready.text
    assert "Gateway" in ready.text and "failed to deploy" in ready.text


def test_a_store_lost_at_run_time_leaves_the_loaded_models_serving(store, outage):
    store.start()
    deploy(store)
    assert httpx.get(f"{outage}/readyz", timeout=30).status_code == 200
    first = predict(outage)
    assert first.status_code == 200, first.text
    assert first.json()["predictions"][0]["label"] == "billing"  # the real bag-of-words spoke

    store.stop()
    for _ in range(5):
        response = predict(outage)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == first.json()["predictions"]
    assert httpx.get(f"{outage}/readyz", timeout=30).status_code == 200

    # An admin asking for the registry now gets a clear, retryable answer, not a 500 or a 422.
    reload = httpx.post(f"{outage}/v1/admin/reload", timeout=30)
    assert reload.status_code == 503
    assert reload.headers["retry-after"] == "5"
    error = reload.json()["error"]
    assert error["type"] == "registry_unavailable"
    assert f"the model registry at {store.uri} is unreachable" in error["message"]
    # The gateway's own poll (every second here) noticed too, and says so.
    models = wait_for_release_error(outage, lambda e: e is not None)
    assert "unreachable" in models["release_error"]

    store.start()
    wait_for_release_error(outage, lambda e: e is None)
    assert httpx.post(f"{outage}/v1/admin/reload", timeout=30).json()["switched"] == []


def wait_for_release_error(url: str, check, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    models: dict = {}
    while time.monotonic() < deadline:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        if check(models["release_error"]):
            return models
        time.sleep(0.3)
    raise AssertionError(f"release_error never got there: {models}")

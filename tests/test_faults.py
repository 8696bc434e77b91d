"""Failures inside the graph, injected into real Serve deployments: the caller gets a clean 503.

The graph is the real gateway and the real stage wrapper around fake stage classes
(``tests/fixtures.py``): no weights to load, so each variant deploys in seconds.
"""

from __future__ import annotations

import time

import httpx
import pytest

from servecore import LABELS
from servecore.config_check import load_app_spec
from tests.conftest import ROOT

pytestmark = pytest.mark.serve

APP = "faulty"
FAKES = {
    "Tokenizer": ("tests.fixtures:FakeTokenizer", {}),
    "Encoder": ("tests.fixtures:FakeEncoder", {}),
    "LinearHead": ("tests.fixtures:UniformModel", {}),
    "MLPHead": ("tests.fixtures:UniformModel", {}),
    "BagOfWords": ("tests.fixtures:UniformModel", {}),
}  # the Ensemble stays real


def deploy_fake_graph(overrides: dict[str, tuple[str, dict]], graph_timeout_s: float = 20.0):
    from ray import serve

    from deployments.gateway import Gateway
    from deployments.stage import Stage

    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    no_resources = {"num_cpus": 0, "num_gpus": 0}
    stages = {}
    for plan in spec.stage_plans():
        real = (plan.stage_class, plan.init_kwargs)
        stage_class, kwargs = overrides.get(plan.deployment, FAKES.get(plan.deployment, real))
        stages[plan.deployment] = Stage.options(
            name=plan.deployment, ray_actor_options=no_resources
        ).bind(stage_class, kwargs, plan.output_prefix)
    gateway = Gateway.options(
        name="Gateway",
        ray_actor_options=no_resources,
        user_config={"graph_timeout_s": graph_timeout_s},
    ).bind(spec.model_dump(), stages)
    serve.run(gateway, name=APP, route_prefix=f"/{APP}")


@pytest.fixture(scope="module")
def faulty(serve_instance):
    from ray import serve

    yield f"{serve_instance.base_url}/{APP}"
    serve.delete(APP)


def _predict(base_url: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/predict", json={"texts": ["hello", "world"]}, timeout=60)


def test_the_fake_graph_answers(faulty):
    deploy_fake_graph({})
    response = _predict(faulty)
    assert response.status_code == 200
    probabilities = response.json()["predictions"][0]["probabilities"]
    assert probabilities == pytest.approx({label: 1 / len(LABELS) for label in LABELS})


def test_a_failing_stage_gives_a_503_without_internal_details(faulty):
    deploy_fake_graph({"Ensemble": ("tests.fixtures:ErrorModel", {})})
    response = _predict(faulty)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "error": {
            "type": "model_unavailable",
            "message": "the model pipeline is unavailable; retry shortly",
            "request_id": response.headers["x-request-id"],
        }
    }
    assert "secret" not in response.text


def test_a_stage_past_the_deadline_gives_a_503_in_time(faulty):
    deploy_fake_graph({"LinearHead": ("tests.fixtures:SlowModel", {"seconds": 10.0})}, 1.0)
    started = time.monotonic()
    response = _predict(faulty)
    assert time.monotonic() - started < 8.0
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "model_unavailable"

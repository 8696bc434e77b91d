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
from tests.fixtures import fake_graph

pytestmark = pytest.mark.serve

APP = "faulty"


def deploy_fake_graph(
    overrides: dict[str, tuple[str, dict]],
    graph_timeout_s: float = 20.0,
    fallback: dict | None = None,
):
    from ray import serve

    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    config = {"graph_timeout_s": graph_timeout_s, "fallback": fallback or {}}
    serve.run(fake_graph(spec, overrides, config), name=APP, route_prefix=f"/{APP}")


@pytest.fixture(scope="module")
def faulty(serve_instance):
    from ray import serve

    yield f"{serve_instance.base_url}/{APP}"
    serve.delete(APP)


def _predict(base_url: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/predict", json={"texts": ["hello", "world"]}, timeout=60)


def _experiments(base_url: str) -> dict:
    return httpx.get(f"{base_url}/v1/experiments", timeout=10).json()


def _fallbacks(base_url: str) -> dict[str, int]:
    return _experiments(base_url)["fallback"]["fallbacks"]


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Counters grown since ``before`` (the gateway replica may outlive one test's deployment)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_the_fake_graph_answers(faulty):
    deploy_fake_graph({})
    response = _predict(faulty)
    assert response.status_code == 200
    probabilities = response.json()["predictions"][0]["probabilities"]
    assert probabilities == pytest.approx({label: 1 / len(LABELS) for label in LABELS})


def test_a_failing_stage_gives_a_503_without_internal_details_or_a_backup(faulty):
    deploy_fake_graph({"Ensemble": ("tests.fixtures:ErrorModel", {})})
    before = _fallbacks(faulty)
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
    # No fallback is configured: the backup model is not used and nothing counts as a fallback.
    assert _delta(_fallbacks(faulty), before) == {}


def test_a_stage_past_the_deadline_gives_a_clear_timeout_in_time(faulty):
    deploy_fake_graph({"LinearHead": ("tests.fixtures:SlowModel", {"seconds": 10.0})}, 1.0)
    started = time.monotonic()
    response = _predict(faulty)
    assert time.monotonic() - started < 8.0
    assert response.status_code == 504
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == {
        "type": "timeout",
        "message": "the model pipeline did not answer within 1s; retry shortly",
        "request_id": response.headers["x-request-id"],
    }


def test_a_late_primary_is_answered_by_the_backup_and_the_circuit_opens(faulty):
    fallback = {"stage": "BagOfWords", "deadline_s": 1.0, "failure_threshold": 2, "cooldown_s": 60}
    slow = {"LinearHead": ("tests.fixtures:SlowModel", {"seconds": 5.0})}
    deploy_fake_graph(slow, 20.0, fallback)
    before = _fallbacks(faulty)
    for _ in range(2):
        started = time.monotonic()
        response = _predict(faulty)
        assert time.monotonic() - started < 4.0
        assert response.status_code == 200
        body = response.json()
        assert body["degraded"] is True
        assert body["degraded_reason"] == "the primary pipeline missed its 1s deadline"
        assert body["models"] == []  # the fake backup has no registered model to name
    # Two misses in a row: the primary is not even called during the cool-down.
    started = time.monotonic()
    body = _predict(faulty).json()
    assert time.monotonic() - started < 1.0
    assert body["degraded"] and body["degraded_reason"].startswith("circuit open")
    report = _experiments(faulty)["fallback"]
    assert _delta(report["fallbacks"], before) == {"deadline": 2, "circuit_open": 1}
    assert report["circuit"]["state"] == "open" and report["circuit"]["times_opened"] == 1


def test_a_failing_primary_is_answered_by_the_backup_marked_degraded(faulty):
    fallback = {"stage": "BagOfWords", "deadline_s": 5.0, "failure_threshold": 100}
    deploy_fake_graph({"Ensemble": ("tests.fixtures:ErrorModel", {})}, 20.0, fallback)
    before = _fallbacks(faulty)
    response = _predict(faulty)
    assert response.status_code == 200
    body = response.json()
    assert body["degraded"] is True
    assert body["degraded_reason"].startswith("the primary pipeline failed")
    assert "secret" not in response.text
    probabilities = body["predictions"][0]["probabilities"]
    assert probabilities == pytest.approx({label: 1 / len(LABELS) for label in LABELS})
    assert _delta(_fallbacks(faulty), before) == {"error": 1}

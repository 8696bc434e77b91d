"""The shipped application over real HTTP through the Serve proxy, with the real MiniLM.

One deployment of ``serve_config.yaml`` serves the whole module (deleted afterwards); the batching
test changes live knobs and puts the shipped ones back.
"""

from __future__ import annotations

import base64
import concurrent.futures

import httpx
import numpy as np
import pytest

from servecore import LABELS
from servecore.dataset import load_split
from tests.conftest import ROOT

pytestmark = pytest.mark.serve

STAGES = ["Tokenizer", "Encoder", "LinearHead", "MLPHead", "BagOfWords"]


@pytest.fixture(scope="module")
def client(intent_app):
    with httpx.Client(base_url=intent_app, timeout=60) as c:
        yield c


def test_predict_names_labels_probabilities_versions_and_request_id(client):
    texts = ["I was charged twice for my order", "my parcel never arrived", "reset my password"]
    response = client.post("/v1/predict", json={"texts": texts})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert [p["label"] for p in body["predictions"]] == ["billing", "delivery", "account_access"]
    for prediction in body["predictions"]:
        assert list(prediction["probabilities"]) == list(LABELS)
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert [m["stage"] for m in body["models"]] == STAGES
    assert {(m["name"], m["version"]) for m in body["models"]} == {
        ("intent-encoder", "1"),
        ("intent-head-linear", "1"),
        ("intent-head-mlp", "1"),
        ("intent-bow", "1"),
    }


def test_caller_request_id_is_kept(client):
    response = client.post(
        "/v1/predict", json={"texts": ["hello"]}, headers={"X-Request-ID": "trace-abc-123"}
    )
    assert response.headers["x-request-id"] == "trace-abc-123"
    assert response.json()["request_id"] == "trace-abc-123"


def test_served_accuracy_matches_the_bootstrap_evaluation(client, registry):
    texts, labels = load_split("test")
    predicted = []
    for i in range(0, len(texts), 64):
        response = client.post("/v1/predict", json={"texts": texts[i : i + 64]})
        assert response.status_code == 200
        predicted += [p["label"] for p in response.json()["predictions"]]
    accuracy = float(np.mean(np.array(predicted) == np.array(labels)))
    assert accuracy == pytest.approx(registry.results["ensemble"]["test_accuracy"], abs=1 / 210)


def test_embeddings_follow_the_openai_shape(client, minilm):
    texts = ["where is my parcel", "I want a refund"]
    response = client.post("/v1/embeddings", json={"input": texts, "model": "intent-encoder"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["model"] == "intent-encoder"
    assert [d["index"] for d in body["data"]] == [0, 1]
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    tokenizer, encoder = minilm
    local = encoder(tokenizer({"text": np.array(texts, dtype=object)}))
    np.testing.assert_allclose(vectors, local["embedding"], atol=1e-5)
    assert body["usage"]["prompt_tokens"] == int(local["num_tokens"].sum())
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]

    single = client.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(single.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-6)


def test_torch_threads_match_the_granted_cpus(intent_app):
    from ray import serve

    from servecore.config_check import load_config

    deployments = load_config(ROOT / "serve_config.yaml")["applications"][0]["deployments"]
    cpus = {d["name"]: d["ray_actor_options"]["num_cpus"] for d in deployments}
    for name in ("Encoder", "LinearHead", "BagOfWords"):
        described = serve.get_deployment_handle(name, "intent").describe.remote().result()
        assert described["torch_threads"] == max(1, round(cpus[name])), (name, described)


def test_models_health_and_docs(client):
    models = client.get("/v1/models").json()
    assert [m["stage"] for m in models["models"]] == STAGES
    assert all("champion" in m["aliases"] for m in models["models"])
    assert models["ensemble_weights"] == {"linear": 0.35, "mlp": 0.35, "bow": 0.30}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/docs").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


BAD_PREDICT = [
    ({"texts": []}, 422, "texts: List should have at least 1 item after validation, not 0"),
    (
        {"texts": ["x"] * 65},
        422,
        "texts: List should have at most 64 items after validation, not 65",
    ),
    ({"texts": [1]}, 422, "texts.0: Input should be a valid string"),
    ({"texts": [""]}, 422, "texts.0: String should have at least 1 character"),
    ({"texts": ["   "]}, 422, "texts.0: Value error, text must not be blank"),
    ({"texts": ["x" * 2001]}, 422, "texts.0: String should have at most 2000 characters"),
    ({"texts": "hello"}, 422, "texts: Input should be a valid list"),
    ({"text": ["hi"]}, 422, "texts: Field required; text: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_PREDICT)
def test_bad_predict_input_gets_an_exact_4xx(client, body, status, message):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == status
    assert response.json() == {
        "error": {
            "type": "validation_error",
            "message": message,
            "request_id": response.headers["x-request-id"],
        }
    }


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error_type", "message"),
    [
        ("POST", "/v1/predict",
         {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
         "invalid_json", "request body is not valid JSON"),
        ("POST", "/v1/predict", {}, 422, "validation_error", "body: Field required"),
        ("POST", "/v1/predict", {"json": [1, 2]}, 422, "validation_error",
         "body: Input should be a valid dictionary or object to extract fields from"),
        ("POST", "/v1/embeddings", {"json": {"input": "hi", "model": "gpt-4"}}, 404,
         "model_not_found", "model 'gpt-4' is not served here; use 'intent-encoder'"),
        ("POST", "/v1/embeddings", {"json": {"input": "hi", "dimensions": 100}}, 422,
         "validation_error",
         "dimensions: this encoder only produces 384-dimensional embeddings"),
        ("POST", "/v1/embeddings", {"json": {"input": []}}, 422, "validation_error",
         "input: Input should be a valid string; input: List should have at least 1 item "
         "after validation, not 0"),
        ("GET", "/v1/nowhere", {}, 404, "not_found", "Not Found"),
        ("GET", "/v1/predict", {}, 405, "method_not_allowed", "Method Not Allowed"),
    ],
)  # fmt: skip
def test_other_bad_requests_get_the_one_error_shape(
    client, method, path, kwargs, status, error_type, message
):
    response = client.request(method, path, **kwargs)
    assert response.status_code == status
    assert response.json() == {
        "error": {
            "type": error_type,
            "message": message,
            "request_id": response.headers["x-request-id"],
        }
    }


def _concurrent_predicts(base_url: str, n: int) -> list[int]:
    """``n`` one-text predictions at once, past the response cache (they must reach the models)."""

    def one(i: int) -> int:
        return httpx.post(
            f"{base_url}/v1/predict",
            json={"texts": [f"where is my order number {i}"]},
            headers={"Cache-Control": "no-cache"},
            timeout=60,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_encoder_batches_concurrent_requests_and_knobs_change_live(intent_app):
    """With gateway coalescing off, the encoder's own @serve.batch must gather concurrent calls;
    then a user_config change applies to the same replica without a restart."""
    from ray import serve

    from graphs.deploy import deploy
    from servecore.config_check import load_config

    shipped = load_config(ROOT / "serve_config.yaml")
    config = load_config(ROOT / "serve_config.yaml")
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    deployments["Gateway"]["user_config"] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    encoder_options = deployments["Encoder"]
    encoder_options["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    encoder_options["user_config"] = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    encoder = serve.get_deployment_handle("Encoder", "intent")
    try:
        deploy(config)
        before = encoder.describe.remote().result()
        encoder.batch_stats.remote(reset=True).result()
        assert _concurrent_predicts(intent_app, 32) == [200] * 32
        stats = encoder.batch_stats.remote().result()
        assert stats["max_calls_per_batch"] > 1, stats

        encoder_options["user_config"] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
        deploy(config)
        after = encoder.describe.remote().result()
        assert after["replica"] == before["replica"]  # reconfigured in place, not restarted
        assert after["batching"] == {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
        encoder.batch_stats.remote(reset=True).result()
        assert _concurrent_predicts(intent_app, 16) == [200] * 16
        assert encoder.batch_stats.remote().result()["max_calls_per_batch"] == 1
    finally:
        deploy(shipped)


def test_gateway_coalesces_single_text_requests(intent_app):
    """The ensemble gets one call per graph call: more rows than calls proves the gateway merged
    requests (the ensemble's own @serve.batch would only add calls)."""
    from ray import serve

    ensemble = serve.get_deployment_handle("Ensemble", "intent")
    ensemble.batch_stats.remote(reset=True).result()
    assert _concurrent_predicts(intent_app, 32) == [200] * 32
    stats = ensemble.batch_stats.remote().result()
    assert stats["mean_rows_per_batch"] > stats["mean_calls_per_batch"], stats


def test_coalesced_callers_each_get_their_own_answer(client, intent_app):
    texts, _ = load_split("test")
    texts = texts[:24]
    alone = {}
    for text in texts:
        alone[text] = client.post("/v1/predict", json={"texts": [text]}).json()["predictions"][0]

    def one(text: str) -> dict:
        response = httpx.post(f"{intent_app}/v1/predict", json={"texts": [text]}, timeout=60)
        assert response.status_code == 200
        return response.json()["predictions"][0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(texts)) as pool:
        together = dict(zip(texts, pool.map(one, texts), strict=True))
    for text in texts:
        assert together[text]["label"] == alone[text]["label"], text
        for label, p in alone[text]["probabilities"].items():
            assert together[text]["probabilities"][label] == pytest.approx(p, abs=1e-5)

"""Observability of the shipped application over real HTTP: request ids in every deployment's JSON
log, the prediction log read back with Ray Data, live drift against the reference profile stored
in MLflow by the Ray Data reference job, and every model-level metric on the Prometheus endpoint.

One deployment serves the module: the shipped config with every request sampled, a small drift
window, an A/B split with a shadow and a fallback stage, so that each metric family has traffic.
The drift test uses the held-out test split (in domain) and ``tests/data/out_of_domain.txt``
(written for this test; the models never saw either).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from servecore.dataset import load_split
from servecore.telemetry import CATALOGUE, exported_name
from tests.conftest import ROOT, STAGES

pytestmark = pytest.mark.serve

OUT_OF_DOMAIN = [
    line.strip()
    for line in (ROOT / "tests" / "data" / "out_of_domain.txt").read_text().splitlines()
    if line.strip()
]
WINDOW = 100
GATEWAY = {
    "monitoring": {"sample_rate": 1.0, "flush_interval_s": 0.2},
    "experiment": {
        "variants": [
            {"name": "a", "alias": "champion", "weight": 1},
            {"name": "b", "alias": "champion", "weight": 1},
        ]
    },
    "shadow": {"variant": "b", "fraction": 1.0},
    "fallback": {"stage": "BagOfWords"},
}
MONITOR = {
    "drift": {"window_size": WINDOW, "min_samples": 50},
    "prediction_log": {"enabled": True, "text": "hash"},
    "embed_interval_s": 0.2,
}


def app_config(log_dir: Path, gateway: dict[str, Any] | None = None) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["runtime_env"] = {
        "env_vars": {"INTENT_SERVING_PREDICTION_LOG_DIR": str(log_dir), "PYTHONPATH": str(ROOT)}
    }
    for deployment in app["deployments"]:
        if deployment["name"] == "Gateway":
            deployment["user_config"].update(gateway or GATEWAY)
        if deployment["name"] == "Monitor":
            deployment["user_config"].update(MONITOR)
    return config


@pytest.fixture(scope="module")
def reference(serve_instance, registry) -> str | None:
    """The champion release's drift reference profile, computed by the Ray Data job the
    bootstrap runs (the session registry is bootstrapped without it)."""
    from batch.reference import ensure_reference

    texts, labels = load_split("train")
    return ensure_reference(ROOT / "serve_config.yaml", "intent", texts, labels)


@pytest.fixture(scope="module")
def app(serve_instance, reference, tmp_path_factory):
    from ray import serve

    from graphs.deploy import deploy, wait_ready

    log_dir = tmp_path_factory.mktemp("predictions")
    config = app_config(log_dir)
    deploy(config)
    wait_ready(serve_instance.base_url)
    yield {"url": serve_instance.base_url, "log_dir": log_dir, "config": config}
    serve.delete("intent")


@pytest.fixture(scope="module")
def client(app):
    with httpx.Client(base_url=app["url"], timeout=60, trust_env=False) as c:
        yield c


def predict(client: httpx.Client, texts: list[str], **headers: str) -> dict[str, Any]:
    response = client.post("/v1/predict", json={"texts": texts}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def send(client: httpx.Client, texts: list[str], per_request: int = 10) -> None:
    for i in range(0, len(texts), per_request):
        predict(client, texts[i : i + per_request], **{"Cache-Control": "no-cache"})


def drift_when(client: httpx.Client, ready, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        report = client.get("/v1/monitoring/drift").json()
        if ready(report):
            return report
        time.sleep(0.3)
    raise AssertionError(f"drift report never got there: {report}")


def monitor_flush() -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("Monitor", "intent").flush.remote().result(timeout_s=60)


def serve_log_lines(request_id: str) -> dict[str, list[dict[str, Any]]]:
    """Per deployment, the JSON log lines of its replicas that mention ``request_id``."""
    import ray

    folder = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    found: dict[str, list[dict[str, Any]]] = {}
    for path in folder.glob("replica_intent_*.log"):
        deployment = path.name.removeprefix("replica_intent_").split("_", 1)[0]
        for line in path.read_text(errors="replace").splitlines():
            if request_id in line:
                found.setdefault(deployment, []).append(json.loads(line))
    return found


def test_a_request_id_is_in_the_json_logs_of_every_deployment_that_served_it(client, app):
    request_id = f"obs-{uuid.uuid4()}"
    response = client.post(
        "/v1/predict",
        json={"texts": ["my parcel is three days late"]},
        headers={"X-Request-ID": request_id, "Cache-Control": "no-cache", "X-User-Key": "u1"},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    assert response.json()["request_id"] == request_id
    wanted = {"Gateway", *STAGES}
    deadline = time.monotonic() + 20
    while True:
        found = serve_log_lines(request_id)
        if wanted <= set(found) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert wanted <= set(found), f"no line with the request id from {wanted - set(found)}"
    for deployment in wanted:
        for line in found[deployment]:
            assert line["request_id"] == request_id
            assert line["deployment"] == f"intent_{deployment}"
            assert {"levelname", "message", "replica"} <= set(line)


def test_sampled_predictions_are_logged_hashed_and_ray_data_reads_them(client, app):
    import ray.data

    texts = [f"where is my order number {n}, it was due on monday" for n in range(7)]
    answers = [predict(client, texts[:4]), predict(client, texts[4:])]
    ids = {a["request_id"] for a in answers}
    drift_when(client, lambda r: r["pending"] == 0 and r["records"].get("logged", 0) >= 7)
    closed = monitor_flush()
    assert closed["folder"] == str(app["log_dir"])

    rows = ray.data.read_json(str(app["log_dir"]), file_extensions=["jsonl"]).take_all()
    mine = [r for r in rows if r["request_id"] in ids]
    assert len(mine) == 7
    by_hash = {r["text_hash"]: r for r in mine}
    expected = {
        t: p
        for a, part in zip(answers, (texts[:4], texts[4:]), strict=True)
        for t, p in zip(part, a["predictions"], strict=True)
    }
    for text, prediction in expected.items():
        row = by_hash["sha256:" + hashlib.sha256(text.encode()).hexdigest()]
        assert "text" not in row
        assert row["label"] == prediction["label"]
        for label, p in prediction["probabilities"].items():
            assert abs(row["probabilities"][label] - p) < 1e-6
        assert row["models"]["Encoder"] == "intent-encoder/1"
        assert row["latency_ms"] > 0 and row["variant"] in ("a", "b")
        assert row["cached"] is False and row["degraded"] is False
    assert not list(Path(app["log_dir"]).glob("*.part"))


def test_held_out_texts_raise_no_alarm_and_out_of_domain_texts_do(client, app):
    test_texts, _ = load_split("test")
    send(client, test_texts)
    report = drift_when(client, lambda r: r["pending"] == 0 and r.get("window") == WINDOW)
    assert report["status"] == "ok", report
    assert report["alarm"] is False
    assert report["signals"]["embedding"]["score"] < 0.2
    assert report["reference"]["encoder"] == "models:/intent-encoder/1"
    assert report["reference"]["rows"] == 840

    send(client, OUT_OF_DOMAIN + OUT_OF_DOMAIN[: WINDOW - len(OUT_OF_DOMAIN)])
    report = drift_when(client, lambda r: r["pending"] == 0 and r["alarm"])
    assert report["status"] == "drift"
    embedding = report["signals"]["embedding"]
    assert embedding["alarm"] is True and embedding["score"] > 0.6
    assert embedding["live_median"] < embedding["reference_median"]


def scrape(port: int) -> dict[str, float]:
    """Family → the largest sample value of any of its series (histograms: ``_count``)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    largest: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith("ray_intent_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        largest[name] = max(largest.get(name, 0.0), value)
    return largest


def test_every_model_metric_family_is_exported_with_traffic(client, app, serve_instance):
    from graphs.deploy import deploy

    test_texts, _ = load_split("test")
    send(client, test_texts[:60])
    predict(client, test_texts[:5])  # cache hits
    # Fallbacks: a primary deadline nobody can meet, then the shipped one back.
    slow = {**GATEWAY, "fallback": {"stage": "BagOfWords", "deadline_s": 0.001}}
    deploy(app_config(app["log_dir"], slow))
    deadline = time.monotonic() + 30
    while not predict(client, ["the app crashes on start"], **{"Cache-Control": "no-cache"})[
        "degraded"
    ]:
        assert time.monotonic() < deadline, "the new fallback deadline never applied"
    deploy(app["config"])
    job = client.post("/v1/jobs", json={"texts": ["refund my return", "reset my password"]})
    assert job.status_code == 202
    send(client, OUT_OF_DOMAIN * 2)

    wanted = {
        exported_name(spec) + ("_count" if spec.kind == "histogram" else ""): spec
        for spec in CATALOGUE
    }
    deadline = time.monotonic() + 90
    while True:
        found = scrape(serve_instance.metrics_port)
        missing = sorted(name for name in wanted if found.get(name, 0.0) <= 0)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"families without a non-zero value: {missing}"

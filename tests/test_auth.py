"""The API-key guard on a small FastAPI app (unit tests of one class: no Ray, no Serve).

The gateway installs the same middleware; ``tests/test_faults.py``-style Serve tests cover it
end to end.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from servecore.api.auth import (
    ApiKey,
    Guard,
    KeyRing,
    LimitsConfig,
    TokenBucket,
    hash_key,
    main,
    presented_key,
    required_scope,
    route_path,
)
from servecore.api.http_errors import error_response, install_error_handlers

PREDICT_KEY = "isk_predict-only-key"
OPS_KEY = "isk_ops-key-with-everything"
KEYS = [
    ApiKey(name="web", hash=hash_key(PREDICT_KEY), scopes=("predict",)),
    ApiKey(name="ops", hash=hash_key(OPS_KEY), scopes=("predict", "jobs", "admin")),
]


def make_app(keys: list[ApiKey], limits: LimitsConfig | None = None) -> tuple[TestClient, Any]:
    state = SimpleNamespace(ring=KeyRing(keys), limits=limits or LimitsConfig())
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        body = await request.json()
        return {"caller": request.state.caller, "texts": len(body["texts"])}

    @app.post("/v1/jobs")
    async def jobs(request: Request) -> dict:
        return {"caller": request.state.caller, "bytes": len(await request.body())}

    @app.get("/v1/experiments")
    async def experiments() -> dict:
        return {"ok": True}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    app.add_middleware(
        Guard, keyring=lambda: state.ring, limits=lambda: state.limits, render=error_response
    )
    return TestClient(app), state


def error(response) -> dict:
    return response.json()["error"]


def test_scopes_of_routes():
    assert required_scope("/healthz") == "open"
    assert required_scope("/readyz") == "open"
    assert required_scope("/v1/predict") == "predict"
    assert required_scope("/v1/embeddings") == "predict"
    assert required_scope("/v1/models") == "predict"
    assert required_scope("/v1/jobs/abc") == "jobs"
    assert required_scope("/v1/experiments") == "admin"
    assert required_scope("/v1/monitoring/drift") == "admin"
    assert required_scope("/v1/rollouts") == "admin"
    assert required_scope("/v1/rollouts/abc/abort") == "admin"
    assert required_scope("/v1/feedback") == "predict"
    assert required_scope("/docs") is None


def test_without_keys_everything_is_open_to_anonymous_and_not_rate_limited():
    client, _ = make_app([], LimitsConfig(rate_per_s=0.5, burst=1))
    response = client.post("/v1/predict", json={"texts": ["a"]})
    assert response.json() == {"caller": "anonymous", "texts": 1}
    assert [client.get("/v1/experiments").status_code for _ in range(3)] == [200] * 3


def test_missing_and_unknown_keys_get_401_with_the_error_shape():
    client, _ = make_app(KEYS)
    response = client.post("/v1/predict", json={"texts": ["a"]}, headers={"X-Request-ID": "r1"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="intent-serving"'
    assert response.json() == {
        "error": {
            "type": "unauthorized",
            "message": "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            "request_id": "r1",
        }
    }
    wrong = client.post("/v1/predict", json={"texts": ["a"]}, headers={"X-API-Key": "isk_nope"})
    assert wrong.status_code == 401 and error(wrong)["message"] == "unknown API key"
    assert "isk_nope" not in wrong.text
    assert client.get("/healthz").status_code == 200  # health stays open
    assert client.get("/docs").status_code == 401  # everything else needs a key


def test_a_key_works_as_bearer_or_header_within_its_scopes_only():
    client, _ = make_app(KEYS)
    for headers in ({"Authorization": f"Bearer {PREDICT_KEY}"}, {"X-API-Key": PREDICT_KEY}):
        response = client.post("/v1/predict", json={"texts": ["a", "b"]}, headers=headers)
        assert response.json() == {"caller": "web", "texts": 2}
    denied = client.post("/v1/jobs", content=b"{}", headers={"X-API-Key": PREDICT_KEY})
    assert denied.status_code == 403
    assert error(denied)["type"] == "forbidden"
    assert error(denied)["message"] == "this key may not use /v1/jobs: it needs the 'jobs' scope"
    assert client.get("/v1/experiments", headers={"X-API-Key": PREDICT_KEY}).status_code == 403
    assert client.get("/v1/experiments", headers={"X-API-Key": OPS_KEY}).status_code == 200
    jobs = client.post("/v1/jobs", content=b"{}", headers={"Authorization": f"bearer {OPS_KEY}"})
    assert jobs.json()["caller"] == "ops"


def test_the_proxys_override_headers_are_refused_on_every_route_keys_or_not():
    for keys in ([], KEYS):
        client, _ = make_app(keys)
        for header, value in (
            ("X-Request-Timeout-Seconds", "0"),
            ("x-request-disconnect-disabled", "?1"),
        ):
            for method, path in (("POST", "/v1/predict"), ("GET", "/healthz")):
                response = client.request(
                    method,
                    path,
                    json={"texts": ["a"]},
                    headers={header: value, "X-API-Key": OPS_KEY},
                )
                assert response.status_code == 400, (keys, header, path)
                assert error(response)["type"] == "reserved_header"
                assert header.lower() in error(response)["message"]


def test_route_paths_drop_the_apps_mount_prefix():
    assert route_path({"path": "/secured/healthz", "root_path": "/secured"}) == "/healthz"
    assert route_path({"path": "/v1/predict", "root_path": ""}) == "/v1/predict"
    assert route_path({"path": "/secured", "root_path": "/secured"}) == "/"


def test_presented_key_parsing():
    assert presented_key({b"authorization": b"Bearer  abc "}) == "abc"
    assert presented_key({b"authorization": b"Basic abc"}) is None
    assert presented_key({b"x-api-key": b"xyz"}) == "xyz"
    assert presented_key({}) is None


def test_each_key_has_its_own_token_bucket_and_429_says_when_to_retry():
    client, _ = make_app(KEYS, LimitsConfig(rate_per_s=0.5, burst=2))
    headers = {"X-API-Key": PREDICT_KEY}
    codes = [client.post("/v1/predict", json={"texts": ["a"]}, headers=headers).status_code]
    codes.append(client.post("/v1/predict", json={"texts": ["a"]}, headers=headers).status_code)
    limited = client.post("/v1/predict", json={"texts": ["a"]}, headers=headers)
    assert codes == [200, 200] and limited.status_code == 429
    assert error(limited)["type"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    other = client.post("/v1/predict", json={"texts": ["a"]}, headers={"X-API-Key": OPS_KEY})
    assert other.status_code == 200  # another key, another bucket


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=2, updated=0.0)
    assert [bucket.take(0.0), bucket.take(0.0)] == [0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0  # one token back after 1/rate seconds
    assert bucket.take(10.0) == 0.0 and bucket.tokens == pytest.approx(1.0)  # capped at burst


def test_bodies_over_the_limit_get_413_announced_or_streamed():
    client, _ = make_app([], LimitsConfig(max_body_bytes=1024, max_job_body_bytes=4096))
    big = json.dumps({"texts": ["x" * 2000]})
    response = client.post("/v1/predict", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert error(response)["type"] == "payload_too_large"
    assert error(response)["message"] == "request body over 1024 bytes"

    def chunks():  # no Content-Length: the guard counts what arrives
        for _ in range(3):
            yield b"x" * 600

    streamed = client.post("/v1/predict", content=chunks())
    assert streamed.status_code == 413
    assert client.post("/v1/jobs", content=b"y" * 3000).json()["bytes"] == 3000  # jobs: 4 KiB
    assert client.post("/v1/jobs", content=b"y" * 5000).status_code == 413


def test_the_cli_prints_a_key_once_and_an_entry_that_recognises_it(capsys):
    assert main(["new", "batch-team", "--scopes", "predict,jobs", "--rate-per-s", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].rsplit(" ", 1)[1]
    entry = ApiKey.model_validate(json.loads(out[2]))
    assert key.startswith("isk_") and key not in out[2]
    assert entry.scopes == ("predict", "jobs") and entry.rate_per_s == 5
    assert KeyRing([entry]).identify(key) == entry
    assert KeyRing([entry]).identify(key + "x") is None


def test_key_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        KeyRing([KEYS[0], KEYS[0]])

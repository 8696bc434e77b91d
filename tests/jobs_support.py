"""Job test helpers: an app config with its own job settings, polling, a webhook receiver."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from tests.conftest import PIPELINE_GROUP, ROOT

SECRET = "test-webhook-secret"


def jobs_env(folder: Path, broker_url: str | None = None) -> dict[str, str]:
    """Job settings for one test app: its own store, broker folder, data folder, webhook key."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    env = {
        "INTENT_SERVING_JOBS_DIR": str(folder),
        "INTENT_SERVING_JOBS_DATA_DIR": str(data),
        "INTENT_SERVING_WEBHOOK_SECRET": SECRET,
        "INTENT_SERVING_WEBHOOK_ALLOW": "127.0.0.0/8",
    }
    if broker_url is not None:
        env["INTENT_SERVING_JOBS_BROKER_URL"] = broker_url
    return env


def store_url(env: dict[str, str]) -> str:
    return f"sqlite:///{Path(env['INTENT_SERVING_JOBS_DIR']) / 'jobs.db'}"


FAST_RUNNER = {
    "lease_s": 3.0,
    "requeue_after_s": 5.0,
    "reap_interval_s": 0.5,
    "webhook_backoff_s": 0.2,
}
"""Runner knobs that make crash recovery and webhook retries take seconds, not minutes."""


def jobs_config(path: Path, gateway: dict[str, Any] | None = None) -> Path:
    """The shipped config with fast runner knobs, for an app whose replicas already have the job
    settings (the session sets them before Ray starts). Only ``user_config`` and the pipeline
    group's ``max_replicas`` differ from the shipped file, so applying it to the running app
    reconfigures replicas without a restart."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    for deployment in app["deployments"]:
        if deployment["name"] == "JobRunner":
            # The autoscaling policy is left alone: Serve counts a deployment's policy (kwargs
            # included) in the app's code version, so changing it would restart every replica.
            # Serve's controller has the session's env too, so the policy finds the same store.
            deployment["user_config"].update(FAST_RUNNER)
        if deployment["name"] == "Gateway":
            deployment["user_config"].update(gateway or {})
        if deployment["name"] == PIPELINE_GROUP:
            # One pipeline replica (one CPU): the other CPU stays free for dataset jobs' Ray Data.
            deployment["autoscaling_config"].update(max_replicas=1)
    path.write_text(yaml.safe_dump(config))
    return path


def wait_job(url: str, job_id: str, timeout_s: float = 120.0, headers=None) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until the job is finished; returns its last state."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["state"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} not finished after {timeout_s}s: {body}")


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Hooks(http.server.BaseHTTPRequestHandler):
    """Records every POST; answers ``fail_first`` requests with 500 before answering 200."""

    received: list[tuple[dict[str, str], bytes]]
    fail_first: int

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        cls.received.append((dict(self.headers), body))
        self.send_response(500 if len(cls.received) <= cls.fail_first else 200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@contextmanager
def webhook_receiver(fail_first: int = 0) -> Iterator[tuple[str, type[Hooks]]]:
    """A real HTTP server on 127.0.0.1 collecting callbacks; yields (url, handler class)."""
    handler = type("Receiver", (Hooks,), {"received": [], "fail_first": fail_first})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/jobs", handler
    finally:
        server.shutdown()
        server.server_close()


def online(url: str, texts: list[str]) -> list[dict]:
    """What ``/v1/predict`` answers for ``texts`` (64 at a time, cache bypassed)."""
    out = []
    for start in range(0, len(texts), 64):
        response = httpx.post(
            f"{url}/v1/predict",
            json={"texts": texts[start : start + 64]},
            headers={"Cache-Control": "no-cache"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        out += response.json()["predictions"]
    return out


def assert_same_answers(job_predictions: list[dict], expected: list[dict]) -> None:
    assert [p["label"] for p in job_predictions] == [p["label"] for p in expected]
    got = np.array([list(p["probabilities"].values()) for p in job_predictions])
    want = np.array([list(p["probabilities"].values()) for p in expected])
    np.testing.assert_allclose(got, want, atol=1e-5)

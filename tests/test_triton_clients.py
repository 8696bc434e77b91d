"""The real Triton clients (``tritonclient.http`` and ``tritonclient.grpc`` 2.73, from their own
environment) against the shipped application, unchanged: health, metadata, inference compared with
``/v1/predict``, a pinned version, the repository index and errors as the protocol's own.
The same clients against an application with API keys: ``tests/test_security.py``."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from servecore import LABELS
from tests.clients import run_triton_check
from tests.conftest import ServeInstance

pytestmark = pytest.mark.serve

TEXTS = ["I was charged twice for my order", "where is my parcel", "reset my password"]


def test_triton_http_and_grpc_clients_get_what_v1_answers(
    intent_app, serve_instance: ServeInstance
):
    expected = httpx.post(f"{intent_app}/v1/predict", json={"texts": TEXTS}, timeout=60).json()
    want_labels = [p["label"] for p in expected["predictions"]]
    want_probs = [[p["probabilities"][k] for k in LABELS] for p in expected["predictions"]]
    report = run_triton_check(
        f"127.0.0.1:{serve_instance.http_port}", serve_instance.grpc_target, "intent", TEXTS
    )
    for protocol in ("http", "grpc"):
        seen = report[protocol]
        assert seen["live"] == {"ok": True, "value": True}, protocol
        assert seen["ready"] == {"ok": True, "value": True}, protocol
        assert seen["metadata"]["value"] == {
            "name": "intent",
            "outputs": [["label", "BYTES", [-1]], ["probabilities", "FP32", [-1, 6]]],
        }, protocol
        answer = seen["infer"]["value"]
        assert answer["label"] == want_labels, protocol
        assert answer["probabilities_dtype"] == "float32"
        np.testing.assert_allclose(answer["probabilities"], want_probs, atol=1e-6)
        pinned = seen["infer_version"]["value"]
        np.testing.assert_allclose(np.sum(pinned["probabilities"], axis=1), 1.0, atol=1e-5)
        assert (
            "intent:READY" in seen["index"]["value"]
            and "intent-encoder:READY" in seen["index"]["value"]
        )
    assert report["http"]["unknown_version"] == {
        "ok": False,
        "status": "404",
        "message": "model 'intent-head-linear' has no version '99'",
    }
    assert report["grpc"]["unknown_version"] == {
        "ok": False,
        "status": "StatusCode.NOT_FOUND",
        "message": "model 'intent-head-linear' has no version '99'",
    }
    assert report["http"]["blank_text"] == {
        "ok": False,
        "status": "400",
        "message": "input 'text'[0]: text must not be blank",
    }
    assert report["grpc"]["blank_text"] == {
        "ok": False,
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "input 'text'[0]: text must not be blank",
    }

"""Open Inference Protocol v2 against the shipped application: REST with httpx and gRPC with the
project's own stubs (the real clients, ``tritonclient``, run in ``tests/test_triton_clients.py``).

Answers are compared with ``/v1/predict`` and ``/v1/embeddings`` of the same deployment; errors are
asserted in the protocol's exact shapes: ``{"error": "<message>"}`` with its HTTP status over REST,
a status code with the message as details over gRPC.
"""

from __future__ import annotations

import json
import struct

import grpc
import httpx
import numpy as np
import pytest

from servecore import LABELS
from tests.conftest import ServeInstance

pytestmark = pytest.mark.serve

TEXTS = ["I was charged twice for my order", "where is my parcel"]
MODELS = ["intent", "intent-encoder", "intent-head-linear", "intent-head-mlp", "intent-bow"]


@pytest.fixture(scope="module")
def client(intent_app):
    with httpx.Client(base_url=intent_app, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(intent_app, serve_instance: ServeInstance):
    from servecore.api.proto import inference_pb2_grpc

    with grpc.insecure_channel(serve_instance.grpc_target) as channel:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)


APP = (("application", "intent"),)


def v1(client: httpx.Client, texts: list[str]) -> dict:
    response = client.post("/v1/predict", json={"texts": texts})
    assert response.status_code == 200, response.text
    return response.json()


def infer_body(texts: list[str], **extra) -> dict:
    return {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    } | extra


def test_server_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json() == {
        "name": "intent-serving",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "model_repository"],
    }


def test_model_metadata_names_inputs_outputs_and_label_order(client):
    meta = client.get("/v2/models/intent").json()
    assert meta == {
        "name": "intent",
        "versions": ["champion"],
        "platform": "ray-serve",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [-1, 6],
                "parameters": {"labels": ",".join(LABELS)},
            },
        ],
    }
    encoder = client.get("/v2/models/intent-encoder/versions/1").json()
    assert encoder["versions"] == ["1"]
    assert encoder["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert client.get("/v2/models/intent-head-mlp/ready").json() == {
        "name": "intent-head-mlp",
        "ready": True,
    }


def test_infer_json_matches_v1_and_echoes_the_request_id(client):
    expected = v1(client, TEXTS)
    response = client.post("/v2/models/intent/infer", json=infer_body(TEXTS, id="req-7"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "intent" and body["model_version"] == "champion"
    assert body["id"] == "req-7"
    assert body["parameters"]["labels"] == ",".join(LABELS)
    assert body["parameters"]["variant"] == "champion"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [2],
        "data": [p["label"] for p in expected["predictions"]],
    }
    assert outputs["probabilities"]["shape"] == [2, 6]
    probs = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(2, 6)
    want = np.array([[p["probabilities"][k] for k in LABELS] for p in expected["predictions"]])
    np.testing.assert_allclose(probs, want, atol=1e-6)


def test_infer_binary_input_and_outputs(client):
    """Triton's binary tensor extension both ways, as ``tritonclient.http`` sends it by default."""
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = client.post(
        "/v2/models/intent/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    size = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:size])
    assert [o["name"] for o in meta["outputs"]] == ["probabilities"]
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 2 * 6 * 4}
    probs = np.frombuffer(response.content[size:], dtype="<f4").reshape(2, 6)
    expected = v1(client, TEXTS)["predictions"]
    np.testing.assert_allclose(
        probs, [[p["probabilities"][k] for k in LABELS] for p in expected], atol=1e-6
    )


def test_encoder_and_member_models_and_pinned_versions(client):
    embedded = client.post("/v2/models/intent-encoder/infer", json=infer_body(TEXTS)).json()
    vectors = np.array(embedded["outputs"][0]["data"], dtype=np.float32).reshape(2, 384)
    openai = client.post("/v1/embeddings", json={"input": TEXTS}).json()
    np.testing.assert_allclose(vectors, [d["embedding"] for d in openai["data"]], atol=1e-5)
    assert embedded["model_version"] == "1"

    pinned = client.post("/v2/models/intent-head-linear/versions/1/infer", json=infer_body(TEXTS))
    assert pinned.status_code == 200, pinned.text
    head = pinned.json()
    assert head["model_version"] == "1"
    assert "LinearHead=intent-head-linear/1" in head["parameters"]["models"]
    probs = np.array(head["outputs"][1]["data"]).reshape(2, 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert head["outputs"][0]["data"] == [LABELS[i] for i in probs.argmax(axis=1)]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        ("GET", "/v2/models/nope", {}, 404, "unknown model 'nope'; models: " + str(MODELS)),
        (
            "POST",
            "/v2/models/intent-head-linear/versions/99/infer",
            {"json": infer_body(TEXTS)},
            404,
            "model 'intent-head-linear' has no version '99'",
        ),
        (
            "GET",
            "/v2/models/intent/versions/blue",
            {},
            404,
            "model 'intent' has no version 'blue'; its versions are the A/B variants ['champion']",
        ),
        (
            "POST",
            "/v2/models/intent/infer",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "request body is not valid JSON",
        ),
        (
            "POST",
            "/v2/models/intent/infer",
            {"json": {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1]}]}},
            400,
            "input 'text' must have datatype BYTES, not 'FP32'",
        ),
        (
            "POST",
            "/v2/models/intent/infer",
            {
                "json": {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]
                }
            },
            400,
            "input 'text': shape [3] holds 3 elements, the data 1",
        ),
        (
            "POST",
            "/v2/models/intent/infer",
            {"json": infer_body(["ok"], outputs=[{"name": "logits"}])},
            400,
            "model 'intent' has no output 'logits'; outputs: ['label', 'probabilities']",
        ),
        (
            "POST",
            "/v2/models/intent/infer",
            {"json": infer_body(["hi"] * 65)},
            413,
            "input 'text': 65 texts, at most 64 per request",
        ),
        (
            "POST",
            "/v2/models/intent/infer",
            {"json": infer_body(["  "])},
            400,
            "input 'text'[0]: text must not be blank",
        ),
    ],
)
def test_errors_are_the_protocols_shape(client, method, path, kwargs, status, message):
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json() == {"error": message}


def test_repository_index_lists_every_model_with_its_state(client):
    # A pinned version is loaded on first use and stays among the replica's loaded versions.
    pinned = client.post("/v2/models/intent-head-mlp/versions/1/infer", json=infer_body(TEXTS))
    assert pinned.status_code == 200, pinned.text
    index = client.post("/v2/repository/index").json()
    assert sorted({entry["name"] for entry in index}) == sorted(MODELS)
    for entry in index:
        assert entry["state"] == "READY", entry
    assert {"name": "intent", "version": "champion", "state": "READY"} in index


def _raw_bytes(texts: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


def grpc_infer(stub, texts: list[str], model: str = "intent", version: str = "", **fields):
    from servecore.api.proto import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, model_version=version, id="g-1")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    request.raw_input_contents.append(_raw_bytes(texts))
    for key, value in fields.items():
        setattr(request, key, value)
    return stub.ModelInfer(request, metadata=APP, timeout=60)


def test_grpc_answers_match_v1(client, stub):
    from servecore.api.proto import inference_pb2 as pb

    assert stub.ServerLive(pb.ServerLiveRequest(), metadata=APP).live
    assert stub.ServerReady(pb.ServerReadyRequest(), metadata=APP).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="intent"), metadata=APP)
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [
        ("label", "BYTES", [-1]),
        ("probabilities", "FP32", [-1, 6]),
    ]
    answer = grpc_infer(stub, TEXTS)
    assert answer.id == "g-1" and answer.model_version == "champion"
    assert answer.parameters["labels"].string_param == ",".join(LABELS)
    labels = [b.decode() for b in _split_bytes(answer.raw_output_contents[0])]
    probs = np.frombuffer(answer.raw_output_contents[1], dtype="<f4").reshape(2, 6)
    expected = v1(client, TEXTS)["predictions"]
    assert labels == [p["label"] for p in expected]
    np.testing.assert_allclose(
        probs, [[p["probabilities"][k] for k in LABELS] for p in expected], atol=1e-6
    )


def _split_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return items


def test_grpc_errors_are_status_codes_with_the_message(stub):
    from servecore.api.proto import inference_pb2 as pb

    cases = [
        (
            lambda: grpc_infer(stub, TEXTS, model="nope"),
            grpc.StatusCode.NOT_FOUND,
            "unknown model 'nope'; models: " + str(MODELS),
        ),
        (
            lambda: grpc_infer(stub, TEXTS, model="intent-bow", version="42"),
            grpc.StatusCode.NOT_FOUND,
            "model 'intent-bow' has no version '42'",
        ),
        (
            lambda: grpc_infer(stub, [" "]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'text'[0]: text must not be blank",
        ),
        (
            lambda: grpc_infer(stub, ["x"] * 65),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "input 'text': 65 texts, at most 64 per request",
        ),
        (
            lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="intent"), metadata=APP),
            grpc.StatusCode.INVALID_ARGUMENT,
            "expected one input, 'text'; got 0",
        ),
    ]
    for call, code, message in cases:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert (raised.value.code(), raised.value.details()) == (code, message)

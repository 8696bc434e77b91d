"""Drive a served application with the real Triton clients and print what they saw, as JSON.

Runs in the clients' own environment (``.venv-clients``, not the server's): the test that starts it
(``tests/test_triton_clients.py``) compares the observations with ``/v1/predict`` and the
protocol's expected errors. Usage::

    .venv-clients/bin/python tests/clients/triton_check.py --http 127.0.0.1:8000 \
        --grpc 127.0.0.1:9000 --app intent [--key isk_...] --text "where is my parcel" ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def observe(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"ok": True, "value": call()}
    except InferenceServerException as e:
        return {"ok": False, "status": str(e.status()), "message": e.message()}


def text_input(module: Any, texts: list[str]) -> Any:
    tensor = module.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def answer(result: Any) -> dict[str, Any]:
    labels = result.as_numpy("label")
    probabilities = result.as_numpy("probabilities")
    return {
        "label": [x.decode() for x in labels.tolist()],
        "probabilities": probabilities.astype(float).tolist(),
        "probabilities_dtype": str(probabilities.dtype),
    }


def check(module: Any, client: Any, texts: list[str], given: dict[str, str]) -> dict[str, Any]:
    # A fresh dict per call: tritonclient.http adds its own headers to the one it is handed.
    found: dict[str, Any] = {}
    found["live"] = observe(lambda: client.is_server_live(headers=dict(given)))
    found["ready"] = observe(lambda: client.is_model_ready("intent", headers=dict(given)))
    found["metadata"] = observe(
        lambda: _metadata(client.get_model_metadata("intent", headers=dict(given)))
    )
    found["infer"] = observe(
        lambda: answer(client.infer("intent", [text_input(module, texts)], headers=dict(given)))
    )
    found["infer_version"] = observe(
        lambda: answer(
            client.infer(
                "intent-head-linear",
                [text_input(module, texts)],
                model_version="1",
                headers=dict(given),
            )
        )
    )
    found["unknown_version"] = observe(
        lambda: client.infer(
            "intent-head-linear",
            [text_input(module, texts)],
            model_version="99",
            headers=dict(given),
        )
    )
    found["blank_text"] = observe(
        lambda: client.infer("intent", [text_input(module, [" "])], headers=dict(given))
    )
    found["index"] = observe(lambda: _index(client.get_model_repository_index(headers=dict(given))))
    return found


def _metadata(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):  # gRPC: a protobuf message
        from google.protobuf.json_format import MessageToDict

        meta = MessageToDict(meta, preserving_proto_field_name=True)
    return {
        "name": meta["name"],
        "outputs": [
            (o["name"], o["datatype"], [int(s) for s in o["shape"]]) for o in meta["outputs"]
        ],
    }


def _index(index: Any) -> list[str]:
    if not isinstance(index, list):
        index = [{"name": m.name, "state": m.state} for m in index.models]
    return sorted({f"{m['name']}:{m['state']}" for m in index})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", required=True, help="host:port[/route-prefix]")
    parser.add_argument("--grpc", required=True, help="host:port")
    parser.add_argument("--app", required=True, help="the Serve application (gRPC metadata)")
    parser.add_argument("--key", help="an API key to send as 'Authorization: Bearer'")
    parser.add_argument("--text", action="append", required=True)
    args = parser.parse_args()
    auth = {"authorization": f"Bearer {args.key}"} if args.key else {}
    report: dict[str, Any] = {}
    with httpclient.InferenceServerClient(args.http, network_timeout=60) as client:
        report["http"] = check(httpclient, client, args.text, auth)
        if args.key:
            report["http_without_key"] = observe(
                lambda: client.infer("intent", [text_input(httpclient, args.text)])
            )
    with grpcclient.InferenceServerClient(args.grpc) as client:
        grpc_headers = {"application": args.app, **auth}
        report["grpc"] = check(grpcclient, client, args.text, grpc_headers)
        if args.key:
            report["grpc_without_key"] = observe(
                lambda: client.infer(
                    "intent", [text_input(grpcclient, args.text)], headers={"application": args.app}
                )
            )
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()

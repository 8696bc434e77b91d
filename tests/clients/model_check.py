"""Drive a generic model application with the real Triton clients and print what they saw, as
JSON: for each protocol (HTTP, gRPC) the model's metadata, its answer for the rows given (one
FP64 tensor per column, as the model's metadata names them; binary data over HTTP) and its
repository index.

Runs in the clients' own environment (``.venv-clients``); ``tests/test_any_model.py`` compares the
answers with ``mlflow.pyfunc`` in process. Usage::

    .venv-clients/bin/python tests/clients/model_check.py --http 127.0.0.1:8000/fraud \
        --grpc 127.0.0.1:9000 --app fraud --model fraud --rows rows.json [--version 2]
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
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def observe(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"ok": True, "value": call()}
    except InferenceServerException as e:
        return {"ok": False, "status": str(e.status()), "message": e.message()}


def _plain(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):  # gRPC: a protobuf message
        from google.protobuf.json_format import MessageToDict

        meta = MessageToDict(meta, preserving_proto_field_name=True)
    return meta


def inputs_for(module: Any, meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[Any]:
    tensors = []
    for spec in meta["inputs"]:
        datatype = spec["datatype"]
        values = [row[spec["name"]] for row in rows]
        if datatype == "BYTES":
            array = np.array([str(v).encode() for v in values], dtype=object)
        else:
            array = np.array(values, dtype=triton_to_np_dtype(datatype))
        tensor = module.InferInput(spec["name"], [len(rows)], datatype)
        if module is httpclient:
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def answer(result: Any, meta: dict[str, Any]) -> dict[str, Any]:
    response = _plain(result.get_response())
    found: dict[str, Any] = {"model_version": response.get("model_version")}
    for output in response.get("outputs", []):
        values = result.as_numpy(output["name"])
        if values.dtype == object:
            found[output["name"]] = [v.decode() for v in values.reshape(-1).tolist()]
        else:
            found[output["name"]] = values.tolist()
    return found


def check(module: Any, client: Any, args: argparse.Namespace, rows: list[dict[str, Any]]) -> Any:
    headers = {"application": args.app} if module is grpcclient else {}
    version = args.version or ""
    found: dict[str, Any] = {}
    found["ready"] = observe(lambda: client.is_model_ready(args.model, headers=dict(headers)))
    meta = _plain(client.get_model_metadata(args.model, headers=dict(headers)))
    found["metadata"] = meta
    found["infer"] = observe(
        lambda: answer(
            client.infer(
                args.model,
                inputs_for(module, meta, rows),
                model_version=version,
                headers=dict(headers),
            ),
            meta,
        )
    )
    missing = {"inputs": meta["inputs"][1:]}
    found["missing_input"] = observe(
        lambda: client.infer(args.model, inputs_for(module, missing, rows), headers=dict(headers))
    )
    index = client.get_model_repository_index(headers=dict(headers))
    if not isinstance(index, list):
        index = [{"name": m.name, "version": m.version, "state": m.state} for m in index.models]
    found["index"] = index
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", required=True, help="host:port[/route-prefix]")
    parser.add_argument("--grpc", required=True, help="host:port")
    parser.add_argument("--app", required=True, help="the Serve application (gRPC metadata)")
    parser.add_argument("--model", required=True, help="the model's OIP name")
    parser.add_argument("--rows", required=True, help="a JSON file: a list of row objects")
    parser.add_argument("--version", default=None, help="a registered version to pin")
    args = parser.parse_args()
    with open(args.rows, encoding="utf-8") as f:
        rows = json.load(f)
    report: dict[str, Any] = {}
    with httpclient.InferenceServerClient(args.http, network_timeout=60) as client:
        report["http"] = check(httpclient, client, args, rows)
    with grpcclient.InferenceServerClient(args.grpc) as client:
        report["grpc"] = check(grpcclient, client, args, rows)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()

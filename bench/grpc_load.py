"""Closed-loop gRPC load for the OIP v2 ``ModelInfer`` RPC, with the same bounds, counting and
result as the HTTP load generator (:mod:`bench.loadgen`): a fixed number of clients on one
``grpc.aio`` channel, each sending requests back to back until the request count or the time
bound is reached. A status other than OK, or an answer without one label per text, is an error.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any
from urllib.parse import urlparse

from bench.loadgen import LoadResult, LoadSpec, TextCycler, _Run, check_loopback

SCHEME = "grpc://"
"""A load target ``grpc://127.0.0.1:9000/<application>`` is driven over gRPC."""


def _request(texts: list[str], model: str) -> Any:
    from servecore.api.proto import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    encoded = [t.encode() for t in texts]
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in encoded))
    return request


def _labels(response: Any) -> int:
    """Labels in the ``label`` output (a ``KeyError`` when there is none)."""
    for index, output in enumerate(response.outputs):
        if output.name == "label":
            raw, count, offset = response.raw_output_contents[index], 0, 0
            while offset < len(raw):
                (size,) = struct.unpack_from("<I", raw, offset)
                offset += 4 + size
                count += 1
            return count
    raise KeyError("no 'label' output")


async def _client(stub: Any, run: _Run, metadata: tuple[tuple[str, str], ...], model: str) -> None:
    import grpc

    while (texts := run.next_request()) is not None:
        started = time.perf_counter()
        try:
            response = await stub.ModelInfer(
                _request(texts, model), metadata=metadata, timeout=run.spec.timeout_s
            )
        except grpc.aio.AioRpcError as e:
            run.fail(e.code().name, e.details() or "")
            continue
        latency = time.perf_counter() - started
        try:
            answers = _labels(response)
        except KeyError as e:
            run.fail("bad-body", repr(e))
            continue
        if answers != len(texts):
            run.fail("bad-body", f"expected {len(texts)} labels, got {answers}")
            continue
        run.statuses["OK"] += 1
        run.latencies.append(latency)


async def _run_load(target: str, spec: LoadSpec, texts: TextCycler, model: str) -> LoadResult:
    import grpc

    from servecore.api.proto import inference_pb2_grpc

    check_loopback(target)
    parsed = urlparse(target)
    run = _Run(spec, texts)
    # gRPC metadata keys are lower-case; the application is the URL's path.
    metadata = tuple((k.lower(), v) for k, v in run.headers.items())
    metadata += (("application", parsed.path.strip("/")),)
    async with grpc.aio.insecure_channel(parsed.netloc) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        started = time.perf_counter()
        run.deadline = started + spec.max_seconds
        await asyncio.gather(
            *(_client(stub, run, metadata, model) for _ in range(spec.concurrency))
        )
        elapsed = time.perf_counter() - started
    return run.result(elapsed)


def run_grpc_load(
    target: str, spec: LoadSpec, texts: TextCycler, model: str = "intent"
) -> LoadResult:
    """Drive ``ModelInfer`` of ``model`` at ``target`` (``grpc://host:port/<application>``)."""
    return asyncio.run(_run_load(target, spec, texts, model))

"""Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), through Serve's gRPC
ingress: Serve calls the ingress deployment's method named after the RPC, so the gateway inherits
:class:`InferenceServicer` and these methods are this front.

API keys come as metadata (``authorization: Bearer <key>`` or ``x-api-key``), checked and rate
limited by the same :func:`servecore.api.auth.admit` as HTTP, on one rate budget per caller.
``x-user-key`` and ``cache-control: no-cache`` mean what the HTTP headers mean. Errors are gRPC
status codes with the message as details: ``UNAUTHENTICATED``, ``PERMISSION_DENIED``,
``INVALID_ARGUMENT``, ``NOT_FOUND``, ``RESOURCE_EXHAUSTED`` (rate or size limits),
``UNAVAILABLE`` (retry), ``DEADLINE_EXCEEDED``; anything unexpected is ``INTERNAL`` with no
details beyond "internal error" (it is logged here).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from ray.serve.grpc_util import RayServegRPCContext

from servecore.api import context, oip
from servecore.api.auth import Denial, admit
from servecore.api.proto import inference_pb2 as pb
from servecore.errors import InvalidRequest, PayloadTooLarge, ServingError
from servecore.signature import RawTensor

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""The HTTP status of a :class:`~servecore.errors.ServingError` → its gRPC code."""


def _metadata(grpc_context: RayServegRPCContext) -> dict[str, str]:
    return {k.lower(): v for k, v in grpc_context.invocation_metadata() if isinstance(v, str)}


def _presented_key(metadata: dict[str, str]) -> str | None:
    auth = metadata.get("authorization", "").strip()
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return metadata.get("x-api-key", "").strip() or None


def _fail(grpc_context: RayServegRPCContext, code: grpc.StatusCode, message: str, empty: T) -> T:
    grpc_context.set_code(code)
    grpc_context.set_details(message)
    return empty


async def _guarded(
    grpc_context: RayServegRPCContext,
    rpc: str,
    empty: T,
    call: Callable[[dict[str, str]], Awaitable[T]],
    open_call: bool = False,
) -> T:
    """Check the caller's key (unless ``open_call``), run ``call`` with the metadata and turn
    every error into a status code on ``grpc_context`` (``empty`` is what goes back with it)."""
    metadata = _metadata(grpc_context)
    if not open_call:
        found = context.services()
        admitted = admit(
            found.keyring, found.limits, context.RATES, _presented_key(metadata), "predict", rpc
        )
        if isinstance(admitted, Denial):
            return _fail(grpc_context, CODES[admitted.status], admitted.message, empty)
    try:
        return await call(metadata)
    except ServingError as e:
        return _fail(
            grpc_context, CODES.get(e.status_code, grpc.StatusCode.UNKNOWN), e.message, empty
        )
    except Exception:
        logger.exception("unhandled error in gRPC %s", rpc)
        return _fail(grpc_context, grpc.StatusCode.INTERNAL, "internal error", empty)


def _parameter(value: bool | int | str) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=str(value))


def _tensor_metadata(
    tensors: list[dict[str, Any]],
) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """OIP metadata's tensors (name, datatype, shape; REST's extra parameters left out)."""
    kind = pb.ModelMetadataResponse.TensorMetadata
    return [kind(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in tensors]


_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The field of ``InferTensorContents`` that holds each datatype's values."""


def _tensors(request: pb.ModelInferRequest, limit: int) -> list[RawTensor]:
    """The request's input tensors: ``raw_input_contents`` (one entry per input, in order) or
    each input's typed ``contents``."""
    if len(request.raw_input_contents) > len(request.inputs):
        raise InvalidRequest("raw_input_contents holds more entries than there are inputs")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidRequest("raw_input_contents must hold one entry per input")
    found = []
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if request.raw_input_contents:
            raw = request.raw_input_contents[i]
            if len(raw) > limit:
                raise PayloadTooLarge(f"input {tensor.name!r}: over {limit} bytes")
            if tensor.datatype == "BYTES":
                found.append(RawTensor(tensor.name, "BYTES", shape, oip.decode_bytes(raw)))
            elif tensor.datatype in _CONTENTS:
                found.append(RawTensor(tensor.name, tensor.datatype, shape, raw=raw))
            else:
                found.append(RawTensor(tensor.name, tensor.datatype, shape, []))
            continue
        field = _CONTENTS.get(tensor.datatype, "bytes_contents")
        found.append(
            RawTensor(tensor.name, tensor.datatype, shape, list(getattr(tensor.contents, field)))
        )
    return found


class InferenceServicer:
    """The RPCs of ``inference.GRPCInferenceService`` (Serve calls them by name)."""

    async def ServerLive(  # noqa: N802 - the RPC's name
        self, request: pb.ServerLiveRequest, grpc_context: RayServegRPCContext
    ) -> pb.ServerLiveResponse:
        async def call(_: dict[str, str]) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await _guarded(grpc_context, "ServerLive", pb.ServerLiveResponse(), call, True)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, grpc_context: RayServegRPCContext
    ) -> pb.ServerReadyResponse:
        async def call(_: dict[str, str]) -> pb.ServerReadyResponse:
            ready = await oip.backend(context.services().core).server_ready()
            return pb.ServerReadyResponse(ready=ready)

        return await _guarded(grpc_context, "ServerReady", pb.ServerReadyResponse(), call, True)

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, grpc_context: RayServegRPCContext
    ) -> pb.ServerMetadataResponse:
        async def call(_: dict[str, str]) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(**oip.server_metadata())

        empty = pb.ServerMetadataResponse()
        return await _guarded(grpc_context, "ServerMetadata", empty, call)

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelReadyResponse:
        async def call(_: dict[str, str]) -> pb.ModelReadyResponse:
            found = oip.backend(context.services().core)
            ready = await found.model_ready(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=ready)

        return await _guarded(grpc_context, "ModelReady", pb.ModelReadyResponse(), call)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelMetadataResponse:
        async def call(_: dict[str, str]) -> pb.ModelMetadataResponse:
            found = await oip.backend(context.services().core).metadata(
                request.name, request.version or None
            )
            return pb.ModelMetadataResponse(
                name=found["name"],
                versions=found["versions"],
                platform=found["platform"],
                inputs=_tensor_metadata(found["inputs"]),
                outputs=_tensor_metadata(found["outputs"]),
            )

        empty = pb.ModelMetadataResponse()
        return await _guarded(grpc_context, "ModelMetadata", empty, call)

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, grpc_context: RayServegRPCContext
    ) -> pb.RepositoryIndexResponse:
        async def call(_: dict[str, str]) -> pb.RepositoryIndexResponse:
            entries = await oip.backend(context.services().core).repository_index()
            if request.ready:
                entries = [e for e in entries if e["state"] == "READY"]
            index = pb.RepositoryIndexResponse.ModelIndex
            return pb.RepositoryIndexResponse(models=[index(**e) for e in entries])

        empty = pb.RepositoryIndexResponse()
        return await _guarded(grpc_context, "RepositoryIndex", empty, call)

    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelInferResponse:
        async def call(metadata: dict[str, str]) -> pb.ModelInferResponse:
            found = context.services()
            model_backend = oip.backend(found.core)
            tensors = _tensors(request, found.limits.max_body_bytes)
            wanted = [o.name for o in request.outputs] or None
            result = await model_backend.infer(
                request.model_name,
                request.model_version or None,
                tensors,
                wanted,
                request.id or str(uuid.uuid4()),
                user_key=metadata.get(model_backend.sticky_header.lower()),
                use_cache="no-cache" not in metadata.get("cache-control", "").lower(),
            )
            response = pb.ModelInferResponse(
                model_name=result.model_name, model_version=result.model_version, id=request.id
            )
            for key, value in result.parameters.items():
                response.parameters[key].CopyFrom(_parameter(value))
            for tensor in result.outputs:
                response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
                response.raw_output_contents.append(oip.raw_of(tensor))
            return response

        return await _guarded(grpc_context, "ModelInfer", pb.ModelInferResponse(), call)

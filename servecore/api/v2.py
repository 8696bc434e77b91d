"""Open Inference Protocol v2 over REST (KServe's and Triton's HTTP API), with Triton's binary
tensor data extension.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata),
``GET /v2/models/{name}[/versions/{v}]`` (model metadata), ``GET …/ready``, ``POST …/infer`` and
``POST /v2/repository/index``. Errors are the protocol's ``{"error": "<message>"}`` with its
status (400 for a bad request, 404 for an unknown model or version); authentication, limits and
back-pressure are the same guard's as on v1. ``X-User-Key`` and ``Cache-Control: no-cache`` mean
what they mean on ``/v1/predict``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from servecore.api import oip
from servecore.api.context import services
from servecore.api.http_errors import register_error_shape, request_id
from servecore.errors import InvalidRequest, ServingError
from servecore.signature import RawTensor

router = APIRouter(prefix="/v2")
HEADER_LENGTH = "inference-header-content-length"
Scalar = bool | int | float | str


def render_error(error: ServingError, request: Request) -> JSONResponse:
    """The protocol's error shape; a request the schema refuses is a 400, as the protocol says."""
    status = 400 if error.status_code == 422 else error.status_code
    return JSONResponse({"error": error.message}, status_code=status, headers=error.headers)


register_error_shape("/v2", render_error)


class InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Scalar] = Field(default_factory=dict)
    data: list[Any] | None = None


class OutputWish(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    parameters: dict[str, Scalar] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=256)
    parameters: dict[str, Scalar] = Field(default_factory=dict)
    inputs: list[InputTensor] = Field(min_length=1, max_length=256)
    outputs: list[OutputWish] | None = Field(default=None, max_length=8)


class V2Error(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error} for code in (400, 401, 403, 404, 413, 429, 503, 504)
}
OPEN_ERRORS: dict[int | str, dict[str, Any]] = {503: {"model": V2Error}}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined, for ``openapi_extra`` (which cannot
    reach a model's local definitions)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


@router.get("/health/live")
async def live() -> Response:
    return _json({"live": True})


@router.get("/health/ready", responses=OPEN_ERRORS)
async def ready() -> Response:
    await services().core.check_ready()
    return _json({"ready": True})


@router.get("", responses=ERRORS)
async def server_metadata() -> Response:
    return _json(oip.server_metadata())


@router.get("/models/{name}", responses=ERRORS)
@router.get("/models/{name}/versions/{version}", responses=ERRORS)
async def model_metadata(name: str, version: str | None = None) -> Response:
    return _json(await oip.backend(services().core).metadata(name, version))


@router.get("/models/{name}/ready", responses=ERRORS)
@router.get("/models/{name}/versions/{version}/ready", responses=ERRORS)
async def model_ready(name: str, version: str | None = None) -> Response:
    if not await oip.backend(services().core).model_ready(name, version):
        return _json({"name": name, "ready": False}, 400)
    return _json({"name": name, "ready": True})


@router.post("/repository/index", responses=ERRORS)
async def repository_index() -> Response:
    return _json(await oip.backend(services().core).repository_index())  # type: ignore[arg-type]


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline(InferenceRequest.model_json_schema())},
        },
    }
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": "The outputs; with binary data, the JSON header then the tensors' bytes",
        "content": {"application/json": {}, "application/octet-stream": {}},
    },
}


@router.post("/models/{name}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
@router.post(
    "/models/{name}/versions/{version}/infer",
    responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
)
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    found = oip.backend(services().core)
    raw = await request.body()
    body, binary = _split(raw, request.headers.get(HEADER_LENGTH))
    try:
        parsed = InferenceRequest.model_validate_json(body)
    except ValidationError as e:
        raise InvalidRequest(_describe(e)) from e
    tensors = _tensors(parsed.inputs, binary)
    wanted = [o.name for o in parsed.outputs] if parsed.outputs is not None else None
    result = await found.infer(
        name,
        version,
        tensors,
        wanted,
        request_id(request),
        user_key=request.headers.get(found.sticky_header),
        use_cache="no-cache" not in request.headers.get("cache-control", "").lower(),
    )
    as_binary = _binary_outputs(parsed)
    answer: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
    }
    if parsed.id is not None:
        answer["id"] = parsed.id
    answer["parameters"] = result.parameters
    blobs: list[bytes] = []
    outputs = []
    for tensor_out in result.outputs:
        entry: dict[str, Any] = {
            "name": tensor_out.name,
            "datatype": tensor_out.datatype,
            "shape": tensor_out.shape,
        }
        if as_binary(tensor_out.name):
            blob = oip.raw_of(tensor_out)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = oip.json_values(tensor_out)
        outputs.append(entry)
    answer["outputs"] = outputs
    text = json.dumps(answer).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text))},
    )


def _split(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a request (binary tensor data extension)."""
    if header_length is None:
        return raw, b""
    if not header_length.isdigit() or int(header_length) > len(raw):
        raise InvalidRequest(f"{HEADER_LENGTH}: {header_length!r} is not a length within the body")
    size = int(header_length)
    return raw[:size], raw[size:]


def _tensors(inputs: list[InputTensor], binary: bytes) -> list[RawTensor]:
    """The request's input tensors: JSON data flattened, binary data cut in input order (BYTES
    elements decoded, numbers left as little-endian bytes for the model's own check)."""
    found = []
    offset = 0
    for tensor in inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise InvalidRequest(f"input {tensor.name!r} has no data")
            found.append(
                RawTensor(tensor.name, tensor.datatype, tensor.shape, _flatten(tensor.data))
            )
            continue
        if tensor.data is not None:
            raise InvalidRequest(f"input {tensor.name!r} has both data and binary_data_size")
        left = len(binary) - offset
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= left:
            raise InvalidRequest(
                f"input {tensor.name!r}: binary_data_size {size!r} does not match the "
                f"{left} bytes after the JSON header"
            )
        raw = binary[offset : offset + size]
        offset += size
        if tensor.datatype == "BYTES":
            found.append(RawTensor(tensor.name, "BYTES", tensor.shape, oip.decode_bytes(raw)))
        else:
            found.append(RawTensor(tensor.name, tensor.datatype, tensor.shape, raw=raw))
    if offset < len(binary):
        if offset == 0:
            raise InvalidRequest("binary data after the JSON header, but no input claims it")
        raise InvalidRequest(
            f"{len(binary) - offset} bytes of binary data after the JSON header that no input "
            "claims"
        )
    return found


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def _binary_outputs(parsed: InferenceRequest) -> Any:
    """Which outputs go back as binary data: those asked so, or all with ``binary_data_output``."""
    default = parsed.parameters.get("binary_data_output") is True
    asked = {o.name: o.parameters.get("binary_data", default) is True for o in parsed.outputs or ()}
    return lambda name: asked.get(name, default)


def _describe(error: ValidationError) -> str:
    details = error.errors()
    if any(d.get("type") == "json_invalid" for d in details):
        return "request body is not valid JSON"
    return "; ".join(
        f"{'.'.join(str(p) for p in d.get('loc', ())) or 'body'}: {d.get('msg')}" for d in details
    )

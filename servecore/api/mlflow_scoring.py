"""MLflow's scoring protocol (``mlflow models serve``) for a generic model application, so a team
that served a model with MLflow switches to this platform with no client change.

Routes: ``POST /invocations`` with MLflow's JSON (``dataframe_split``, ``dataframe_records``,
``instances`` or ``inputs``; ``Content-Type: application/json``) answered as
``{"predictions": ...}``; ``GET /ping`` and ``GET /health`` (liveness), ``GET /version``.
``predictions`` is what MLflow's server answers for the same model: a list of values for one
unnamed output, a list of records (one object per row) for several named outputs.

Errors are MLflow's shape, ``{"error_code": "BAD_REQUEST", "message": ...}``, with the status of
the platform's error (400 for a bad input, naming the column and row; 401/403/413/429 from the
guard; 503/504 when the model cannot answer). Keys, limits, ``X-User-Key`` (A/B stickiness) and
``Cache-Control: no-cache`` work as on every other route.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from servecore.api.context import services
from servecore.api.http_errors import register_error_shape, request_id
from servecore.errors import InvalidJSON, ServingError
from servecore.signature import PREDICTIONS, batch_from_scoring_json
from servecore.traffic.model_core import ModelCore

router = APIRouter()
MLFLOW_VERSION_HEADER = "mlflow"

ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    413: "BAD_REQUEST",
    415: "BAD_REQUEST",
    422: "BAD_REQUEST",
    429: "REQUEST_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def render_error(error: ServingError, request: Request) -> JSONResponse:
    """MLflow's error shape; a request the checks refuse is a 400, as MLflow answers it."""
    status = 400 if error.status_code == 422 else error.status_code
    code = ERROR_CODES.get(status, "INTERNAL_ERROR")
    return JSONResponse(
        {"error_code": code, "message": error.message}, status_code=status, headers=error.headers
    )


for _path in ("/invocations", "/ping", "/health", "/version"):
    register_error_shape(_path, render_error)


def _core() -> ModelCore:
    core = services().core
    if not isinstance(core, ModelCore):  # the route is only mounted on generic model apps
        raise ServingError("this application serves no MLflow model")
    return core


@router.get("/ping")
@router.get("/health")
async def ping() -> Response:
    return Response("\n", media_type="application/json")


@router.get("/version")
async def version() -> Response:
    import importlib.metadata

    return Response(importlib.metadata.version("mlflow"), media_type="text/plain")


class UnsupportedMediaType(ServingError):
    status_code = 415
    error_type = "unsupported_media_type"


@router.post("/invocations")
async def invocations(request: Request) -> Response:
    core = _core()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType(
            f"content type {content_type or 'none'!r} is not supported: send application/json "
            "(dataframe_split, dataframe_records, instances or inputs)"
        )
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidJSON("request body is not valid JSON") from e
    user_key = request.headers.get(core.sticky_header)
    variant = core.knobs.experiment.assign(user_key)
    rows = batch_from_scoring_json(await core.schema(variant), body)
    answer = await core.predict(
        rows,
        user_key,
        "no-cache" not in request.headers.get("cache-control", "").lower(),
        request_id(request),
        variant=variant,
    )
    headers = {
        "X-Model-Version": answer.version,
        "X-Model-Variant": answer.variant,
    }
    if answer.degraded:
        headers["X-Degraded"] = "true"
    return Response(
        json.dumps({"predictions": predictions_json(answer.outputs)}),
        media_type="application/json",
        headers=headers,
    )


def predictions_json(outputs: dict[str, np.ndarray]) -> Any:
    """``predictions`` as MLflow's server writes them: the values of one unnamed output, else
    one record per row."""
    if list(outputs) == [PREDICTIONS]:
        return _plain(next(iter(outputs.values())))
    names = list(outputs)
    columns = [_plain(outputs[name]) for name in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


def _plain(column: np.ndarray) -> list[Any]:
    if column.dtype == object:
        return [v.decode() if isinstance(v, bytes) else _item(v) for v in column.tolist()]
    return column.tolist()


def _item(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value

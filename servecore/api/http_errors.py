"""Renders every error of a FastAPI app in the one shape of DESIGN contract 7."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from servecore.api.auth import route_path
from servecore.errors import InvalidJSON, InvalidRequest, ServingError

logger = logging.getLogger("ray.serve")

_STARLETTE_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def request_id(request: Request) -> str:
    """The id Serve assigned (from ``X-Request-ID`` when the caller sent one)."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
        if rid:
            return rid
    except Exception:  # noqa: BLE001 - outside Serve (unit tests) there is no request context
        pass
    return request.headers.get("x-request-id") or str(uuid.uuid4())


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str], scope: dict[str, Any]
) -> JSONResponse:
    """The one error shape for a response made before any route runs (the auth middleware)."""
    error = ServingError(message)
    error.status_code = status
    error.error_type = error_type
    error.headers = headers
    return _render(error, Request(scope))


Shape = Callable[[ServingError, Request], JSONResponse]
"""Renders an error in one protocol's own shape."""

_SHAPES: dict[str, Shape] = {}
"""Path prefix → the error shape of the protocol served under it (OIP v2's ``{"error": ...}``
under ``/v2/``); every other path answers in DESIGN contract 7's shape."""


def register_error_shape(prefix: str, shape: Shape) -> None:
    """Render errors of requests to ``prefix`` and the paths under it with ``shape`` (route,
    validation and guard errors alike)."""
    _SHAPES[prefix] = shape


def _render(error: ServingError, request: Request) -> JSONResponse:
    path = route_path(request.scope)
    for prefix, shape in _SHAPES.items():
        if path == prefix or path.startswith(f"{prefix}/"):  # "/health" is not "/healthz"
            return shape(error, request)
    # Serve itself echoes the request id in the X-Request-ID response header.
    return JSONResponse(
        error.body(request_id(request)), status_code=error.status_code, headers=error.headers
    )


def describe_validation(error: RequestValidationError) -> ServingError:
    """Turn FastAPI's validation errors into one readable message."""
    details = error.errors()
    if any(d.get("type") == "json_invalid" for d in details):
        return InvalidJSON("request body is not valid JSON")
    parts = []
    for d in details:
        # Union members show up in the location as validator tags ("function-after[...]",
        # "list[...]"): they mean nothing to a caller.
        loc = [str(p) for p in d.get("loc", ()) if p != "body" and "[" not in str(p)]
        parts.append(f"{'.'.join(loc) or 'body'}: {d.get('msg')}")
    return InvalidRequest("; ".join(parts))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return _render(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _render(describe_validation(exc), request)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = ServingError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = _STARLETTE_TYPES.get(exc.status_code, "http_error")
        return _render(error, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _render(ServingError("internal error"), request)

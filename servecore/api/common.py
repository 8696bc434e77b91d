"""What the HTTP fronts share: one JSON serialisation, the caller's identity, error tables."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel

from servecore.api.auth import ANONYMOUS
from servecore.api.schemas import ErrorResponse

# Every route behind the guard may also answer 401, 403, 413 and 429 (servecore.api.auth).
GUARD_CODES = (401, 403, 413, 429)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 422, 503, 504, *GUARD_CODES)
}


def json_response(
    body: BaseModel | dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Serialise once; returning the model would make FastAPI validate it again."""
    text = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return Response(text, status_code=status_code, media_type="application/json", headers=headers)


def caller(request: Request) -> str:
    """The identity that owns what a request creates (jobs): the API key's name, set by the
    guard in ``request.state.caller``; :data:`ANONYMOUS` while no key is configured."""
    return getattr(request.state, "caller", None) or ANONYMOUS

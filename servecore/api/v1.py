"""REST v1: ``/v1/predict``, ``/v1/models``, ``/v1/experiments`` and ``/v1/monitoring/drift``.

Each route parses its request, calls the traffic core and renders the core's answer as the v1
schemas (:mod:`servecore.api.schemas`); errors keep DESIGN contract 7's shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from servecore import LABELS
from servecore.api.common import ERRORS, json_response
from servecore.api.context import services
from servecore.api.http_errors import request_id
from servecore.api.schemas import (
    ModelVersion,
    Prediction,
    PredictRequest,
    PredictResponse,
)
from servecore.traffic.core import Classification

router = APIRouter()


def versions(models: dict[str, dict[str, Any]]) -> list[ModelVersion]:
    return [ModelVersion(**info) for info in models.values()]


def render(answer: Classification) -> PredictResponse:
    return PredictResponse(
        request_id=answer.request_id,
        predictions=[
            Prediction(label=label, probabilities=dict(zip(LABELS, row, strict=True)))
            for label, row in zip(answer.labels, answer.probabilities, strict=True)
        ],
        models=versions(answer.models),
        variant=answer.variant,
        degraded=answer.degraded,
        degraded_reason=answer.degraded_reason,
        cached=answer.cached,
    )


async def classify_for_job(texts: list[str], user_key: str | None, trace: str) -> dict[str, Any]:
    """One chunk of a texts job, answered exactly as ``/v1/predict`` answers (a plain dict,
    without a request id); ``trace`` (``job-<id>``) is the request id its graph call logs under."""
    answer = await services().core.classify(texts, user_key, use_cache=True, rid=trace)
    return render(answer).model_dump(exclude={"request_id"})


@router.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(body: PredictRequest, request: Request) -> Response:
    """Classify 1–64 texts; every answer names the model versions that produced it.

    ``X-User-Key`` (the experiment's sticky header) keeps a caller on one A/B variant;
    ``Cache-Control: no-cache`` skips the response cache for this request.
    """
    core = services().core
    use_cache = "no-cache" not in request.headers.get("cache-control", "").lower()
    user_key = request.headers.get(core.sticky_header)
    answer = await core.classify(body.texts, user_key, use_cache, request_id(request), sample=True)
    return json_response(render(answer))

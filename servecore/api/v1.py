"""REST v1: ``/v1/predict``, ``/v1/models``, ``/v1/experiments`` and ``/v1/monitoring/drift``.

Each route parses its request, calls the traffic core and renders the core's answer as the v1
schemas (:mod:`servecore.api.schemas`); errors keep DESIGN contract 7's shape.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

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
from servecore.api.streaming import SSE, STREAM_HEADERS, Format, encode, streamed_format
from servecore.errors import ServingError
from servecore.traffic.core import Classification

logger = logging.getLogger("ray.serve")
router = APIRouter()


class StreamingConfig(BaseModel):
    """How ``/v1/predict`` streams (``user_config.streaming`` of the gateway)."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(default=8, ge=1, le=64)
    """Texts per micro-batch of a streamed request: its lines go out as soon as it is scored."""
    max_in_flight: int = Field(default=2, ge=1, le=16)
    """Micro-batches of one streamed request scored at once (the next starts as one ends; the
    coalescer may merge them with other requests' texts)."""


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

    With ``Accept: application/x-ndjson`` (or ``text/event-stream``) the answer streams: one
    line (event) per text, ``{"index", "label", "probabilities", "models", "variant",
    "degraded"}``, sent as soon as the text's micro-batch is scored (``streaming.chunk_size``
    texts each); a client that disconnects stops the micro-batches not yet scored.
    """
    core = services().core
    use_cache = "no-cache" not in request.headers.get("cache-control", "").lower()
    user_key = request.headers.get(core.sticky_header)
    fmt = streamed_format(request)
    if fmt is not None:
        return await _streamed(body.texts, user_key, use_cache, request_id(request), fmt)
    answer = await core.classify(body.texts, user_key, use_cache, request_id(request), sample=True)
    return json_response(render(answer))


async def _streamed(
    texts: list[str], user_key: str | None, use_cache: bool, rid: str, fmt: Format
) -> Response:
    """Score ``texts`` a micro-batch at a time, streaming each one's lines as it is scored. The
    first micro-batch is awaited before the response starts, so a refusal or an unavailable
    model still answers with its own status; later failures end the stream with an error line."""
    found = services()
    core = found.core
    knobs = found.streaming or StreamingConfig()
    parts = collections.deque(
        (start, texts[start : start + knobs.chunk_size])
        for start in range(0, len(texts), knobs.chunk_size)
    )
    in_flight: collections.deque[tuple[int, asyncio.Task[Classification]]] = collections.deque()

    def fill() -> None:
        while parts and len(in_flight) < knobs.max_in_flight:
            start, part = parts.popleft()
            call = core.classify(part, user_key, use_cache, rid, sample=True)
            in_flight.append((start, asyncio.ensure_future(call)))

    def stop() -> None:
        for _, task in in_flight:
            task.cancel()
        in_flight.clear()
        parts.clear()

    fill()
    start, first = in_flight.popleft()
    try:
        answer = await first
    except BaseException:
        stop()
        raise

    async def lines() -> AsyncIterator[bytes]:
        nonlocal start, answer
        try:
            while True:
                for offset, line in enumerate(_lines(answer, start)):
                    yield encode(fmt, "prediction", line, str(start + offset))
                fill()
                if not in_flight:
                    break
                start, task = in_flight.popleft()
                try:
                    answer = await task
                except ServingError as e:
                    yield encode(fmt, "error", e.body(rid))
                    return
                except Exception:  # noqa: BLE001 - the status is sent: end with an error line
                    logger.exception("streamed prediction failed")
                    failed = ServingError("internal error; the remaining texts were not scored")
                    yield encode(fmt, "error", failed.body(rid))
                    return
            if fmt == SSE:
                yield encode(fmt, "done", {"request_id": rid, "texts": len(texts)})
        finally:  # also when the client went away: the unscored micro-batches never run
            stop()

    headers = {**STREAM_HEADERS, "X-Request-ID": rid}
    return StreamingResponse(lines(), media_type=fmt, headers=headers)


def _lines(answer: Classification, start: int) -> list[dict[str, Any]]:
    models = [m.model_dump() for m in versions(answer.models)]
    return [
        {
            "index": start + i,
            "label": label,
            "probabilities": dict(zip(LABELS, row, strict=True)),
            "models": models,
            "variant": answer.variant,
            "degraded": answer.degraded,
        }
        for i, (label, row) in enumerate(zip(answer.labels, answer.probabilities, strict=True))
    ]

"""Asynchronous jobs over REST: ``/v1/jobs`` (submit, list) and ``/v1/jobs/{id}`` (get, cancel).

The job desk keeps this process's link to the job store and the queue; runners (the
``JobRunner`` deployment) take the ids from the queue and answer text jobs through the traffic
core, exactly as ``/v1/predict`` answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from servecore.api.common import GUARD_CODES, caller, json_response
from servecore.api.context import services
from servecore.api.schemas import MAX_JOB_TEXTS, ErrorResponse, JobList, JobRequest
from servecore.api.streaming import KEEPALIVE, SSE, STREAM_HEADERS, encode, streamed_format
from servecore.errors import InvalidRequest, JobsUnavailable, TooManyTexts
from servecore.jobs.queue import JobProducer
from servecore.jobs.store import JobState, JobStore, dataset_path, public_job
from servecore.jobs.webhooks import check_target, parse_networks
from servecore.settings import get_settings

logger = logging.getLogger("ray.serve")
router = APIRouter()
T = TypeVar("T")

JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 422, 503, *GUARD_CODES)
}
JobId = Annotated[str, Path(min_length=1, max_length=64)]


class JobsConfig(BaseModel):
    """Limits of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    max_texts: int = Field(default=MAX_JOB_TEXTS, ge=1, le=MAX_JOB_TEXTS)
    """Most texts in one job; a larger list is refused with 413 (send a dataset instead)."""
    list_page_max: int = Field(default=100, ge=1, le=1000)


class JobDesk:
    """The job store and the queue as this process reaches them (both opened on first use)."""

    def __init__(self) -> None:
        self.knobs = JobsConfig()
        self._store: JobStore | None = None
        self._producer: JobProducer | None = None

    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(get_settings().job_store)
        return self._store

    async def in_store(self, call: Callable[[JobStore], T]) -> T:
        """Run a job-store call in a thread; a store that cannot be reached is a 503, not a 500
        (the store's own refusals, 404/409, pass through)."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return await asyncio.to_thread(lambda: call(self.store()))
        except SQLAlchemyError as e:
            logger.error("job store unavailable: %s", e)
            raise JobsUnavailable("the job store is unavailable; retry shortly") from e

    def send(self, job_id: str) -> None:
        if self._producer is None:
            self._producer = JobProducer(get_settings())
        self._producer.send(job_id)
        self.store().mark_enqueued(job_id)

    def check(self, body: JobRequest) -> tuple[dict[str, Any], int]:
        """Validate a submission beyond its schema; returns the stored request and its size."""
        settings = get_settings()
        if body.callback_url is not None:
            if settings.webhook_secret is None:
                raise InvalidRequest(
                    "callback_url: webhooks are off on this server (no signing secret is set)"
                )
            check_target(body.callback_url, parse_networks(settings.webhook_networks))
        if body.texts is not None:
            limit = self.knobs.max_texts
            if len(body.texts) > limit:
                raise TooManyTexts(
                    f"texts: {len(body.texts)} texts, at most {limit} per job; "
                    "send a dataset for more"
                )
            return {"texts": body.texts}, len(body.texts)
        assert body.dataset is not None
        dataset_path(settings, body.dataset.path)  # refuses paths outside the data folder
        return {"dataset": body.dataset.model_dump()}, 0


@router.post("/v1/jobs", status_code=202, responses=JOB_ERRORS)
async def submit_job(
    body: JobRequest,
    request: Request,
    idempotency_key: str | None = Header(default=None, max_length=200),
) -> Response:
    """Queue texts (scored by the online pipeline graph) or a dataset (scored by the Ray Data
    batch pipeline); answers 202 with the job and its ``Location``.

    The same ``Idempotency-Key`` with the same body returns the same job (header
    ``Idempotent-Replayed: true``); with another body it is a 409. ``callback_url`` receives
    a signed POST when the job ends. ``X-User-Key`` picks the A/B variant of a texts job.
    """
    found = services()
    desk = found.jobs
    stored, total = await asyncio.to_thread(desk.check, body)
    user_key = request.headers.get(found.core.sticky_header)
    if user_key is not None and "texts" in stored:
        stored["user_key"] = user_key
    job, created = await desk.in_store(
        lambda store: store.create(
            owner=caller(request),
            kind="texts" if body.texts is not None else "dataset",
            request=stored,
            total=total,
            idempotency_key=idempotency_key,
            callback_url=body.callback_url,
        )
    )
    if created:
        try:
            await asyncio.to_thread(desk.send, job.id)
        except Exception as e:  # noqa: BLE001 - the job is stored; the reaper sends it later
            logger.warning("job %s stored but not sent yet: %r", job.id, e)
    headers = {"Location": f"{request.scope.get('root_path', '')}/v1/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return json_response(public_job(job), 202, headers)


@router.get("/v1/jobs", response_model=JobList, responses=JOB_ERRORS)
async def list_jobs(
    request: Request,
    limit: int = Query(default=20, ge=1, le=1000),
    after: str | None = Query(default=None, max_length=64),
    state: JobState | None = None,
) -> JobList:
    """Your jobs, newest first, without results; ``after`` is the previous page's
    ``next_cursor``."""
    desk = services().jobs
    limit = min(limit, desk.knobs.list_page_max)
    jobs, cursor = await desk.in_store(
        lambda store: store.page(caller(request), limit=limit, after=after, state=state)
    )
    return JobList(jobs=[public_job(j, with_result=False) for j in jobs], next_cursor=cursor)


@router.get("/v1/jobs/{job_id}", responses=JOB_ERRORS)
async def get_job(job_id: JobId, request: Request) -> Response:
    """State, progress, timestamps, webhook deliveries and, once done, the result (texts:
    predictions and model versions; datasets: where the output is)."""
    job = await services().jobs.in_store(lambda store: store.get(job_id, caller(request)))
    return json_response(public_job(job))


@router.get("/v1/jobs/{job_id}/events", responses=JOB_ERRORS)
async def job_events(
    job_id: JobId,
    request: Request,
    interval_s: float = Query(default=0.5, ge=0.1, le=10.0),
) -> Response:
    """Follow a job until it ends: a ``progress`` event (``state``, ``done``, ``total``) each
    time they change, checked every ``interval_s``, then one ``end`` event holding the job as
    ``GET /v1/jobs/{id}`` shows it, result included. Server-sent events by default (a comment
    every 15 s keeps proxies from closing a quiet stream), NDJSON with
    ``Accept: application/x-ndjson`` (each line's ``event`` names it). A client that
    disconnects stops the polling; the job itself runs on."""
    desk = services().jobs
    owner = caller(request)
    job = await desk.in_store(lambda store: store.get(job_id, owner))  # 404 before the stream
    fmt = streamed_format(request) or SSE

    async def events() -> Any:
        current, last, quiet = job, None, 0.0
        while True:
            progress = {"state": current.state, "done": current.done, "total": current.total}
            if progress != last:
                yield encode(fmt, "progress", {"event": "progress", "id": job_id, **progress})
                last, quiet = progress, 0.0
            if current.terminal:
                yield encode(fmt, "end", {"event": "end", **public_job(current)})
                return
            await asyncio.sleep(interval_s)
            quiet += interval_s
            if fmt == SSE and quiet >= 15.0:
                yield KEEPALIVE
                quiet = 0.0
            try:
                current = await desk.in_store(lambda store: store.get(job_id, owner))
            except JobsUnavailable as e:
                yield encode(fmt, "error", {"event": "error", **e.body(None)})
                return

    return StreamingResponse(events(), media_type=fmt, headers=STREAM_HEADERS)


@router.delete("/v1/jobs/{job_id}", status_code=202, responses=JOB_ERRORS)
async def cancel_job(job_id: JobId, request: Request) -> Response:
    """Cancel: a queued job at once, a running one at its next chunk (``cancel_requested``
    until then). A finished job answers 409."""
    job = await services().jobs.in_store(lambda store: store.cancel(job_id, caller(request)))
    return json_response(public_job(job, with_result=False), 202)

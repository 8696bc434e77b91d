"""The gateway: the FastAPI ingress deployment in front of the pipeline graph.

Concurrent ``/v1/predict`` requests are coalesced into one graph call (see
:mod:`servecore.traffic.coalescer` for why not ``@serve.batch`` here), so the downstream hops are
paid per micro-batch instead of per request: on a 2-core machine each Serve hop costs milliseconds
of CPU. Within a call every fan-out ``.remote()`` starts before anything is awaited, and responses
flow from stage to stage without the gateway touching them.

Every graph call runs on one :class:`~servecore.traffic.releases.Release` (the exact model versions
behind the spec's aliases), pinned in each stage call, so an answer never mixes versions. A
background task polls the registry and switches to a new release only once two polls agree and a
warm-up call has gone through the whole graph on it; until then the old release answers.

No ``from __future__ import annotations``: FastAPI must see real classes in the route signatures.
"""

import asyncio
import base64
import collections
import contextvars
import json
import logging
import random
import time
from dataclasses import asdict
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayError
from ray.serve.context import _set_request_context
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.stage import StageOutput, deployment_result, finish_route, start_route
from servecore import LABELS
from servecore.api.auth import ANONYMOUS, Guard, KeyRing, LimitsConfig
from servecore.api.http_errors import error_response, install_error_handlers, request_id
from servecore.api.schemas import (
    MAX_JOB_TEXTS,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    ErrorResponse,
    ExperimentsResponse,
    Health,
    JobList,
    JobRequest,
    ModelsResponse,
    ModelVersion,
    Prediction,
    PredictRequest,
    PredictResponse,
    PromoteRequest,
    RollbackRequest,
)
from servecore.errors import (
    InvalidRequest,
    JobsUnavailable,
    ModelNotFound,
    ModelUnavailable,
    NotDeployed,
    NotReady,
    PipelineTimeout,
    RegistryUnavailable,
    TooManyTexts,
)
from servecore.jobs.store import JobState, JobStore, dataset_path, public_job
from servecore.jobs.webhooks import check_target, parse_networks
from servecore.monitoring.prediction_log import records as log_records
from servecore.monitoring.telemetry import metric
from servecore.pipeline.batching import split_batch, text_batch
from servecore.pipeline.graph import EMBEDDING, PREDICTION, Layout
from servecore.pipeline.spec import PipelineSpec
from servecore.registry.client import registry_failure
from servecore.settings import get_settings
from servecore.traffic.coalescer import Coalescer
from servecore.traffic.experiments import (
    CacheConfig,
    CachedAnswer,
    CircuitBreaker,
    ExperimentConfig,
    FallbackConfig,
    ResponseCache,
    ShadowConfig,
    ShadowStats,
    VariantStats,
)
from servecore.traffic.releases import Release, poll_ticks, spec_model_uris

logger = logging.getLogger("ray.serve")

PREDICTION_AND_EMBEDDING = (*PREDICTION, "embedding")
"""What a graph call holding a request the monitor sees asks for."""

# A stage that failed, is not deployed, or cannot take the call (back-pressure) — the caller may
# retry: 503. RayServeException covers BackPressureError, DeploymentUnavailableError and
# deployments.stage.StageFailed (what a stage raised, as the gRPC transport delivers it).
STAGE_ERRORS = (RayError, RayServeException, TimeoutError)

MAX_CONCURRENT_BATCHES = 4
READY_TIMEOUT_S = 10.0
# Every route behind the guard may also answer 401, 403, 413 and 429 (servecore.api.auth).
GUARD_CODES = (401, 403, 413, 429)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 422, 503, 504, *GUARD_CODES)
}
JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 422, 503, *GUARD_CODES)
}
JobId = Annotated[str, Path(min_length=1, max_length=64)]
GraphRequest = tuple[list[str], str, bool]
"""What the coalescer gathers: one request's texts, its request id, and whether the monitor will
see it (then the graph call also returns the texts' embeddings, which drift scoring needs, so
the monitor never runs the encoder again for them)."""


app = FastAPI(
    title="Intent serving",
    version="0.1.0",
    description="Customer-support intent routing on Ray Serve, models from the MLflow registry.",
)
install_error_handlers(app)


class _Policy:
    """What :class:`~servecore.api.auth.Guard` enforces in this process, set by its Gateway replica
    (keys from the settings at start-up, limits from ``user_config.limits`` live)."""

    keyring = KeyRing([])
    limits = LimitsConfig()


app.add_middleware(
    Guard,
    keyring=lambda: _Policy.keyring,
    limits=lambda: _Policy.limits,
    render=error_response,
)


class JobsConfig(BaseModel):
    """Limits of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    max_texts: int = Field(default=MAX_JOB_TEXTS, ge=1, le=MAX_JOB_TEXTS)
    """Most texts in one job; a larger list is refused with 413 (send a dataset instead)."""
    list_page_max: int = Field(default=100, ge=1, le=1000)


def caller(request: Request) -> str:
    """The identity that owns what a request creates (jobs): the API key's name, set by the
    guard in ``request.state.caller``; :data:`ANONYMOUS` while no key is configured."""
    return getattr(request.state, "caller", None) or ANONYMOUS


class MonitoringConfig(BaseModel):
    """What the gateway hands the ``Monitor`` deployment (prediction log and drift window)."""

    model_config = ConfigDict(extra="forbid")

    sample_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of ``/v1/predict`` requests sent to the monitor (all their texts). A sampled
    request's graph call also returns its embeddings, so drift scoring costs no second encoder
    pass (only answers served from the cache are embedded again by the monitor)."""
    flush_interval_s: float = Field(default=1.0, gt=0.0, le=60.0)
    """Samples are sent in one call per interval (or sooner, once 256 are waiting)."""
    max_buffered: int = Field(default=10_000, ge=1, le=1_000_000)
    """Samples waiting to be sent; more are dropped (the monitor is down or slow)."""


class GatewayUserConfig(BaseModel):
    """Live knobs of the gateway (``user_config`` of the ``Gateway`` deployment)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=64, ge=1, le=1024)
    """Most texts merged into one graph call (a larger single request still runs, alone)."""
    max_concurrent_batches: int = Field(default=MAX_CONCURRENT_BATCHES, ge=1, le=64)
    """Graph calls in flight at once; more requests wait and join the next call."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=1.0)
    """Extra wait for a call to fill once a slot is free; 0 sends whatever is queued."""
    graph_timeout_s: float = Field(default=20.0, gt=0.0, le=300.0)
    """Deadline of one graph call; past it the callers get a 503 and the slot is freed."""
    registry_poll_s: float = Field(default=10.0, ge=0.0, le=3600.0)
    """How often the registry is checked for alias moves; 0 pins the release the gateway
    started with. A move is served within about two polls plus one warm-up call."""
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    fallback: FallbackConfig = Field(default_factory=FallbackConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)

    @model_validator(mode="after")
    def _shadow_variant_exists(self) -> "GatewayUserConfig":
        names = [v.name for v in self.experiment.variants]
        if self.shadow.variant is not None and self.shadow.variant not in names:
            raise ValueError(f"shadow.variant {self.shadow.variant!r} is not one of {names}")
        return self


class PrimaryUnavailable(Exception):
    """The primary pipeline did not answer: ``code`` is ``circuit_open``, ``deadline`` or
    ``error``; the message is what the degraded answer gives as its reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _json(
    body: BaseModel | dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Serialise once; returning the model would make FastAPI validate it again."""
    text = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return Response(text, status_code=status_code, media_type="application/json", headers=headers)


def _versions(models: dict[str, dict[str, Any]]) -> list[ModelVersion]:
    return [ModelVersion(**info) for info in models.values()]


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Gateway:
    def __init__(
        self,
        spec: dict[str, Any],
        groups: dict[str, DeploymentHandle],
        job_runner: DeploymentHandle | None = None,
        monitor: DeploymentHandle | None = None,
    ) -> None:
        self.spec = PipelineSpec.model_validate(spec)
        self.groups = groups
        self.layout = Layout(self.spec)
        self._pins: dict[str, dict[str, str]] = {}
        self.job_runner = job_runner
        self.monitor = monitor
        self._samples: collections.deque[dict[str, Any]] = collections.deque()
        self._sample_sender: asyncio.Task[None] | None = None
        self.samples_dropped = 0
        self._job_store: JobStore | None = None
        self._job_producer: Any = None
        self.text_stages = [m.deployment for m in self.spec.members if m.input == "text"]
        self.prefixes = {plan.deployment: plan.output_prefix for plan in self.spec.stage_plans()}
        self.encoder_name = self.spec.encoder_name()
        self.stage_uris = {
            plan.deployment: plan.init_kwargs.get("model_uri") for plan in self.spec.stage_plans()
        }
        self.uris = spec_model_uris(self.spec)
        knobs = GatewayUserConfig()
        self.knobs = knobs
        self.releases: dict[str, Release] = {
            v.name: Release.resolve_variant(self.uris, v.alias) for v in knobs.experiment.variants
        }
        self.previous_releases: dict[str, Release] = {}
        self.release_swaps = 0
        self.release_error: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.graph_timeout_s = knobs.graph_timeout_s
        self.coalescers: dict[str, Coalescer[GraphRequest, StageOutput]] = {}
        self.variant_stats: dict[str, VariantStats] = {}
        self.shadow_stats = ShadowStats()
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.breaker = CircuitBreaker(knobs.fallback.failure_threshold, knobs.fallback.cooldown_s)
        self.fallbacks: dict[str, int] = {}
        self.cache = ResponseCache(knobs.cache)
        _Policy.keyring = KeyRing(get_settings().api_keys)
        _Policy.limits = knobs.limits
        if _Policy.keyring.open:
            logger.warning(
                "NO API KEYS ARE CONFIGURED: every route is open to anyone who can reach this "
                "port. Set INTENT_SERVING_API_KEYS (python -m servecore.api.auth new NAME) before "
                "exposing it."
            )
        else:
            logger.info("API keys: %s", [k.name for k in _Policy.keyring.keys])
        logger.info("gateway serving %s", {n: r.key for n, r in self.releases.items()})

    # --- configuration and releases -----------------------------------------------------------

    async def reconfigure(self, config: dict[str, Any]) -> None:
        # async: it touches asyncio state (coalescers, tasks) that belongs to the replica's loop.
        knobs = GatewayUserConfig.model_validate(config or {})
        stage = knobs.fallback.stage
        if stage is not None and stage not in self.text_stages:
            raise ValueError(
                f"fallback.stage {stage!r} must be a text-input member: {self.text_stages}"
            )
        wanted = {v.name: v.alias for v in knobs.experiment.variants}
        missing = {
            name: alias
            for name, alias in wanted.items()
            if name not in self.releases or self._alias_of(name) != alias
        }
        if missing:
            resolved = await asyncio.to_thread(
                lambda: {n: Release.resolve_variant(self.uris, a) for n, a in missing.items()}
            )
            self.releases.update(resolved)
        for name in set(self.releases) - set(wanted):
            del self.releases[name]
        previous, self.knobs = self.knobs, knobs
        self.graph_timeout_s = knobs.graph_timeout_s
        for coalescer in self.coalescers.values():
            coalescer.configure(
                knobs.max_batch_size, knobs.max_concurrent_batches, knobs.batch_wait_timeout_s
            )
        # A/B counters describe one experiment: a new split (variants, aliases or weights)
        # starts them again, as a new shadow starts the shadow comparison, so traffic served
        # under the old settings never mixes into the comparison of the new ones.
        if knobs.experiment != previous.experiment:
            self.variant_stats = {}
        if knobs.shadow != previous.shadow:
            self.shadow_stats = ShadowStats()
        if knobs.fallback != previous.fallback:  # new settings: a fresh circuit
            self.breaker = CircuitBreaker(
                knobs.fallback.failure_threshold, knobs.fallback.cooldown_s
            )
        self.cache.configure(knobs.cache)
        _Policy.limits = knobs.limits
        self._ensure_watcher()

    async def current_knobs(self) -> dict[str, Any]:
        """The live knobs this replica applies now (a handle method, no route): ``user_config``
        lands a moment after a deploy returns, so operators and tests ask instead of guessing."""
        return self.knobs.model_dump(mode="json")

    def _alias_of(self, variant: str) -> str | None:
        for v in self.knobs.experiment.variants:
            if v.name == variant:
                return v.alias
        return None

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_registry())

    def _resolve_all(self) -> dict[str, Release]:
        return {
            v.name: Release.resolve_variant(self.uris, v.alias)
            for v in self.knobs.experiment.variants
        }

    async def _watch_registry(self) -> None:
        """Follow alias moves: see the module docstring."""
        candidate: dict[str, Release] = {}
        poll_failed = False
        async for _ in poll_ticks(lambda: self.knobs.registry_poll_s):
            try:
                found = await asyncio.to_thread(self._resolve_all)
            except Exception as e:  # noqa: BLE001 - keep serving the current releases
                self.release_error = f"registry poll failed: {e}"
                logger.warning("%s", self.release_error)
                poll_failed = True
                continue
            if poll_failed:  # the error shown was the poll's: it no longer holds
                logger.info("the registry answers again")
                self.release_error = None
                poll_failed = False
            moved = self._moved(found)
            if not moved:
                candidate = {}
                continue
            if any(not r.same_versions(candidate.get(n)) for n, r in moved.items()):
                candidate = moved  # wait for a second poll to agree: aliases move one by one
                continue
            await self._switch(moved)
            candidate = {}

    def _moved(self, found: dict[str, Release]) -> dict[str, Release]:
        return {
            name: release
            for name, release in found.items()
            if name in self.releases and not release.same_versions(self.releases[name])
        }

    async def _switch(self, moved: dict[str, Release]) -> bool:
        """Warm ``moved`` up through the whole graph, then serve it; on failure keep the old."""
        try:
            for release in moved.values():
                await self._graph(["warm-up"], release, 6 * self.graph_timeout_s)
        except Exception as e:  # noqa: BLE001 - the old release keeps answering
            self.release_error = f"warm-up of {list(moved)} failed: {e!r}"
            logger.error("%s", self.release_error)
            return False
        for name, release in moved.items():
            logger.info("gateway: %s %s -> %s", name, self.releases[name].key, release.key)
            self.previous_releases[name] = self.releases[name]
            self.releases[name] = release
        self.release_swaps += 1
        self.release_error = None
        self.cache.clear()
        return True

    # --- the graph ---------------------------------------------------------------------------

    def _pins_of(self, release: Release) -> dict[str, str]:
        """Stage → the pinned model URI it runs for ``release`` (stages without a model absent)."""
        pins = self._pins.get(release.key)
        if pins is None:
            found = {stage: release.pin(uri) for stage, uri in self.stage_uris.items()}
            pins = {stage: pin for stage, pin in found.items() if pin is not None}
            if len(self._pins) > 64:  # releases come and go: keep the memo small
                self._pins.clear()
            self._pins[release.key] = pins
        return pins

    async def _run(
        self, want: tuple[str, ...], texts: list[str], release: Release, timeout_s: float
    ) -> StageOutput:
        """The columns ``want`` for ``texts`` on ``release``, through the stage groups that
        produce them (every group call started at once; see :func:`finish_route`)."""
        route = self.layout.route(want)
        calls = start_route(self.groups, route, text_batch(texts), self._pins_of(release))
        return await finish_route(calls, route, timeout_s)

    async def _graph(
        self, texts: list[str], release: Release, timeout_s: float, embed: bool = False
    ) -> StageOutput:
        """The whole pipeline's answer for ``texts`` within ``timeout_s`` (with the encoder's
        embeddings when ``embed``)."""
        return await self._run(
            PREDICTION_AND_EMBEDDING if embed else PREDICTION, texts, release, timeout_s
        )

    def _coalescer(self, variant: str) -> Coalescer[GraphRequest, StageOutput]:
        coalescer = self.coalescers.get(variant)
        if coalescer is None:
            knobs = self.knobs

            async def run(requests: list[GraphRequest]) -> list[StageOutput]:
                return await self._predict_batch(variant, requests)

            coalescer = Coalescer(
                run,
                max_batch_size=knobs.max_batch_size,
                max_concurrent=knobs.max_concurrent_batches,
                size_of=lambda request: len(request[0]),
            )
            coalescer.configure(
                knobs.max_batch_size, knobs.max_concurrent_batches, knobs.batch_wait_timeout_s
            )
            self.coalescers[variant] = coalescer
        return coalescer

    async def _predict_batch(self, variant: str, requests: list[GraphRequest]) -> list[StageOutput]:
        sizes = [len(texts) for texts, _, _ in requests]
        ids = [rid for _, rid, _ in requests]
        # This task runs in the coalescer's own context: give the graph call the request id of
        # its first request, so every stage's log lines carry it; the line below ties the other
        # requests of a coalesced call to it.
        _set_request_context(request_id=ids[0])
        if len(ids) > 1:
            logger.info("graph call %s carries %d requests: %s", ids[0], len(ids), ids)
        metric("intent_batch_size").observe(sum(sizes), tags={"stage": "Gateway"})
        # The release is read once per graph call: every text in it runs on the same versions.
        output = await self._graph(
            [t for texts, _, _ in requests for t in texts],
            self.releases[variant],
            self.graph_timeout_s,
            embed=any(embed for _, _, embed in requests),
        )
        return [StageOutput(part, output.models) for part in split_batch(output.batch, sizes)]

    async def _primary(
        self, variant: str, texts: list[str], rid: str, embed: bool = False
    ) -> StageOutput:
        """The full pipeline, behind the circuit breaker and the fallback deadline."""
        fallback = self.knobs.fallback
        if fallback.stage is None:
            return await self._coalescer(variant).submit((texts, rid, embed))
        if not self.breaker.allow():
            raise PrimaryUnavailable(
                "circuit_open", "circuit open: the primary pipeline failed repeatedly"
            )
        try:
            output = await asyncio.wait_for(
                self._coalescer(variant).submit((texts, rid, embed)), fallback.deadline_s
            )
        except TimeoutError as e:
            self.breaker.failure()
            raise PrimaryUnavailable(
                "deadline", f"the primary pipeline missed its {fallback.deadline_s:g}s deadline"
            ) from e
        except STAGE_ERRORS as e:
            self.breaker.failure()
            raise PrimaryUnavailable(
                "error", f"the primary pipeline failed ({type(e).__name__})"
            ) from e
        self.breaker.success()
        return output

    async def _fallback(self, texts: list[str], release: Release) -> StageOutput:
        stage = self.knobs.fallback.stage
        assert stage is not None
        column = f"{self.prefixes[stage]}probs"
        output = await self._run((column,), texts, release, self.graph_timeout_s)
        probs = np.asarray(output.batch[column], dtype=np.float32)
        labels = np.asarray([LABELS[i] for i in probs.argmax(axis=1)], dtype=object)
        return StageOutput({"probs": probs, "label": labels}, output.models)

    def _maybe_shadow(
        self, variant: str, texts: list[str], labels: list[str], took: float, rid: str
    ) -> None:
        shadow = self.knobs.shadow
        if shadow.variant is None or shadow.variant == variant or shadow.fraction <= 0:
            return
        if random.random() >= shadow.fraction:
            return
        if len(self._shadow_tasks) >= shadow.max_in_flight:
            self.shadow_stats.skipped += 1
            return
        task = asyncio.create_task(self._shadow(shadow.variant, texts, labels, took, rid))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self, variant: str, texts: list[str], labels: list[str], took: float, rid: str
    ) -> None:
        started = time.perf_counter()
        try:
            output = await asyncio.wait_for(
                self._coalescer(variant).submit((texts, rid, False)), self.graph_timeout_s
            )
        except Exception as e:  # noqa: BLE001 - a shadow failure never reaches a caller
            self.shadow_stats.errors += 1
            logger.warning("shadow call to %s failed: %r", variant, e)
            return
        shadow_labels = [str(label) for label in output.batch["label"]]
        self.shadow_stats.record(labels, shadow_labels, time.perf_counter() - started - took)
        agreed = sum(a == b for a, b in zip(labels, shadow_labels, strict=True))
        comparisons = metric("intent_shadow_comparisons")
        for outcome, n in (("agree", agreed), ("disagree", len(labels) - agreed)):
            if n:
                comparisons.inc(n, tags={"variant": variant, "outcome": outcome})

    async def _answer(
        self,
        texts: list[str],
        user_key: str | None,
        use_cache: bool,
        rid: str,
        sample: bool = False,
    ) -> PredictResponse:
        """Classify ``texts`` as ``/v1/predict`` does: A/B variant, cache, primary pipeline with
        its fallback, shadow; ``sample`` lets the monitor see it. Text jobs call it through
        :meth:`classify_texts`."""
        self._ensure_watcher()
        started = time.perf_counter()
        variant = self.knobs.experiment.assign(user_key)
        metric("intent_variant_requests").inc(tags={"variant": variant})
        sampled = sample and self._sampled()
        try:
            answer, cached_flags, embeddings = await self._answer_variant(
                texts, variant, use_cache, rid, started, embed=sampled
            )
        except Exception:
            self._observe_request(variant, "error", started)
            raise
        self._observe_request(variant, "degraded" if answer.degraded else "ok", started)
        if sampled:
            self._sample(texts, answer, cached_flags, embeddings, rid, started)
        return answer

    def _sampled(self) -> bool:
        """Whether the monitor sees this request (drawn before its graph call, so that the call
        brings the embeddings back with the answer)."""
        rate = self.knobs.monitoring.sample_rate
        return self.monitor is not None and rate > 0 and random.random() < rate

    @staticmethod
    def _observe_request(variant: str, outcome: str, started: float) -> None:
        metric("intent_request_latency_ms").observe(
            (time.perf_counter() - started) * 1000.0,
            tags={"variant": variant, "outcome": outcome},
        )

    async def _answer_variant(
        self,
        texts: list[str],
        variant: str,
        use_cache: bool,
        rid: str,
        started: float,
        embed: bool = False,
    ) -> tuple[PredictResponse, list[bool], list[np.ndarray | None]]:
        """The answer, which texts came from the cache, and (with ``embed``) each text's
        embedding where the pipeline computed one now (None for cached or degraded texts)."""
        stats = self.variant_stats.setdefault(variant, VariantStats())
        release = self.releases[variant]
        lookups = metric("intent_cache_lookups")
        if use_cache:
            cached: list[CachedAnswer | None] = [
                self.cache.get(text, release.key) for text in texts
            ]
        else:
            self.cache.bypassed += 1
            lookups.inc(len(texts), tags={"result": "bypass"})
            cached = [None] * len(texts)
        missing = [i for i, hit in enumerate(cached) if hit is None]
        if use_cache:
            hits = len(texts) - len(missing)
            for result, n in (("hit", hits), ("miss", len(missing))):
                if n:
                    lookups.inc(n, tags={"result": result})
        labels: list[str] = [hit.label if hit else "" for hit in cached]
        probs: list[tuple[float, ...]] = [hit.probs if hit else () for hit in cached]
        models: dict[str, dict[str, Any]] = next((h.models for h in cached if h), {})
        degraded_reason = None
        embeddings: list[np.ndarray | None] = [None] * len(texts)
        if missing:
            asked = [texts[i] for i in missing]
            try:
                output = await self._primary(variant, asked, rid, embed)
            except (PrimaryUnavailable, *STAGE_ERRORS) as e:
                if self.knobs.fallback.stage is None:
                    stats.errors += 1
                    if isinstance(e, TimeoutError):
                        raise PipelineTimeout(
                            f"the model pipeline did not answer within {self.graph_timeout_s:g}s;"
                            " retry shortly"
                        ) from e
                    raise ModelUnavailable(
                        "the model pipeline is unavailable; retry shortly"
                    ) from e
                code = e.code if isinstance(e, PrimaryUnavailable) else "error"
                degraded_reason = str(e) if isinstance(e, PrimaryUnavailable) else repr(e)
                try:
                    output = await self._fallback(asked, release)
                except STAGE_ERRORS as fallback_error:
                    stats.errors += 1
                    raise ModelUnavailable(
                        "the model pipeline and its fallback are unavailable; retry shortly"
                    ) from fallback_error
                self.fallbacks[code] = self.fallbacks.get(code, 0) + 1
                metric("intent_fallbacks").inc(tags={"reason": code})
            models = output.models
            computed = output.batch.get("embedding") if embed else None
            for j, i in enumerate(missing):
                if computed is not None:
                    embeddings[i] = computed[j]
                labels[i] = str(output.batch["label"][j])
                probs[i] = tuple(float(p) for p in output.batch["probs"][j])
                if degraded_reason is None:
                    self.cache.put(texts[i], release.key, labels[i], probs[i], models)
        took = time.perf_counter() - started
        stats.record(took, labels, degraded=degraded_reason is not None)
        predictions_total = metric("intent_predictions")
        for label, n in collections.Counter(labels).items():
            predictions_total.inc(n, tags={"variant": variant, "label": label})
        if degraded_reason is None:
            self._maybe_shadow(variant, texts, labels, took, rid)
        predictions = [
            Prediction(label=label, probabilities=dict(zip(LABELS, row, strict=True)))
            for label, row in zip(labels, probs, strict=True)
        ]
        answer = PredictResponse(
            request_id=rid,
            predictions=predictions,
            models=_versions(models),
            variant=variant,
            degraded=degraded_reason is not None,
            degraded_reason=degraded_reason,
            cached=len(texts) - len(missing),
        )
        return answer, [hit is not None for hit in cached], embeddings

    # --- monitoring ------------------------------------------------------------------------

    def _sample(
        self,
        texts: list[str],
        answer: PredictResponse,
        cached: list[bool],
        embeddings: list[np.ndarray | None],
        rid: str,
        started: float,
    ) -> None:
        """Queue a sampled answer for the monitor, with the embeddings its graph call returned
        (the monitor embeds only the texts without one: cached answers); sent by
        :meth:`_send_samples`, never awaited by the request."""
        knobs = self.knobs.monitoring
        room = knobs.max_buffered - len(self._samples)
        if room < len(texts):
            self.samples_dropped += len(texts)
            return
        records = log_records(
            texts,
            [p.label for p in answer.predictions],
            [list(p.probabilities.values()) for p in answer.predictions],
            cached,
            label_names=LABELS,
            models={m.stage: f"{m.name}/{m.version}" for m in answer.models if m.stage},
            variant=answer.variant or "",
            request_id=rid,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            degraded=answer.degraded,
        )
        for record, embedding in zip(records, embeddings, strict=True):
            if embedding is not None:
                record["embedding"] = embedding
        self._samples.extend(records)
        if self._sample_sender is None or self._sample_sender.done():
            # A fresh context, not this request's: the sender outlives the request and carries
            # other requests' samples too.
            self._sample_sender = asyncio.create_task(
                self._send_samples(), context=contextvars.Context()
            )

    async def _send_samples(self) -> None:
        """Send what is queued in one call per interval (or per 256 samples)."""
        assert self.monitor is not None
        while self._samples:
            deadline = time.monotonic() + self.knobs.monitoring.flush_interval_s
            while len(self._samples) < 256 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            batch = [self._samples.popleft() for _ in range(min(len(self._samples), 1024))]
            try:
                await asyncio.wait_for(self.monitor.record.remote(batch), 30.0)
            except Exception as e:  # noqa: BLE001 - monitoring never fails a request
                self.samples_dropped += len(batch)
                logger.warning("monitor did not take %d samples: %r", len(batch), e)

    async def classify_texts(
        self, texts: list[str], user_key: str | None = None, trace: str = "job"
    ) -> dict[str, Any]:
        """Handle method for the job runner: one chunk of a texts job, answered exactly as
        ``/v1/predict`` answers (returned as a plain dict). ``trace`` (``job-<id>``) is the
        request id its graph call logs under."""
        answer = await self._answer(texts, user_key, use_cache=True, rid=trace)
        return answer.model_dump(exclude={"request_id"})

    # --- routes ------------------------------------------------------------------------------

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(self, body: PredictRequest, request: Request) -> Response:
        """Classify 1–64 texts; every answer names the model versions that produced it.

        ``X-User-Key`` (the experiment's sticky header) keeps a caller on one A/B variant;
        ``Cache-Control: no-cache`` skips the response cache for this request.
        """
        use_cache = "no-cache" not in request.headers.get("cache-control", "").lower()
        user_key = request.headers.get(self.knobs.experiment.sticky_header)
        answer = await self._answer(
            body.texts, user_key, use_cache, request_id(request), sample=True
        )
        return _json(answer)

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
    async def embeddings(self, body: EmbeddingsRequest, request: Request) -> Response:
        """OpenAI-compatible sentence embeddings from the pipeline's encoder (384 dimensions)."""
        if body.model not in (None, self.encoder_name, self.spec.encoder.model_uri):
            raise ModelNotFound(
                f"model {body.model!r} is not served here; use {self.encoder_name!r}"
            )
        if body.dimensions not in (None, 384):
            raise InvalidRequest(
                "dimensions: this encoder only produces 384-dimensional embeddings"
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        experiment = self.knobs.experiment
        release = self.releases[experiment.assign(request.headers.get(experiment.sticky_header))]
        try:
            output = await self._run(EMBEDDING, texts, release, self.graph_timeout_s)
        except TimeoutError as e:
            raise PipelineTimeout(
                f"the encoder did not answer within {self.graph_timeout_s:g}s; retry shortly"
            ) from e
        except STAGE_ERRORS as e:
            raise ModelUnavailable("the encoder is unavailable; retry shortly") from e
        vectors: np.ndarray = output.batch["embedding"]
        if body.encoding_format == "base64":
            encoded: list[Any] = [
                base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors
            ]
        else:
            encoded = vectors.tolist()
        tokens_used = int(output.batch["num_tokens"].sum())
        return _json(
            EmbeddingsResponse(
                data=[EmbeddingData(index=i, embedding=e) for i, e in enumerate(encoded)],
                model=self.encoder_name,
                usage=EmbeddingsUsage(prompt_tokens=tokens_used, total_tokens=tokens_used),
                models=_versions(output.models),
            )
        )

    async def _describe_all(self) -> list[dict[str, Any]]:
        calls = [handle.describe.remote() for handle in self.groups.values()]
        return await deployment_result(asyncio.gather(*calls), READY_TIMEOUT_S)  # type: ignore[no-any-return]

    @app.get("/v1/models", response_model=ModelsResponse, responses=ERRORS)
    async def models(self) -> ModelsResponse:
        """The release being served (the first A/B variant's): every stage's registered version,
        with its aliases; ``variants`` names the release of every variant."""
        primary = self.knobs.experiment.variants[0].name
        release = self.releases[primary]
        refs = {ref.uri: ref for ref in release.refs}
        models = [
            ModelVersion(stage=stage, **{**refs[uri].to_dict(), "uri": uri})
            for stage, uri in self.stage_uris.items()
            if uri in refs
        ]
        previous = self.previous_releases.get(primary)
        return ModelsResponse(
            models=models,
            ensemble_weights=dict(self.spec.ensemble.weights),
            release=release.key,
            previous_release=None if previous is None else previous.key,
            release_swaps=self.release_swaps,
            release_error=self.release_error,
            variants={name: r.key for name, r in self.releases.items()},
        )

    @app.get("/v1/experiments", response_model=ExperimentsResponse, responses=ERRORS)
    async def experiments(self) -> ExperimentsResponse:
        """The A/B split with per-variant requests, latency and label counts; the shadow
        comparison (agreement, latency difference); fallbacks and the breaker; the cache."""
        knobs = self.knobs
        variants = [
            {
                **v.model_dump(),
                "release": self.releases[v.name].key,
                **self.variant_stats.get(v.name, VariantStats()).to_dict(),
            }
            for v in knobs.experiment.variants
        ]
        return ExperimentsResponse(
            sticky_header=knobs.experiment.sticky_header,
            variants=variants,
            shadow={**knobs.shadow.model_dump(), **self.shadow_stats.to_dict()},
            fallback={
                **knobs.fallback.model_dump(),
                "fallbacks": dict(self.fallbacks),
                "circuit": self.breaker.to_dict(),
            },
            cache=self.cache.to_dict(),
        )

    # --- jobs --------------------------------------------------------------------------------

    def _jobs(self) -> JobStore:
        if self._job_store is None:
            self._job_store = JobStore(get_settings().job_store)
        return self._job_store

    async def _in_store(self, call: Any) -> Any:
        """Run a job-store call in a thread; a store that cannot be reached is a 503, not a 500
        (the store's own refusals, 404/409, pass through)."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return await asyncio.to_thread(call)
        except SQLAlchemyError as e:
            logger.error("job store unavailable: %s", e)
            raise JobsUnavailable("the job store is unavailable; retry shortly") from e

    def _send_job(self, job_id: str) -> None:
        from deployments.job_runner import JobProducer

        if self._job_producer is None:
            self._job_producer = JobProducer(get_settings())
        self._job_producer.send(job_id)
        self._jobs().mark_enqueued(job_id)

    def _check_job(self, body: JobRequest) -> tuple[dict[str, Any], int]:
        """Validate a submission beyond its schema; returns the stored request and its size."""
        settings = get_settings()
        if body.callback_url is not None:
            if settings.webhook_secret is None:
                raise InvalidRequest(
                    "callback_url: webhooks are off on this server (no signing secret is set)"
                )
            check_target(body.callback_url, parse_networks(settings.webhook_networks))
        if body.texts is not None:
            limit = self.knobs.jobs.max_texts
            if len(body.texts) > limit:
                raise TooManyTexts(
                    f"texts: {len(body.texts)} texts, at most {limit} per job; "
                    "send a dataset for more"
                )
            return {"texts": body.texts}, len(body.texts)
        assert body.dataset is not None
        dataset_path(settings, body.dataset.path)  # refuses paths outside the data folder
        return {"dataset": body.dataset.model_dump()}, 0

    @app.post("/v1/jobs", status_code=202, responses=JOB_ERRORS)
    async def submit_job(
        self,
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
        stored, total = await asyncio.to_thread(self._check_job, body)
        user_key = request.headers.get(self.knobs.experiment.sticky_header)
        if user_key is not None and "texts" in stored:
            stored["user_key"] = user_key
        job, created = await self._in_store(
            lambda: self._jobs().create(
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
                await asyncio.to_thread(self._send_job, job.id)
            except Exception as e:  # noqa: BLE001 - the job is stored; the reaper sends it later
                logger.warning("job %s stored but not sent yet: %r", job.id, e)
        headers = {"Location": f"{request.scope.get('root_path', '')}/v1/jobs/{job.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return _json(public_job(job), 202, headers)

    @app.get("/v1/jobs", response_model=JobList, responses=JOB_ERRORS)
    async def list_jobs(
        self,
        request: Request,
        limit: int = Query(default=20, ge=1, le=1000),
        after: str | None = Query(default=None, max_length=64),
        state: JobState | None = None,
    ) -> JobList:
        """Your jobs, newest first, without results; ``after`` is the previous page's
        ``next_cursor``."""
        limit = min(limit, self.knobs.jobs.list_page_max)
        jobs, cursor = await self._in_store(
            lambda: self._jobs().page(caller(request), limit=limit, after=after, state=state)
        )
        return JobList(jobs=[public_job(j, with_result=False) for j in jobs], next_cursor=cursor)

    @app.get("/v1/jobs/{job_id}", responses=JOB_ERRORS)
    async def get_job(self, job_id: JobId, request: Request) -> Response:
        """State, progress, timestamps, webhook deliveries and, once done, the result (texts:
        predictions and model versions; datasets: where the output is)."""
        job = await self._in_store(lambda: self._jobs().get(job_id, caller(request)))
        return _json(public_job(job))

    @app.delete("/v1/jobs/{job_id}", status_code=202, responses=JOB_ERRORS)
    async def cancel_job(self, job_id: JobId, request: Request) -> Response:
        """Cancel: a queued job at once, a running one at its next chunk (``cancel_requested``
        until then). A finished job answers 409."""
        job = await self._in_store(lambda: self._jobs().cancel(job_id, caller(request)))
        return _json(public_job(job, with_result=False), 202)

    # --- monitoring ----------------------------------------------------------------------------

    @app.get("/v1/monitoring/drift", responses=ERRORS)
    async def drift(self) -> Response:
        """Input drift of live traffic against the served encoder version's reference profile:
        ``status`` (``ok``, ``drift``, ``warming_up``, ``no_reference``, ``no_traffic``), each
        signal's score, threshold and alarm, the window and the reference it is compared with."""
        if self.monitor is None:
            raise NotDeployed("this application has no monitor deployment")
        try:
            report = await deployment_result(self.monitor.drift.remote(), READY_TIMEOUT_S)
        except STAGE_ERRORS as e:
            raise ModelUnavailable("the monitor is unavailable; retry shortly") from e
        report["gateway_samples_dropped"] = self.samples_dropped
        return _json(report)

    # --- admin ---------------------------------------------------------------------------------

    @app.post("/v1/admin/promote", responses=ERRORS)
    async def promote(self, body: PromoteRequest) -> Response:
        """Move ``alias`` of each model to the given version (all checked before any moves),
        as ``python -m servecore.registry.models promote`` does; every gateway follows within its
        poll interval, or at once with ``/v1/admin/reload``."""
        from servecore.registry.models import promote

        moves = await asyncio.to_thread(
            self._registry_call, lambda: promote(list(body.versions.items()), body.alias)
        )
        return _json({"moves": [asdict(m) for m in moves]})

    @app.post("/v1/admin/rollback", responses=ERRORS)
    async def rollback(self, body: RollbackRequest) -> Response:
        """Move ``alias`` of each model back to the version it named before its last move."""
        from servecore.registry.models import rollback

        moves = await asyncio.to_thread(
            self._registry_call, lambda: rollback(body.models, body.alias)
        )
        return _json({"moves": [asdict(m) for m in moves]})

    @app.post("/v1/admin/reload", responses=ERRORS)
    async def reload(self) -> Response:
        """Resolve every variant's aliases now and switch to what moved (after a warm-up call
        through the whole graph), without waiting for the next poll."""
        found = await asyncio.to_thread(self._registry_call, self._resolve_all)
        moved = self._moved(found)
        if moved and not await self._switch(moved):
            raise ModelUnavailable(f"the new release did not warm up: {self.release_error}")
        return _json(
            {
                "switched": sorted(moved),
                "variants": {name: r.key for name, r in self.releases.items()},
            }
        )

    @staticmethod
    def _registry_call(call: Any) -> Any:
        """A registry change or read for an admin route: a refused one (unknown model or
        version, nothing to roll back to) is the caller's 422; a store that does not answer is
        a 503 ``registry_unavailable`` with Retry-After, and the models loaded keep serving."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
            failure = registry_failure(e, "the registry call failed")
            if isinstance(failure, RegistryUnavailable):
                logger.warning("%s", failure.message)
                raise failure from e
            raise InvalidRequest(f"the registry refused: {failure.message}") from e

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Liveness: the gateway answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses=ERRORS)
    async def readyz(self) -> Health:
        """Readiness: every stage replica has loaded its model and answers."""
        try:
            await self._describe_all()
        except STAGE_ERRORS as e:
            raise NotReady("not every stage is ready") from e
        return Health(status="ready")

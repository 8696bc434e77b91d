"""What every application's traffic core shares: releases, A/B variants, the circuit breaker in
front of the primary model, the response cache's settings, coalescing and the sample sender.

:class:`ServingCore` knows no protocol and no model: the intent pipeline's core
(:class:`servecore.traffic.core.TrafficCore`, texts in, labels out) and the generic model's core
(:class:`servecore.traffic.model_core.ModelCore`, rows in, a registered model's outputs out) build
on it, so a release switch, an A/B split or a fallback behaves the same in every application.

* **Releases.** Every call runs on one :class:`~servecore.traffic.releases.Release` (the exact
  model versions behind the spec's aliases), pinned in each stage call. A background task polls the
  registry and switches to a new release only once two polls agree and a warm-up call has gone
  through the whole graph on it (:meth:`ServingCore._warm_up`); until then the old one answers.
* **Coalescing.** Concurrent requests of one variant become one graph call per free slot
  (:mod:`servecore.traffic.coalescer`); a subclass says how big a request is and how one
  coalesced call runs.
* **Fallback.** With ``fallback.stage`` set, the primary call runs behind a circuit breaker and a
  deadline (:meth:`ServingCore._primary`); the subclass decides what the backup answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.exceptions import RayError
from ray.serve.context import _set_request_context
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from servecore.errors import (
    ModelNotFound,
    ModelUnavailable,
    NotDeployed,
    NotReady,
    PipelineTimeout,
)
from servecore.monitoring.telemetry import metric
from servecore.pipeline.batching import Batch
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
from servecore.traffic.routing import StageOutput, deployment_result

logger = logging.getLogger("ray.serve")


# A stage that failed, is not deployed, or cannot take the call (back-pressure) — the caller may
# retry. RayServeException covers BackPressureError, DeploymentUnavailableError and
# servecore.traffic.routing.StageFailed (what a stage raised, as the gRPC transport delivers it).
STAGE_ERRORS = (RayError, RayServeException, TimeoutError)

MAX_CONCURRENT_BATCHES = 4
READY_TIMEOUT_S = 10.0
Request = TypeVar("Request")
"""What one caller hands the coalescer (the subclass's request type)."""


@dataclass(frozen=True)
class ServedModel:
    """One model of the pipeline that callers may address on its own (OIP v2's model namespace):
    the whole pipeline, the encoder, or one member."""

    name: str
    kind: str
    """``pipeline``, ``encoder`` or ``member``."""
    stage: str | None
    """The stage that runs it; None for the pipeline."""
    columns: tuple[str, ...]
    """What a call to it returns (the stage's output columns)."""


class MonitoringConfig(BaseModel):
    """What the gateway hands the ``Monitor`` deployment (prediction log and drift window)."""

    model_config = ConfigDict(extra="forbid")

    sample_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of classification requests (``/v1/predict``, the OIP v2 pipeline model) sent to the
    monitor (all their texts). A sampled
    request's graph call also returns its embeddings, so drift scoring costs no second encoder
    pass (only answers served from the cache are embedded again by the monitor)."""
    flush_interval_s: float = Field(default=1.0, gt=0.0, le=60.0)
    """Samples are sent in one call per interval (or sooner, once 256 are waiting)."""
    max_buffered: int = Field(default=10_000, ge=1, le=1_000_000)
    """Samples waiting to be sent; more are dropped (the monitor is down or slow)."""


class FeedbackConfig(BaseModel):
    """``user_config.feedback``: answers kept so that callers can send the true label later
    (``POST /v1/feedback``), for the rollouts' accuracy gate and for retraining."""

    model_config = ConfigDict(extra="forbid")

    record_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of ``/v1/predict`` answers recorded (texts, labels, variant, release) in the job
    store's database; 0 (the default) records nothing and costs nothing per request. Feedback
    on an answer that was not recorded is a 404."""


class TrafficConfig(BaseModel):
    """Live knobs of the traffic core (part of the ``Gateway`` deployment's ``user_config``)."""

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
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)

    @model_validator(mode="after")
    def _shadow_variant_exists(self) -> TrafficConfig:
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


class ServingCore(Generic[Request]):
    """See the module docstring. ``spec`` is the application's spec (anything with
    ``stage_plans()``), ``groups`` the handles of its stage groups, ``monitor`` the monitor's
    (None: nothing is sampled); ``fallback_stages`` are the stages ``fallback.stage`` may name,
    described by ``fallback_rule`` in the error that refuses any other; ``standby_stages`` are
    those that answer only as a fallback, never on the main route (their models keep their own
    alias in every variant and rollout)."""

    def __init__(
        self,
        spec: Any,
        groups: Mapping[str, DeploymentHandle],
        monitor: DeploymentHandle | None,
        fallback_stages: list[str],
        fallback_rule: str,
        standby_stages: Sequence[str] = (),
    ) -> None:
        self.spec = spec
        self.groups = dict(groups)
        self._pins: dict[str, dict[str, str]] = {}
        self._version_pins: dict[tuple[str, str], str] = {}
        """(stage, registered version) → its pinned URI, once the registry confirmed it."""
        self.monitor = monitor
        self._samples: collections.deque[dict[str, Any]] = collections.deque()
        self._sample_sender: asyncio.Task[None] | None = None
        self.samples_dropped = 0
        self.fallback_stages = fallback_stages
        self.fallback_rule = fallback_rule
        self.stage_uris = {
            plan.deployment: plan.init_kwargs.get("model_uri") for plan in self.spec.stage_plans()
        }
        self.uris = spec_model_uris(self.spec)
        main = {uri for stage, uri in self.stage_uris.items() if stage not in standby_stages}
        self.fixed_uris = frozenset(
            uri
            for stage, uri in self.stage_uris.items()
            if stage in standby_stages and uri is not None and uri not in main
        )
        """Models only a standby stage serves: they keep their own alias in every variant."""
        knobs = TrafficConfig()
        self.knobs = knobs
        self.releases: dict[str, Release] = {
            v.name: self.release_at(v.alias) for v in knobs.experiment.variants
        }
        self._retired: dict[str, Release] = {}
        """Releases of variants no longer configured, for the calls already assigned to them
        (a rollout that ends removes its candidate variant while requests are in flight)."""
        self.rollouts: Any = None
        """The replica's :class:`~servecore.rollouts.agent.RolloutAgent` (None: none)."""
        self.previous_releases: dict[str, Release] = {}
        self.release_swaps = 0
        self.release_error: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.graph_timeout_s = knobs.graph_timeout_s
        self.coalescers: dict[str, Coalescer[Request, StageOutput]] = {}
        self.variant_stats: dict[str, VariantStats] = {}
        self.shadow_stats = ShadowStats()
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.breakers: dict[str, CircuitBreaker] = {}
        """One circuit per variant: a failing candidate must not open the champion's."""
        self.fallbacks: dict[str, int] = {}
        self.cache = ResponseCache(knobs.cache)
        logger.info("traffic core serving %s", {n: r.key for n, r in self.releases.items()})

    # --- what a subclass supplies -------------------------------------------------------------

    async def _warm_up(self, release: Release) -> None:
        """One call through the whole graph on ``release`` (before it is served)."""
        raise NotImplementedError

    def _request_size(self, request: Request) -> int:
        """Rows in one caller's request (what ``max_batch_size`` counts)."""
        raise NotImplementedError

    async def _predict_batch(self, variant: str, requests: list[Request]) -> list[StageOutput]:
        """One coalesced graph call for ``requests``: each request's own part of the answer."""
        raise NotImplementedError

    def _summary_extras(self) -> dict[str, Any]:
        """Application-specific entries of :meth:`release_summary`."""
        return {}

    @property
    def sticky_header(self) -> str:
        """The request header whose value keeps a caller on one A/B variant."""
        return self.knobs.experiment.sticky_header

    async def configure(self, knobs: TrafficConfig) -> None:
        """Apply new live knobs (async: it touches asyncio state, coalescers and tasks, that
        belongs to the replica's loop)."""
        stage = knobs.fallback.stage
        if stage is not None and stage not in self.fallback_stages:
            raise ValueError(
                f"fallback.stage {stage!r} must be {self.fallback_rule}: {self.fallback_stages}"
            )
        wanted = {v.name: v.alias for v in knobs.experiment.variants}
        missing = {
            name: alias
            for name, alias in wanted.items()
            if name not in self.releases or self._alias_of(name) != alias
        }
        if missing:
            resolved = await asyncio.to_thread(
                lambda: {n: self.release_at(a) for n, a in missing.items()}
            )
            self.releases.update(resolved)
        for name in set(self.releases) - set(wanted):
            self._retired[name] = self.releases.pop(name)
        for name in set(self._retired) & set(wanted):
            del self._retired[name]
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
        if knobs.fallback != previous.fallback:  # new settings: fresh circuits
            self.breakers = {}
        self.cache.configure(knobs.cache)
        self._ensure_watcher()

    def _alias_of(self, variant: str) -> str | None:
        for v in self.knobs.experiment.variants:
            if v.name == variant:
                return v.alias
        return None

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_registry())
        if self.rollouts is not None:
            self.rollouts.ensure_running()

    def release_of(self, variant: str) -> Release:
        """The release ``variant`` runs on, also just after it stopped being configured (for
        calls already assigned to it)."""
        release = self.releases.get(variant)
        return release if release is not None else self._retired[variant]

    def breaker(self, variant: str) -> CircuitBreaker:
        found = self.breakers.get(variant)
        if found is None:
            fallback = self.knobs.fallback
            found = CircuitBreaker(fallback.failure_threshold, fallback.cooldown_s)
            self.breakers[variant] = found
        return found

    def resolve_all(self) -> dict[str, Release]:
        """Every variant's release as the registry's aliases name it now (blocking: call it in
        a thread)."""
        return {v.name: self.release_at(v.alias) for v in self.knobs.experiment.variants}

    def release_at(self, alias: str) -> Release:
        """The release of a variant on ``alias``, fallback-only models at their own alias
        (blocking: call it in a thread)."""
        return Release.resolve_variant(self.uris, alias, keep=self.fixed_uris)

    async def _watch_registry(self) -> None:
        """Follow alias moves: see the module docstring."""
        candidate: dict[str, Release] = {}
        poll_failed = False
        async for _ in poll_ticks(lambda: self.knobs.registry_poll_s):
            try:
                found = await asyncio.to_thread(self.resolve_all)
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
                await self._warm_up(release)
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

    # --- calls -------------------------------------------------------------------------------

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

    def _coalescer(self, variant: str) -> Coalescer[Request, StageOutput]:
        coalescer = self.coalescers.get(variant)
        if coalescer is None:
            knobs = self.knobs

            async def run(requests: list[Request]) -> list[StageOutput]:
                return await self._predict_batch(variant, requests)

            coalescer = Coalescer(
                run,
                max_batch_size=knobs.max_batch_size,
                max_concurrent=knobs.max_concurrent_batches,
                size_of=self._request_size,
            )
            coalescer.configure(
                knobs.max_batch_size, knobs.max_concurrent_batches, knobs.batch_wait_timeout_s
            )
            self.coalescers[variant] = coalescer
        return coalescer

    async def _primary(self, variant: str, request: Request) -> StageOutput:
        """The full pipeline, behind the circuit breaker and the fallback deadline."""
        fallback = self.knobs.fallback
        if fallback.stage is None:
            return await self._coalescer(variant).submit(request)
        breaker = self.breaker(variant)
        if not breaker.allow():
            raise PrimaryUnavailable(
                "circuit_open", "circuit open: the primary pipeline failed repeatedly"
            )
        try:
            output = await asyncio.wait_for(
                self._coalescer(variant).submit(request), fallback.deadline_s
            )
        except TimeoutError as e:
            breaker.failure()
            raise PrimaryUnavailable(
                "deadline", f"the primary pipeline missed its {fallback.deadline_s:g}s deadline"
            ) from e
        except STAGE_ERRORS as e:
            breaker.failure()
            raise PrimaryUnavailable(
                "error", f"the primary pipeline failed ({type(e).__name__})"
            ) from e
        breaker.success()
        return output

    def _variant_for(self, user_key: str | None, variant: str | None) -> str:
        """The caller's A/B variant (sticky by ``user_key``), or the one it names (an unknown one
        is :class:`ModelNotFound`); counted per variant."""
        if variant is None:
            variant = self.knobs.experiment.assign(user_key)
        elif variant not in self.releases:
            raise ModelNotFound(f"no variant {variant!r}; variants: {sorted(self.releases)}")
        metric("intent_variant_requests").inc(tags={"variant": variant})
        return variant

    def _cache_lookup(
        self, keys: Sequence[str], release: Release, use_cache: bool
    ) -> list[CachedAnswer | None]:
        """The cached answer of every key on ``release`` (None where there is none, and for every
        key when the caller bypasses the cache); hits, misses and bypasses are counted."""
        lookups = metric("intent_cache_lookups")
        if not use_cache:
            self.cache.bypassed += 1
            lookups.inc(len(keys), tags={"result": "bypass"})
            return [None] * len(keys)
        cached = [self.cache.get(key, release.key) for key in keys]
        hits = sum(hit is not None for hit in cached)
        for result, n in (("hit", hits), ("miss", len(keys) - hits)):
            if n:
                lookups.inc(n, tags={"result": result})
        return cached

    async def _answer_or_fallback(
        self,
        variant: str,
        request: Request,
        fallback: Callable[[], Awaitable[StageOutput]],
        what: str,
    ) -> tuple[StageOutput, str | None]:
        """The primary's output for ``request``, or with ``fallback.stage`` set and the primary
        failing, late or behind an open circuit, ``fallback()``'s; and why the backup answered
        (None when the primary did). Errors name ``what`` answers (``model pipeline``...)."""
        stats = self.variant_stats.setdefault(variant, VariantStats())
        try:
            return await self._primary(variant, request), None
        except (PrimaryUnavailable, *STAGE_ERRORS) as e:
            if self.knobs.fallback.stage is None:
                stats.errors += 1
                if isinstance(e, TimeoutError):
                    raise PipelineTimeout(
                        f"the {what} did not answer within {self.graph_timeout_s:g}s; retry shortly"
                    ) from e
                raise ModelUnavailable(f"the {what} is unavailable; retry shortly") from e
            code = e.code if isinstance(e, PrimaryUnavailable) else "error"
            reason = str(e) if isinstance(e, PrimaryUnavailable) else repr(e)
        try:
            output = await fallback()
        except STAGE_ERRORS as fallback_error:
            stats.errors += 1
            raise ModelUnavailable(
                f"the {what} and its fallback are unavailable; retry shortly"
            ) from fallback_error
        self.fallbacks[code] = self.fallbacks.get(code, 0) + 1
        metric("intent_fallbacks").inc(tags={"reason": code})
        return output, reason

    # --- shadow ----------------------------------------------------------------------------

    def _labels_of(self, batch: Batch) -> list[str]:
        """The labels in a graph call's output, which the shadow compares."""
        raise NotImplementedError

    def _maybe_shadow(self, variant: str, request: Request, labels: list[str], took: float) -> None:
        """Replay ``request`` (answered with ``labels`` in ``took`` s) on the shadow variant, off
        the response path, when the shadow knobs draw it."""
        shadow = self.knobs.shadow
        if shadow.variant is None or shadow.variant == variant or shadow.fraction <= 0:
            return
        if random.random() >= shadow.fraction:
            return
        if len(self._shadow_tasks) >= shadow.max_in_flight:
            self.shadow_stats.skipped += 1
            return
        task = asyncio.create_task(self._shadow(shadow.variant, request, labels, took))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, variant: str, request: Request, labels: list[str], took: float) -> None:
        started = time.perf_counter()
        try:
            output = await asyncio.wait_for(
                self._coalescer(variant).submit(request), self.graph_timeout_s
            )
        except Exception as e:  # noqa: BLE001 - a shadow failure never reaches a caller
            self.shadow_stats.errors += 1
            logger.warning("shadow call to %s failed: %r", variant, e)
            if (evidence := self._evidence(variant)) is not None:
                evidence.shadow(True, 0, 0, None)
            return
        spent = time.perf_counter() - started
        shadow_labels = self._labels_of(output.batch)
        evidence = self._evidence(variant)
        if len(shadow_labels) != len(labels):
            if evidence is not None:  # outputs that are not labels (scores): nothing to compare
                evidence.shadow(False, 0, 0, spent * 1000.0)
            return
        self.shadow_stats.record(labels, shadow_labels, spent - took)
        agreed = sum(a == b for a, b in zip(labels, shadow_labels, strict=True))
        if evidence is not None:
            evidence.shadow(False, len(labels), agreed, spent * 1000.0)
        comparisons = metric("intent_shadow_comparisons")
        for outcome, n in (("agree", agreed), ("disagree", len(labels) - agreed)):
            if n:
                comparisons.inc(n, tags={"variant": variant, "outcome": outcome})

    # --- batches and monitoring --------------------------------------------------------------

    @staticmethod
    def _batch_started(ids: list[str], rows: int, what: str) -> None:
        """Give a coalesced call the request id of its first request (every stage's log lines
        carry it; this task runs in the coalescer's own context) and log which requests it
        carries."""
        _set_request_context(request_id=ids[0])
        if len(ids) > 1:
            logger.info("%s %s carries %d requests: %s", what, ids[0], len(ids), ids)
        metric("intent_batch_size").observe(rows, tags={"stage": "Gateway"})

    def _sampled(self) -> bool:
        """Whether the monitor sees this request (drawn before its graph call, so that the call
        brings the embeddings back with the answer)."""
        rate = self.knobs.monitoring.sample_rate
        return self.monitor is not None and rate > 0 and random.random() < rate

    def _evidence(self, variant: str) -> Any:
        """The rollout's evidence buffer when ``variant`` is its candidate (None: no rollout)."""
        agent = self.rollouts
        if agent is None or agent.buffer is None or variant != "candidate":
            return None
        return agent.buffer

    def _observe_request(
        self, variant: str, outcome: str, started: float, computed: bool = True
    ) -> None:
        """Export the request's latency; with a rollout running, count it as evidence (its
        latency only when the pipeline computed the answer: cached answers say nothing of a
        release's speed)."""
        latency_ms = (time.perf_counter() - started) * 1000.0
        metric("intent_request_latency_ms").observe(
            latency_ms, tags={"variant": variant, "outcome": outcome}
        )
        agent = self.rollouts
        if agent is not None and agent.buffer is not None:
            agent.buffer.request(variant, outcome != "ok", latency_ms if computed else None)

    def _start_sender(self) -> None:
        """Make sure queued samples are on their way (a task of its own, never awaited)."""
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

    # --- single models, for fronts that address them one by one ----------------------------

    # --- versions, health and views -----------------------------------------------------------

    def release_for(self, user_key: str | None) -> tuple[str, Release]:
        """The A/B variant ``user_key`` is assigned to, and its release."""
        variant = self.knobs.experiment.assign(user_key)
        return variant, self.releases[variant]

    def stage_version(self, stage: str, release: Release) -> dict[str, Any] | None:
        """The registered version ``stage`` runs in ``release`` (name, version, aliases, uri)."""
        uri = self.stage_uris.get(stage)
        for ref in release.refs:
            if ref.uri == uri:
                return {**ref.to_dict(), "uri": uri}
        return None

    async def version_pins(self, model: ServedModel, version: str) -> dict[str, str]:
        """Stage → pinned URI for registered ``version`` of ``model``, for every stage that runs
        that registered model (the encoder's version pins its tokenizer too). A version the
        registry does not hold is :class:`ModelNotFound`. Stage replicas load a pinned version on
        first use and keep a bounded number loaded (``max_loaded_versions``)."""
        from servecore.registry.client import pinned_version_uri

        uri = self.stage_uris.get(model.stage or "")
        if uri is None:
            raise ModelNotFound(f"model {model.name!r} has no registered versions")
        pinned = self._version_pins.get((model.name, version))
        if pinned is None:
            pinned = await asyncio.to_thread(pinned_version_uri, uri, version)
            if len(self._version_pins) > 256:
                self._version_pins.clear()
            self._version_pins[model.name, version] = pinned
        return {
            stage: pinned
            for stage, stage_uri in self.stage_uris.items()
            if registered_name(stage_uri) == model.name
        }

    async def describe_groups(self) -> list[dict[str, Any]]:
        """Every stage group's ``describe()`` (what it has loaded); raises what a group raised."""
        calls = [handle.describe.remote() for handle in self.groups.values()]
        found: list[dict[str, Any]] = await deployment_result(
            asyncio.gather(*calls), READY_TIMEOUT_S
        )
        return found

    async def check_ready(self) -> None:
        """Every stage replica has loaded its model and answers; else :class:`NotReady`."""
        try:
            await self.describe_groups()
        except STAGE_ERRORS as e:
            raise NotReady("not every stage is ready") from e

    def release_summary(self) -> dict[str, Any]:
        """The release being served (the first A/B variant's): every stage's registered version,
        the ensemble weights, the previous release, swaps, the last error, every variant's."""
        primary = self.knobs.experiment.variants[0].name
        release = self.releases[primary]
        previous = self.previous_releases.get(primary)
        return {
            "models": [
                {"stage": stage, **info}
                for stage in self.stage_uris
                if (info := self.stage_version(stage, release)) is not None
            ],
            **self._summary_extras(),
            "release": release.key,
            "previous_release": None if previous is None else previous.key,
            "release_swaps": self.release_swaps,
            "release_error": self.release_error,
            "variants": {name: r.key for name, r in self.releases.items()},
        }

    def experiment_summary(self) -> dict[str, Any]:
        """The A/B split with per-variant statistics, the shadow comparison, fallbacks with the
        breaker, and the cache."""
        knobs = self.knobs
        return {
            "sticky_header": knobs.experiment.sticky_header,
            "variants": [
                {
                    **v.model_dump(),
                    "release": self.releases[v.name].key,
                    **self.variant_stats.get(v.name, VariantStats()).to_dict(),
                }
                for v in knobs.experiment.variants
            ],
            "shadow": {**knobs.shadow.model_dump(), **self.shadow_stats.to_dict()},
            "fallback": {
                **knobs.fallback.model_dump(),
                "fallbacks": dict(self.fallbacks),
                "circuit": self.breaker(knobs.experiment.variants[0].name).to_dict(),
                "circuits": {name: b.to_dict() for name, b in sorted(self.breakers.items())},
            },
            "cache": self.cache.to_dict(),
        }

    async def drift(self) -> dict[str, Any]:
        """The monitor's drift report, with the samples this replica had to drop."""
        if self.monitor is None:
            raise NotDeployed("this application has no monitor deployment")
        try:
            report: dict[str, Any] = await deployment_result(
                self.monitor.drift.remote(), READY_TIMEOUT_S
            )
        except STAGE_ERRORS as e:
            raise ModelUnavailable("the monitor is unavailable; retry shortly") from e
        report["gateway_samples_dropped"] = self.samples_dropped
        return report

    async def switch_to(self, found: dict[str, Release]) -> dict[str, Any]:
        """Switch to the releases of ``found`` (from :meth:`resolve_all`) that moved, after a
        warm-up call through the whole graph, without waiting for the next poll."""
        moved = self._moved(found)
        if moved and not await self._switch(moved):
            raise ModelUnavailable(f"the new release did not warm up: {self.release_error}")
        return {
            "switched": sorted(moved),
            "variants": {name: r.key for name, r in self.releases.items()},
        }


def registered_name(uri: str | None) -> str | None:
    """``models:/intent-head-mlp@champion`` → ``intent-head-mlp``."""
    if not uri or not uri.startswith("models:/"):
        return None
    return uri.removeprefix("models:/").split("/")[0].split("@")[0]

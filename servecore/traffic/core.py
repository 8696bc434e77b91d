"""The traffic core: everything between "these texts, this caller" and "these predictions, these
versions", for every protocol front (REST v1, OpenAI embeddings, Open Inference Protocol v2 over
REST and gRPC, text jobs).

It knows no protocol: a front parses its request, calls :class:`TrafficCore` and renders what comes
back (:class:`Classification`, :class:`~servecore.traffic.routing.StageOutput`) and the
:class:`~servecore.errors.ServingError` it raises in its own shapes.

What it does, per call:

* **Releases.** Every graph call runs on one :class:`~servecore.traffic.releases.Release` (the exact
  model versions behind the spec's aliases), pinned in each stage call, so an answer never mixes
  versions. A background task polls the registry and switches to a new release only once two polls
  agree and a warm-up call has gone through the whole graph on it; until then the old one answers.
* **A/B, shadow, cache, fallback** (:mod:`servecore.traffic.experiments`): the caller's sticky key
  picks a variant; a share of answered requests is replayed on the shadow variant; answers are
  cached per text and release; a circuit breaker and a deadline put a backup model in front of a
  failing primary pipeline.
* **Coalescing** (:mod:`servecore.traffic.coalescer`): concurrent classification requests become
  one graph call per free slot, so the downstream hops are paid per micro-batch instead of per
  request (on a 2-core machine each Serve hop costs milliseconds of CPU). Within a call every
  fan-out ``.remote()`` starts before anything is awaited (:mod:`servecore.traffic.routing`).
* **Monitoring.** A sample of answers goes to the monitor deployment in the background, with the
  embeddings its graph call brought back; per-variant statistics and metrics are kept here.

One instance lives in each gateway replica, on the replica's event loop.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.serve.handle import DeploymentHandle

from servecore import LABELS
from servecore.errors import (
    ModelUnavailable,
    PipelineTimeout,
)
from servecore.monitoring.prediction_log import records as log_records
from servecore.monitoring.telemetry import metric
from servecore.pipeline.batching import Batch, split_batch, text_batch
from servecore.pipeline.graph import PREDICTION, Layout
from servecore.pipeline.spec import PipelineSpec
from servecore.traffic.base import (
    STAGE_ERRORS,
    MonitoringConfig,
    ServedModel,
    ServingCore,
    TrafficConfig,
    registered_name,
)
from servecore.traffic.experiments import (
    VariantStats,
)
from servecore.traffic.releases import Release
from servecore.traffic.routing import StageOutput, finish_route, start_route

logger = logging.getLogger("ray.serve")

__all__ = [
    "Classification",
    "MonitoringConfig",
    "ServedModel",
    "TrafficConfig",
    "TrafficCore",
]
"""``MonitoringConfig``, ``ServedModel`` and ``TrafficConfig`` live in :mod:`.base`; they are
named here too, where the gateway and the fronts import them."""

PREDICTION_AND_EMBEDDING = (*PREDICTION, "embedding")
"""What a graph call holding a request the monitor sees asks for."""
GraphRequest = tuple[list[str], str, bool]
"""What the coalescer gathers: one request's texts, its request id, and whether the monitor will
see it (then the graph call also returns the texts' embeddings, which drift scoring needs, so
the monitor never runs the encoder again for them)."""


@dataclass
class Classification:
    """The core's answer to one classification request, in no protocol's shape."""

    request_id: str
    labels: list[str]
    probabilities: list[tuple[float, ...]]
    """One row per text, in :data:`servecore.LABELS` order."""
    models: dict[str, dict[str, Any]]
    """Stage → the model version that ran it (stage, name, version, uri, aliases)."""
    variant: str
    degraded_reason: str | None
    """Why the backup model answered; None when the primary pipeline did."""
    cached: int
    """How many of the answers came from the response cache."""

    @property
    def degraded(self) -> bool:
        return self.degraded_reason is not None


class TrafficCore(ServingCore[GraphRequest]):
    """See the module docstring. ``groups`` are the handles of the pipeline's stage groups,
    ``monitor`` the drift monitor's (None: nothing is sampled)."""

    def __init__(
        self,
        spec: PipelineSpec,
        groups: Mapping[str, DeploymentHandle],
        monitor: DeploymentHandle | None = None,
    ) -> None:
        self.spec = spec
        self.layout = Layout(spec)
        self.text_stages = [m.deployment for m in spec.members if m.input == "text"]
        self.prefixes = {plan.deployment: plan.output_prefix for plan in spec.stage_plans()}
        self.encoder_name = spec.encoder_name()
        super().__init__(spec, groups, monitor, self.text_stages, "a text-input member")
        self._served = self._addressable()

    def _summary_extras(self) -> dict[str, Any]:
        return {"ensemble_weights": dict(self.spec.ensemble.weights)}

    async def _warm_up(self, release: Release) -> None:
        await self._graph(["warm-up"], release, 6 * self.graph_timeout_s)

    def _request_size(self, request: GraphRequest) -> int:
        return len(request[0])

    # --- the graph ---------------------------------------------------------------------------

    async def _run(
        self,
        want: tuple[str, ...],
        texts: list[str],
        release: Release,
        timeout_s: float,
        pins: Mapping[str, str] | None = None,
    ) -> StageOutput:
        """The columns ``want`` for ``texts`` on ``release``, through the stage groups that
        produce them (every group call started at once; see :func:`finish_route`)."""
        route = self.layout.route(want)
        pinned = self._pins_of(release)
        if pins:
            pinned = {**pinned, **pins}
        calls = start_route(self.groups, route, text_batch(texts), pinned)
        return await finish_route(calls, route, timeout_s)

    async def _graph(
        self, texts: list[str], release: Release, timeout_s: float, embed: bool = False
    ) -> StageOutput:
        """The whole pipeline's answer for ``texts`` within ``timeout_s`` (with the encoder's
        embeddings when ``embed``)."""
        return await self._run(
            PREDICTION_AND_EMBEDDING if embed else PREDICTION, texts, release, timeout_s
        )

    async def _predict_batch(self, variant: str, requests: list[GraphRequest]) -> list[StageOutput]:
        sizes = [len(texts) for texts, _, _ in requests]
        ids = [rid for _, rid, _ in requests]
        self._batch_started(ids, sum(sizes), "graph call")
        # The release is read once per graph call: every text in it runs on the same versions.
        output = await self._graph(
            [t for texts, _, _ in requests for t in texts],
            self.release_of(variant),
            self.graph_timeout_s,
            embed=any(embed for _, _, embed in requests),
        )
        return [StageOutput(part, output.models) for part in split_batch(output.batch, sizes)]

    async def _fallback(self, texts: list[str], release: Release) -> StageOutput:
        stage = self.knobs.fallback.stage
        assert stage is not None
        column = f"{self.prefixes[stage]}probs"
        output = await self._run((column,), texts, release, self.graph_timeout_s)
        probs = np.asarray(output.batch[column], dtype=np.float32)
        labels = np.asarray([LABELS[i] for i in probs.argmax(axis=1)], dtype=object)
        return StageOutput({"probs": probs, "label": labels}, output.models)

    def _labels_of(self, batch: Batch) -> list[str]:
        return [str(label) for label in batch["label"]]

    async def classify(
        self,
        texts: list[str],
        user_key: str | None,
        use_cache: bool,
        rid: str,
        sample: bool = False,
        variant: str | None = None,
    ) -> Classification:
        """Classify ``texts`` for a caller: its A/B variant (``user_key`` is the sticky key),
        the cache (unless ``use_cache`` is false), the primary pipeline with its fallback, the
        shadow; ``sample`` lets the monitor see it. ``rid`` is the request id the graph call logs
        under; ``variant`` names the A/B variant instead of the sticky key (one that is not
        configured is :class:`ModelNotFound`)."""
        self._ensure_watcher()
        started = time.perf_counter()
        variant = self._variant_for(user_key, variant)
        sampled = sample and self._sampled()
        try:
            answer, cached_flags, embeddings = await self._answer_variant(
                texts, variant, use_cache, rid, started, embed=sampled
            )
        except Exception:
            self._observe_request(variant, "error", started)
            raise
        self._observe_request(
            variant, "degraded" if answer.degraded else "ok", started, answer.cached < len(texts)
        )
        agent = self.rollouts
        rate = self.knobs.feedback.record_rate
        if agent is not None and rate > 0 and random.random() < rate:
            release = self.release_of(variant).key
            agent.record_answer(rid, variant, release, texts, answer.labels)
        if sampled:
            self._sample(texts, answer, cached_flags, embeddings, rid, started)
        return answer

    async def _answer_variant(
        self,
        texts: list[str],
        variant: str,
        use_cache: bool,
        rid: str,
        started: float,
        embed: bool = False,
    ) -> tuple[Classification, list[bool], list[np.ndarray | None]]:
        """The answer, which texts came from the cache, and (with ``embed``) each text's
        embedding where the pipeline computed one now (None for cached or degraded texts)."""
        stats = self.variant_stats.setdefault(variant, VariantStats())
        release = self.release_of(variant)
        cached = self._cache_lookup(texts, release, use_cache)
        missing = [i for i, hit in enumerate(cached) if hit is None]
        labels: list[str] = [hit.label if hit else "" for hit in cached]
        probs: list[tuple[float, ...]] = [hit.probs if hit else () for hit in cached]
        models: dict[str, dict[str, Any]] = next((h.models for h in cached if h), {})
        degraded_reason = None
        embeddings: list[np.ndarray | None] = [None] * len(texts)
        if missing:
            asked = [texts[i] for i in missing]
            output, degraded_reason = await self._answer_or_fallback(
                variant,
                (asked, rid, embed),
                lambda: self._fallback(asked, release),
                "model pipeline",
            )
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
            self._maybe_shadow(variant, (texts, rid, False), labels, took)
        answer = Classification(
            request_id=rid,
            labels=labels,
            probabilities=probs,
            models=models,
            variant=variant,
            degraded_reason=degraded_reason,
            cached=len(texts) - len(missing),
        )
        return answer, [hit is not None for hit in cached], embeddings

    # --- monitoring ------------------------------------------------------------------------

    def _sample(
        self,
        texts: list[str],
        answer: Classification,
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
            answer.labels,
            [list(row) for row in answer.probabilities],
            cached,
            label_names=LABELS,
            models={
                info["stage"]: f"{info['name']}/{info['version']}"
                for info in answer.models.values()
                if info.get("stage")
            },
            variant=answer.variant,
            request_id=rid,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            degraded=answer.degraded,
        )
        for record, embedding in zip(records, embeddings, strict=True):
            if embedding is not None:
                record["embedding"] = embedding
        self._samples.extend(records)
        self._start_sender()

    def served_models(self) -> list[ServedModel]:
        """The pipeline (named after the application's encoder family: ``intent``), the encoder
        and every member, as callers may address them; names are the registered model names."""
        return self._served

    def _addressable(self) -> list[ServedModel]:
        models = [ServedModel(self.pipeline_name, "pipeline", None, PREDICTION)]
        models.append(ServedModel(self.encoder_name, "encoder", "Encoder", ("embedding",)))
        for member in self.spec.members:
            name = registered_name(member.model_uri) or member.name
            column = f"{self.prefixes[member.deployment]}probs"
            models.append(ServedModel(name, "member", member.deployment, (column,)))
        return models

    @property
    def pipeline_name(self) -> str:
        return self.encoder_name.split("-")[0] or "pipeline"

    async def run(
        self,
        want: tuple[str, ...],
        texts: list[str],
        release: Release,
        pins: Mapping[str, str] | None = None,
        what: str = "the model",
    ) -> StageOutput:
        """The columns ``want`` for ``texts`` on ``release`` (``pins`` override single stages'
        versions), with the graph deadline; failures are :class:`PipelineTimeout` or
        :class:`ModelUnavailable`."""
        try:
            return await self._run(want, texts, release, self.graph_timeout_s, pins)
        except TimeoutError as e:
            raise PipelineTimeout(
                f"{what} did not answer within {self.graph_timeout_s:g}s; retry shortly"
            ) from e
        except STAGE_ERRORS as e:
            raise ModelUnavailable(f"{what} is unavailable; retry shortly") from e

    # --- health and views ------------------------------------------------------------------

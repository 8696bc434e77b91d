"""The gateway: the Serve ingress deployment in front of the pipeline graph.

It holds no traffic policy and no protocol of its own. It builds the one
:class:`~servecore.traffic.core.TrafficCore` of its replica (releases, A/B, shadow, cache, fallback,
coalescing, sampling to the monitor), hands it to the protocol fronts of
:mod:`servecore.api` (REST v1, OpenAI embeddings, OIP v2 over REST, jobs, admin, health; all
plain FastAPI routers on :data:`servecore.api.app.app`) and serves OIP v2 over gRPC through Serve's
gRPC ingress (:class:`servecore.api.v2_grpc.InferenceServicer`, whose methods Serve calls by RPC
name). Live knobs arrive in ``user_config`` (:class:`GatewayUserConfig`) and are handed on.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from servecore.api import context
from servecore.api import v1 as rest_v1
from servecore.api.app import app
from servecore.api.auth import KeyRing, LimitsConfig
from servecore.api.jobs import JobDesk, JobsConfig
from servecore.api.v1 import StreamingConfig
from servecore.api.v2_grpc import InferenceServicer
from servecore.pipeline.spec import PipelineSpec
from servecore.rollouts.agent import Override, RolloutAgent
from servecore.rollouts.model import CANDIDATE_ALIAS, CANDIDATE_VARIANT
from servecore.settings import get_settings
from servecore.traffic.base import ServingCore
from servecore.traffic.core import TrafficConfig, TrafficCore
from servecore.traffic.experiments import ShadowConfig, Variant

logger = logging.getLogger("ray.serve")


class GatewayUserConfig(TrafficConfig):
    """Live knobs of the gateway (``user_config`` of the ``Gateway`` deployment): the traffic
    core's, the jobs front's limits and the access limits of every front."""

    jobs: JobsConfig = Field(default_factory=JobsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)


class GatewayReplica(InferenceServicer):
    """What every gateway replica does with its core (plain, so both ingress deployments share
    it): installs the fronts' services, warns about open access, applies live knobs and the
    split of the rollout its application runs (:mod:`servecore.rollouts.agent`)."""

    knobs_class: type[TrafficConfig] = TrafficConfig

    def _install(self, core: ServingCore[Any]) -> None:
        self.core = core
        self.knobs = self.knobs_class()
        self.override: Override | None = None
        settings = get_settings()
        keyring = KeyRing(settings.api_keys)
        limits = getattr(self.knobs, "limits", LimitsConfig())
        self.services = context.Services(core, JobDesk(), keyring, limits)
        replica = serve.get_replica_context()
        self.services.app_name = replica.app_name
        if settings.rollout_sync_s > 0:
            core.rollouts = RolloutAgent(
                core,
                replica.app_name,
                replica.replica_id.unique_id,
                self._apply_override,
                sync_s=settings.rollout_sync_s,
            )
        context.install(self.services)
        if keyring.open:
            logger.warning(
                "NO API KEYS ARE CONFIGURED: every route is open to anyone who can reach this "
                "port. Set INTENT_SERVING_API_KEYS (python -m servecore.api.auth new NAME) "
                "before exposing it."
            )
        else:
            logger.info("API keys: %s", [k.name for k in keyring.keys])

    async def reconfigure(self, config: dict[str, Any]) -> None:
        knobs = self.knobs_class.model_validate(config or {})
        await self.core.configure(self._effective(knobs))
        self.knobs = knobs
        if isinstance(knobs, GatewayUserConfig):
            self.services.jobs.knobs = knobs.jobs
            self.services.streaming = knobs.streaming
        self.services.limits = getattr(knobs, "limits", LimitsConfig())

    def _effective(self, knobs: TrafficConfig) -> TrafficConfig:
        """The knobs with the running rollout's split in place of the A/B split and shadow:
        the first variant (the champion) and the candidate, weighted by the step."""
        override = self.override
        if override is None:
            return knobs
        base = knobs.experiment.variants[0]
        share = override.candidate_percent
        variants = [
            Variant(name=base.name, alias=base.alias, weight=100.0 - share),
            Variant(name=CANDIDATE_VARIANT, alias=CANDIDATE_ALIAS, weight=share),
        ]
        shadow = ShadowConfig(
            variant=CANDIDATE_VARIANT if override.shadow > 0 else None,
            fraction=override.shadow,
            max_in_flight=knobs.shadow.max_in_flight,
        )
        experiment = knobs.experiment.model_copy(update={"variants": variants})
        return knobs.model_copy(update={"experiment": experiment, "shadow": shadow})

    async def _apply_override(self, override: Override | None) -> None:
        self.override = override
        await self.core.configure(self._effective(self.knobs))

    async def check_health(self) -> None:
        """Serve's periodic health check; it also keeps the rollout agent running (it follows
        the application's rollout even while no request arrives)."""
        if self.core.rollouts is not None:
            self.core.rollouts.ensure_running()

    async def current_knobs(self) -> dict[str, Any]:
        """The live knobs this replica applies now (a handle method, no route): ``user_config``
        lands a moment after a deploy returns, so operators and tests ask instead of guessing."""
        return self.knobs.model_dump(mode="json")


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Gateway(GatewayReplica):
    knobs_class = GatewayUserConfig

    def __init__(
        self,
        spec: dict[str, Any],
        groups: dict[str, DeploymentHandle],
        job_runner: DeploymentHandle | None = None,
        monitor: DeploymentHandle | None = None,
        streams: DeploymentHandle | None = None,
    ) -> None:
        # job_runner is bound so that the runners deploy with the application; the gateway only
        # puts job ids on their queue. The stream consumer likewise (it calls classify_texts);
        # the gateway asks it for GET /v1/streams.
        self._install(TrafficCore(PipelineSpec.model_validate(spec), groups, monitor))
        self.services.streams = streams

    async def classify_texts(
        self, texts: list[str], user_key: str | None = None, trace: str = "job"
    ) -> dict[str, Any]:
        """Handle method for the job runner: one chunk of a texts job, answered exactly as
        ``/v1/predict`` answers (returned as a plain dict)."""
        return await rest_v1.classify_for_job(texts, user_key, trace)

"""The ingress of a generic model application (``graphs/model.py``): a registered MLflow model
behind MLflow's ``/invocations``, OIP v2 over REST and gRPC, admin, views and health.

Like the intent gateway it holds no policy of its own: it builds the replica's
:class:`~servecore.traffic.model_core.ModelCore` (releases, A/B, shadow, cache, fallback,
coalescing, sampling to the monitor) and hands it to the fronts of
:data:`servecore.api.app.model_app`; gRPC requests reach it through Serve's gRPC ingress with
metadata ``application: <app name>``. Live knobs (:class:`ModelGatewayUserConfig`) arrive in
``user_config``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.gateway import GatewayReplica
from servecore.api.app import model_app
from servecore.api.auth import LimitsConfig
from servecore.pipeline.model_spec import ModelAppSpec
from servecore.traffic.core import TrafficConfig
from servecore.traffic.model_core import ModelCore


class ModelGatewayUserConfig(TrafficConfig):
    """Live knobs of a generic model application's gateway: the traffic core's and the access
    limits. ``fallback.stage: Fallback`` turns the spec's ``fallback_uri`` model on."""

    limits: LimitsConfig = Field(default_factory=LimitsConfig)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(model_app)
class ModelGateway(GatewayReplica):
    knobs_class = ModelGatewayUserConfig

    def __init__(
        self,
        spec: dict[str, Any],
        groups: dict[str, DeploymentHandle],
        monitor: DeploymentHandle | None = None,
    ) -> None:
        app = serve.get_replica_context().app_name
        self._install(ModelCore(ModelAppSpec.model_validate(spec), groups, monitor, app=app))

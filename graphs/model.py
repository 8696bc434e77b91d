"""A generic model application: any registered MLflow model, served by configuration alone.

``serve_config.yaml`` names ``graphs.model:build_app`` with a
:class:`~servecore.pipeline.model_spec.ModelAppSpec` as ``args``::

    - name: breast-cancer
      route_prefix: /breast-cancer
      import_path: graphs.model:build_app
      args:
        model_uri: models:/breast-cancer@champion

Deployments: ``Gateway`` (:class:`deployments.model_gateway.ModelGateway`: MLflow's
``/invocations``, OIP v2 over REST and gRPC, admin, views, health), ``Model`` (the generic stage
wrapper around :class:`deployments.pyfunc_model.PyfuncModel`, gathering concurrent calls into one
``predict``), ``Fallback`` when the spec names a ``fallback_uri``, and ``Monitor``
(:class:`deployments.model_monitor.ModelMonitor`: prediction log and per-feature drift).
Resources, replicas, autoscaling and live knobs come from the config's ``deployments`` section,
as for every application; the defaults below are what runs when it names none.

No ``from __future__ import annotations`` here: Serve reads ``build_app``'s annotation at run time
to validate ``args`` into the spec.
"""

from pydantic import BaseModel
from ray.serve import Application

from deployments.model_gateway import ModelGateway, ModelGatewayUserConfig
from deployments.model_monitor import ModelMonitor, ModelMonitorUserConfig
from deployments.stage import Stage, StageUserConfig
from servecore.pipeline.model_spec import ModelAppSpec


def build_app(args: ModelAppSpec) -> Application:
    groups = {
        group.name: Stage.options(
            name=group.name,
            max_ongoing_requests=32,
            ray_actor_options={"num_cpus": 0, "num_gpus": 0},
        ).bind(group)
        for group in args.group_plans()
    }
    spec = args.model_dump()
    monitor = ModelMonitor.options(
        name="Monitor", ray_actor_options={"num_cpus": 0, "num_gpus": 0}
    ).bind(spec)
    gateway = ModelGateway.options(name="Gateway", ray_actor_options={"num_cpus": 0, "num_gpus": 0})
    return gateway.bind(spec, groups, monitor)


def user_config_schema(deployment: str) -> type[BaseModel]:
    """Live-knob model of a deployment (for ``servecore.config_check``)."""
    if deployment == "Gateway":
        return ModelGatewayUserConfig
    if deployment == "Monitor":
        return ModelMonitorUserConfig
    return StageUserConfig


def registry_checks(spec: ModelAppSpec) -> list[str]:
    """What ``python -m servecore.config_check --registry`` checks beyond the URIs resolving:
    every model the spec names has a signature the gateway can check inputs against."""
    from servecore.registry.client import resolve
    from servecore.signature import NoSignature
    from servecore.traffic.model_core import load_version_info

    problems = []
    for uri in filter(None, (spec.model_uri, spec.fallback_uri)):
        try:
            ref = resolve(uri)
            load_version_info(f"models:/{ref.name}/{ref.version}")
        except NoSignature as e:
            problems.append(f"{uri}: {e}")
        except Exception:  # noqa: BLE001 - an unresolvable URI is reported by the caller
            continue
    return problems

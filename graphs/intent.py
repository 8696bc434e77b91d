"""The intent-routing application: gateway → tokenizer → encoder → heads ⇉ ensemble, plus a
bag-of-words model on the raw text in parallel.

``serve_config.yaml`` names ``graphs.intent:build_app`` with the pipeline spec as ``args``.
Resources and live knobs of each deployment are set in the config's ``deployments`` section; the
code defaults below are only what runs when a deployment is not listed there.

No ``from __future__ import annotations`` here: Serve reads ``build_app``'s annotation at run time
to validate ``args`` into the pydantic spec.
"""

from pydantic import BaseModel
from ray.serve import Application

from deployments.gateway import Gateway, GatewayUserConfig
from deployments.stage import Stage, StageUserConfig
from servecore.spec import PipelineSpec


def build_app(args: PipelineSpec) -> Application:
    stages = {}
    for plan in args.stage_plans():
        options: dict = {"name": plan.deployment}
        if plan.deployment != "Encoder":
            options["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": 0}
        stages[plan.deployment] = Stage.options(**options).bind(
            plan.stage_class, plan.init_kwargs, plan.output_prefix
        )
    return Gateway.options(name="Gateway").bind(args.model_dump(), stages)


def user_config_schema(deployment: str) -> tuple[type[BaseModel], int]:
    """Live-knob model of a deployment and its ``max_concurrent_batches`` (for config checks)."""
    if deployment == "Gateway":
        return GatewayUserConfig, 1  # its max_batch_size counts texts, a bound on requests too
    return StageUserConfig, 1

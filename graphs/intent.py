"""The intent-routing application: gateway → tokenizer → encoder → heads ⇉ ensemble, plus a
bag-of-words model on the raw text, the job runner that serves ``/v1/jobs``, the monitor that
keeps the prediction log and the drift window, and (with ``INTENT_SERVING_STREAMS_URL`` set) the
stream consumer that scores Redis Streams messages.

The stages run in the spec's groups (``groups:``): one Serve deployment per group, named after it,
whose replicas run the group's plain classes in process; without groups every stage is a
deployment of its own.

``serve_config.yaml`` names ``graphs.intent:build_app`` with the pipeline spec as ``args``.
Resources and live knobs of each deployment are set in the config's ``deployments`` section; the
code defaults below are only what runs when a deployment is not listed there.

No ``from __future__ import annotations`` here: Serve reads ``build_app``'s annotation at run time
to validate ``args`` into the pydantic spec.
"""

from pydantic import BaseModel
from ray.serve import Application

from deployments.gateway import Gateway, GatewayUserConfig
from deployments.job_runner import JobRunnerUserConfig, job_runner_deployment
from deployments.monitor import Monitor, MonitorUserConfig
from deployments.stage import Stage, StageUserConfig
from deployments.stream_consumer import StreamConsumer
from servecore.pipeline.graph import EMBEDDING, Layout
from servecore.pipeline.spec import PipelineSpec
from servecore.settings import get_settings
from servecore.streams.config import StreamsConfig


def build_app(args: PipelineSpec) -> Application:
    groups = {}
    for group in args.group_plans():
        # The encoder's group takes a CPU (torch gets one thread per granted CPU); the same
        # placement as serve_config.yaml, whose ray_actor_options replace these.
        cpus = 1 if "Encoder" in group.stage_names else 0
        groups[group.name] = Stage.options(
            name=group.name, ray_actor_options={"num_cpus": cpus, "num_gpus": 0}
        ).bind(group)
    runner = job_runner_deployment(get_settings()).options(
        ray_actor_options={"num_cpus": 0, "num_gpus": 0}
    )
    monitor = Monitor.options(name="Monitor", ray_actor_options={"num_cpus": 0, "num_gpus": 0})
    spec = args.model_dump()
    embedder = {hop.group: groups[hop.group] for hop in Layout(args).route(EMBEDDING)}
    gateway = Gateway.options(name="Gateway", ray_actor_options={"num_cpus": 0, "num_gpus": 0})
    streams = None
    if get_settings().streams_url is not None:
        # Only with a Redis to read from: otherwise not even a replica starts.
        options = {"num_cpus": 0, "num_gpus": 0}
        streams = StreamConsumer.options(ray_actor_options=options).bind()
    return gateway.bind(spec, groups, runner.bind(), monitor.bind(spec, embedder), streams)


def user_config_schema(deployment: str) -> type[BaseModel]:
    """Live-knob model of a deployment (for ``servecore.config_check``)."""
    if deployment == "Gateway":
        return GatewayUserConfig
    if deployment == "JobRunner":
        return JobRunnerUserConfig
    if deployment == "Monitor":
        return MonitorUserConfig
    if deployment == "StreamConsumer":
        return StreamsConfig
    return StageUserConfig

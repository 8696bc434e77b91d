"""The FastAPI applications gateway replicas serve: the protocol fronts' routers behind the one
access guard, with errors in each protocol's own shape.

* :data:`app` — the intent pipeline's gateway: REST v1 (streamed answers too), OpenAI
  embeddings, OIP v2, jobs (with their event streams), stream status, admin, views, health.
* :data:`model_app` — a generic model application's gateway (``graphs/model.py``): MLflow's
  ``/invocations``, OIP v2, admin, views, health.

A new protocol front is one module with a ``router`` (or, for gRPC, methods on the gateway through
:class:`servecore.api.v2_grpc.InferenceServicer`): it parses its protocol, calls the traffic core
and renders the answer and the errors in its own shape.
"""

from __future__ import annotations

from types import ModuleType

from fastapi import FastAPI

from servecore.api import (
    admin,
    context,
    feedback,
    health,
    jobs,
    mlflow_scoring,
    openai,
    rollouts,
    streams,
    v1,
    v2,
    views,
)
from servecore.api.auth import Guard
from servecore.api.http_errors import error_response, install_error_handlers


def build(title: str, description: str, fronts: tuple[ModuleType, ...]) -> FastAPI:
    built = FastAPI(title=title, version="0.1.0", description=description)
    install_error_handlers(built)
    built.add_middleware(
        Guard,
        keyring=context.keyring,
        limits=context.limits,
        render=error_response,
        rates=context.rates,
    )
    for front in fronts:
        built.include_router(front.router)
    return built


app = build(
    "Intent serving",
    "Customer-support intent routing on Ray Serve, models from the MLflow registry.",
    (v1, openai, v2, jobs, streams, admin, rollouts, feedback, views, health),
)
model_app = build(
    "Model serving",
    "A registered MLflow model on Ray Serve: OIP v2 (REST and gRPC) and MLflow's /invocations.",
    (mlflow_scoring, v2, admin, rollouts, views, health),
)

"""The FastAPI application every gateway replica serves: the protocol fronts' routers behind the
one access guard, with errors in each protocol's own shape.

A new protocol front is one module with a ``router`` (or, for gRPC, methods on the gateway through
:class:`servecore.api.v2_grpc.InferenceServicer`): it parses its protocol, calls the traffic core
and renders the answer and the errors in its own shape.
"""

from __future__ import annotations

from fastapi import FastAPI

from servecore.api import admin, context, health, jobs, openai, v1, v2
from servecore.api.auth import Guard
from servecore.api.http_errors import error_response, install_error_handlers

app = FastAPI(
    title="Intent serving",
    version="0.1.0",
    description="Customer-support intent routing on Ray Serve, models from the MLflow registry.",
)
install_error_handlers(app)
app.add_middleware(
    Guard,
    keyring=context.keyring,
    limits=context.limits,
    render=error_response,
    rates=context.rates,
)
for front in (v1, openai, v2, jobs, admin, health):
    app.include_router(front.router)

"""Health: ``/healthz`` (the gateway answers) and ``/readyz`` (every stage has loaded its model)."""

from __future__ import annotations

from fastapi import APIRouter

from servecore.api.common import ERRORS
from servecore.api.context import services
from servecore.api.schemas import Health

router = APIRouter()


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the gateway answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=ERRORS)
async def readyz() -> Health:
    """Readiness: every stage replica has loaded its model and answers."""
    await services().core.check_ready()
    return Health(status="ready")

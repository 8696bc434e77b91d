"""Views of a gateway's state, the same for every application: ``/v1/models`` (the release
served), ``/v1/experiments`` (A/B, shadow, fallback, cache) and ``/v1/monitoring/drift``."""

from __future__ import annotations

from fastapi import APIRouter, Response

from servecore.api.common import ERRORS, json_response
from servecore.api.context import services
from servecore.api.schemas import ExperimentsResponse, ModelsResponse

router = APIRouter()


@router.get("/v1/models", response_model=ModelsResponse, responses=ERRORS)
async def models() -> ModelsResponse:
    """The release being served (the first A/B variant's): every stage's registered version,
    with its aliases; ``variants`` names the release of every variant."""
    return ModelsResponse(**services().core.release_summary())


@router.get("/v1/experiments", response_model=ExperimentsResponse, responses=ERRORS)
async def experiments() -> ExperimentsResponse:
    """The A/B split with per-variant requests, latency and label counts; the shadow
    comparison (agreement, latency difference); fallbacks and the breaker; the cache."""
    return ExperimentsResponse(**services().core.experiment_summary())


@router.get("/v1/monitoring/drift", responses=ERRORS)
async def drift() -> Response:
    """Input drift of live traffic against the served encoder version's reference profile:
    ``status`` (``ok``, ``drift``, ``warming_up``, ``no_reference``, ``no_traffic``), each
    signal's score, threshold and alarm, the window and the reference it is compared with."""
    return json_response(await services().core.drift())

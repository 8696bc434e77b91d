"""Admin: ``/v1/admin/promote``, ``/v1/admin/rollback`` (alias moves in the registry) and
``/v1/admin/reload`` (switch to what moved now)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import TypeVar

from fastapi import APIRouter, Response

from servecore.api.common import ERRORS, json_response
from servecore.api.context import services
from servecore.api.schemas import PromoteRequest, RollbackRequest
from servecore.errors import InvalidRequest, RegistryUnavailable
from servecore.registry.client import registry_failure

logger = logging.getLogger("ray.serve")
router = APIRouter()
T = TypeVar("T")


async def registry_call(call: Callable[[], T]) -> T:
    """A registry change or read for an admin route, in a thread: a refused one (unknown model
    or version, nothing to roll back to) is the caller's 422; a store that does not answer is a
    503 ``registry_unavailable`` with Retry-After, and the models loaded keep serving."""
    try:
        return await asyncio.to_thread(call)
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        failure = registry_failure(e, "the registry call failed")
        if isinstance(failure, RegistryUnavailable):
            logger.warning("%s", failure.message)
            raise failure from e
        raise InvalidRequest(f"the registry refused: {failure.message}") from e


@router.post("/v1/admin/promote", responses=ERRORS)
async def promote(body: PromoteRequest) -> Response:
    """Move ``alias`` of each model to the given version (all checked before any moves),
    as ``python -m servecore.registry.models promote`` does; every gateway follows within its
    poll interval, or at once with ``/v1/admin/reload``."""
    from servecore.registry.models import promote

    moves = await registry_call(lambda: promote(list(body.versions.items()), body.alias))
    return json_response({"moves": [asdict(m) for m in moves]})


@router.post("/v1/admin/rollback", responses=ERRORS)
async def rollback(body: RollbackRequest) -> Response:
    """Move ``alias`` of each model back to the version it named before its last move."""
    from servecore.registry.models import rollback

    moves = await registry_call(lambda: rollback(body.models, body.alias))
    return json_response({"moves": [asdict(m) for m in moves]})


@router.post("/v1/admin/reload", responses=ERRORS)
async def reload() -> Response:
    """Resolve every variant's aliases now and switch to what moved (after a warm-up call
    through the whole graph), without waiting for the next poll."""
    core = services().core
    found = await registry_call(core.resolve_all)
    return json_response(await core.switch_to(found))

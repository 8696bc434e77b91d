"""Rollouts of the gateway's application (``admin`` scope): start one, read one with its evidence
and decisions, list them, and pause, resume, advance or abort by hand.

The state lives in the store (:mod:`servecore.rollouts.store`), not in this replica: any gateway
replica answers for the application, and the rollout goes on when one dies.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import ValidationError

from servecore.api.common import ERRORS, json_response
from servecore.api.context import services
from servecore.api.schemas import RolloutActionRequest, StartRolloutRequest
from servecore.errors import InvalidRequest, RegistryUnavailable, RolloutConflict, RolloutNotFound
from servecore.registry.client import registry_failure
from servecore.rollouts import control
from servecore.rollouts.model import Rollout, RolloutPlan
from servecore.rollouts.store import RolloutConflict as StoredConflict
from servecore.traffic.base import registered_name

router = APIRouter()
CONFLICT: dict[int | str, dict[str, Any]] = {409: ERRORS[404]}


def _app() -> str:
    return services().app_name


@router.post("/v1/rollouts", status_code=201, responses={**ERRORS, **CONFLICT})
async def start(body: StartRolloutRequest) -> Response:
    """Start a rollout of ``candidate`` (registered model → version) in this application: its
    ``candidate`` alias moves to those versions and the steps begin with the first."""
    core = services().core
    plan_fields: dict[str, Any] = {"app": _app(), "candidate": body.candidate, "note": body.note}
    if body.steps is not None:
        plan_fields["steps"] = body.steps
    if body.gates is not None:
        plan_fields["gates"] = body.gates
    try:
        plan = RolloutPlan.model_validate(plan_fields)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
        )
        raise InvalidRequest(f"invalid rollout: {problems}") from e
    if plan.gates.accuracy and core.knobs.feedback.record_rate == 0:
        raise InvalidRequest(
            "the accuracy gate needs recorded answers: set feedback.record_rate above 0"
        )
    served = sorted({name for uri in core.uris if (name := registered_name(uri))})
    store = control.get_store()

    def run() -> Rollout:
        try:
            return control.start_rollout(store, plan, "admin", served_models=served)
        except StoredConflict as e:
            raise RolloutConflict(str(e)) from e

    try:
        rollout = await asyncio.to_thread(run)
    except RolloutConflict:
        raise
    except Exception as e:  # noqa: BLE001 - sorted into refused (422) / unavailable (503)
        failure = registry_failure(e, "starting the rollout failed")
        if isinstance(failure, RegistryUnavailable):
            raise failure from e
        raise InvalidRequest(f"the registry refused: {failure.message}") from e
    return json_response(rollout.view(), status_code=201)


def _get(rollout_id: str) -> Rollout:
    rollout = control.get_store().get(rollout_id)
    if rollout is None or rollout.app != _app():
        raise RolloutNotFound(f"no rollout {rollout_id!r} in application {_app()!r}")
    return rollout


@router.get("/v1/rollouts", responses=ERRORS)
async def list_rollouts() -> Response:
    """This application's rollouts, newest first (the running one, if any, first of all)."""
    found = await asyncio.to_thread(control.get_store().recent, _app())
    return json_response({"rollouts": [r.view() for r in found], "now": time.time()})


@router.get("/v1/rollouts/{rollout_id}", responses=ERRORS)
async def get(rollout_id: str) -> Response:
    """The step, each gate's evidence (counts, statistic, threshold, verdict) and the
    history of decisions."""
    rollout = await asyncio.to_thread(_get, rollout_id)
    return json_response(rollout.view())


@router.post("/v1/rollouts/{rollout_id}/{action}", responses={**ERRORS, **CONFLICT})
async def steer(
    rollout_id: str,
    action: Literal["pause", "resume", "advance", "abort"],
    body: RolloutActionRequest | None = None,
) -> Response:
    """``pause`` (no step advances; a failing gate still rolls back), ``resume``, ``advance``
    (the next step now, whatever the gates say) or ``abort`` (back to the champion)."""
    await asyncio.to_thread(_get, rollout_id)
    reason = body.reason if body is not None else ""

    def run() -> Rollout:
        return control.act(control.get_store(), rollout_id, action, "operator", reason)

    try:
        rollout = await asyncio.to_thread(run)
    except ValueError as e:
        raise RolloutConflict(str(e)) from e
    return json_response(rollout.view())

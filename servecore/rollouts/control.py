"""Starting, steering and ending rollouts, shared by the admin routes, the command line and the
retraining job: the registry side (the ``candidate`` alias, promotion, decision tags) and the
one-line JSON record of every decision.

Blocking (MLflow and the store): callers on an event loop run these in a thread.
"""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from typing import TYPE_CHECKING

from servecore.rollouts.model import (
    CANDIDATE_ALIAS,
    Decision,
    Rollout,
    RolloutPlan,
)
from servecore.rollouts.store import RolloutConflict, RolloutStore

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger("ray.serve")
TAG = "rollout.{id}.{n:03d}"
"""Model-version tag of decision ``n`` of rollout ``id`` (on every candidate version)."""
RESULT_TAG = "rollout.{id}.result"


@lru_cache(maxsize=4)
def get_store(url: str | None = None) -> RolloutStore:
    """The store of the job store's database (settings), one per process and URL."""
    from servecore.settings import get_settings

    return RolloutStore(url or get_settings().job_store)


def log_decision(rollout: Rollout, decision: Decision) -> None:
    """The decision as one JSON log line (replicas log JSON; the line is the message) and a
    count on ``intent_rollout_decisions`` (where a metrics exporter runs: a replica)."""
    record = {
        "event": "rollout_decision",
        "rollout": rollout.id,
        "app": rollout.app,
        "status": rollout.status,
        **decision.model_dump(exclude={"gates"}),
        "gates": {g.gate: g.verdict for g in decision.gates},
    }
    logger.info("%s", json.dumps(record, sort_keys=True))
    try:
        from servecore.monitoring.telemetry import metric

        metric("intent_rollout_decisions").inc(
            tags={"app": rollout.app, "action": decision.action, "by": decision.by}
        )
    except Exception:  # noqa: BLE001 - outside Ray (the command line) there is no exporter
        logger.debug("no metrics exporter here", exc_info=True)


def start_rollout(
    store: RolloutStore,
    plan: RolloutPlan,
    by: str,
    client: MlflowClient | None = None,
    served_models: list[str] | None = None,
) -> Rollout:
    """Check the candidate's versions, point the ``candidate`` alias at them and store a running
    rollout. ``served_models`` (the app's registered models, when known) refuses a candidate the
    application does not serve. :class:`RolloutConflict` when the app has a rollout running;
    RegistryError (422 at the API) for a version the registry lacks."""
    from servecore.errors import RegistryError
    from servecore.registry.client import get_client, resolve
    from servecore.registry.models import promote

    if served_models is not None:
        unknown = sorted(set(plan.candidate) - set(served_models))
        if unknown:
            raise RegistryError(
                f"{unknown} not served by application {plan.app!r}: it serves {served_models}"
            )
    running = store.current(plan.app)
    if running is not None and running.active:
        raise RolloutConflict(
            f"application {plan.app!r} already runs rollout {running.id}: one at a time "
            "(abort it first)"
        )
    if running is not None:
        raise RolloutConflict(
            f"rollout {running.id} of {plan.app!r} has ended ({running.status}) but the registry "
            "does not show it yet (a gateway of the application applies it): retry shortly"
        )
    client = client or get_client()
    champion = {}
    for name, version in plan.candidate.items():
        ref = resolve(f"models:/{name}@{plan.champion_alias}", client)
        if ref.version == version:
            raise RegistryError(f"{name} version {version} already is @{plan.champion_alias}")
        champion[name] = ref.version
    promote(list(plan.candidate.items()), CANDIDATE_ALIAS, client)
    rollout = Rollout(plan=plan, champion=champion)
    decision = rollout.start(by, time.time())
    store.create(rollout)
    log_decision(rollout, decision)
    return rollout


def act(store: RolloutStore, rollout_id: str, action: str, by: str, reason: str = "") -> Rollout:
    """An operator's action (``pause``, ``resume``, ``advance``, ``abort``), recorded like the
    automatic ones. KeyError: no such rollout; ValueError: the action does not apply now."""
    rollout, decision = store.update(rollout_id, lambda r: r.act(action, by, time.time(), reason))
    log_decision(rollout, decision)
    return rollout


def sync_registry(
    store: RolloutStore, rollout: Rollout, client: MlflowClient | None = None
) -> Rollout:
    """Write what the registry does not show yet: every new decision as a tag on each candidate
    version, and once the rollout has ended the alias moves (promoted: ``champion`` names the
    candidate's versions; either way the ``candidate`` alias is removed). Idempotent: the leader
    calls it until ``effects_done``."""
    from servecore.registry.client import get_client
    from servecore.registry.models import promote

    client = client or get_client()
    for n in range(rollout.tagged, len(rollout.history)):
        value = rollout.history[n].model_dump_json()
        for name, version in rollout.plan.candidate.items():
            client.set_model_version_tag(name, version, TAG.format(id=rollout.id, n=n), value)
    done = not rollout.active
    if done and not rollout.effects_done:
        if rollout.status == "completed":
            promote(list(rollout.plan.candidate.items()), rollout.plan.champion_alias, client)
        for name, version in rollout.plan.candidate.items():
            model = client.get_registered_model(name)
            if str((model.aliases or {}).get(CANDIDATE_ALIAS)) == version:
                client.delete_registered_model_alias(name, CANDIDATE_ALIAS)
            client.set_model_version_tag(
                name, version, RESULT_TAG.format(id=rollout.id), rollout.status
            )
    tagged = len(rollout.history)

    def mark(stored: Rollout) -> None:
        stored.tagged = max(stored.tagged, tagged)
        if done and stored.status == rollout.status:
            stored.effects_done = True

    updated, _ = store.update(rollout.id, mark)
    if updated.effects_done:
        store.drop_evidence(rollout.id)  # sent by replicas after the end: nobody reads it
    return updated


__all__ = ["RolloutConflict", "act", "get_store", "start_rollout", "sync_registry"]

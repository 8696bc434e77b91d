"""The rollout agent of one gateway replica: it gathers the evidence of the rollout its
application runs, applies the rollout's traffic split, and, when it holds the lease, judges the
step and records the decisions.

Every ``sync_s`` (a task on the replica's loop, never on a request's path):

1. Send what this replica saw since the last sync (an :class:`EvidenceBuffer` drained on the
   loop) and the answers recorded for feedback to the store (one transaction each, in a thread).
2. Read the application's current rollout. The replica that holds the lease (any one; another
   takes over when a leader stops renewing it) folds every replica's evidence into the rollout,
   evaluates the gates (:meth:`~servecore.rollouts.model.Rollout.evaluate`) and writes the
   decision, then brings the registry up to date (decision tags, alias moves at the end).
3. Apply the rollout's split through the gateway's own A/B and shadow knobs: the champion variant
   and a ``candidate`` variant on the ``candidate`` alias, weighted by the step. A new candidate
   release is warmed up through the whole graph before it gets traffic; when the rollout ends the
   override goes (after a switch to the promoted release), and the base knobs apply again.

With no rollout running the agent costs one store read per ``sync_s`` per replica and nothing per
request: the request path only records evidence while a buffer is installed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from servecore.monitoring.telemetry import metric
from servecore.rollouts.control import get_store, log_decision, sync_registry
from servecore.rollouts.model import (
    CANDIDATE_ALIAS,
    CANDIDATE_VARIANT,
    LATENCY_CAP,
    Evidence,
    Rollout,
    Signals,
    VariantEvidence,
)

logger = logging.getLogger("ray.serve")

VERDICT_VALUE = {"fail": -1.0, "wait": 0.0, "skip": 0.5, "pass": 1.0}
"""How a gate verdict is exported on ``intent_rollout_gate``."""
STATUS_VALUE = {"running": 0.0, "completed": 1.0, "rolled_back": -1.0, "aborted": -2.0}
PREDICTION_RETENTION_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class Override:
    """The split a rollout step asks the gateway to apply."""

    rollout: str
    candidate_percent: float
    shadow: float


class EvidenceBuffer:
    """What this replica saw of one rollout step since its last sync (used on the loop only)."""

    def __init__(self, rollout_id: str, step: int, champion: str) -> None:
        self.rollout_id = rollout_id
        self.step = step
        self.champion = champion
        self.evidence = Evidence()
        self._rng = random.Random()

    def _side(self, variant: str) -> VariantEvidence | None:
        if variant == CANDIDATE_VARIANT:
            return self.evidence.candidate
        if variant == self.champion:
            return self.evidence.champion
        return None

    def _sample(self, side: VariantEvidence, latency_ms: float) -> None:
        side.latency_seen += 1
        if len(side.latencies_ms) < LATENCY_CAP:
            side.latencies_ms.append(latency_ms)
        else:  # reservoir sampling: every latency seen is kept with the same chance
            slot = self._rng.randrange(side.latency_seen)
            if slot < LATENCY_CAP:
                side.latencies_ms[slot] = latency_ms

    def request(self, variant: str, failed: bool, latency_ms: float | None) -> None:
        side = self._side(variant)
        if side is None:
            return
        side.requests += 1
        side.failures += int(failed)
        if latency_ms is not None and not failed:
            self._sample(side, latency_ms)

    def shadow(self, failed: bool, compared: int, agreed: int, latency_ms: float | None) -> None:
        ev = self.evidence
        ev.shadow_calls += 1
        ev.shadow_failures += int(failed)
        ev.compared += compared
        ev.agreed += agreed
        if latency_ms is not None and not failed:
            self._sample(ev.candidate, latency_ms)

    def drain(self) -> Evidence | None:
        found, self.evidence = self.evidence, Evidence()
        return None if found.empty else found


class RolloutAgent:
    """See the module docstring. ``apply`` installs an :class:`Override` (None: the base knobs)
    on the gateway replica; ``core`` is its traffic core."""

    def __init__(
        self,
        core: Any,
        app: str,
        replica: str,
        apply: Callable[[Override | None], Awaitable[None]],
        sync_s: float = 1.0,
        store_url: str | None = None,
    ) -> None:
        self.core = core
        self.app = app
        self.replica = replica
        self.apply = apply
        self.sync_s = sync_s
        self.store_url = store_url
        self.buffer: EvidenceBuffer | None = None
        self.answers: list[dict[str, Any]] = []
        self.applied: Override | None = None
        self.leader = False
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._forgotten_at = 0.0

    # --- what the request path calls --------------------------------------------------------

    def record_answer(
        self, rid: str, variant: str, release: str, texts: list[str], labels: list[str]
    ) -> None:
        """Keep an answer for feedback (sent at the next sync); bounded: past 10 000 waiting,
        answers are not recorded (the store is not keeping up)."""
        if len(self.answers) < 10_000:
            self.answers.append(
                {
                    "request_id": rid,
                    "app": self.app,
                    "variant": variant,
                    "release": release,
                    "texts": list(texts),
                    "labels": list(labels),
                    "created_at": time.time(),
                }
            )

    # --- the loop -----------------------------------------------------------------------------

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.sync_s)
            try:
                await self.sync()
                if self.last_error is not None:
                    logger.info("rollout agent: the store answers again")
                self.last_error = None
            except RuntimeError as e:
                if "shutdown" in str(e):
                    return  # the replica is stopping: its thread pool is gone
                if self.last_error is None:
                    logger.warning("rollout agent: sync failed: %r", e)
                self.last_error = repr(e)
            except Exception as e:  # noqa: BLE001 - keep following; the split stays as it is
                if self.last_error is None:
                    logger.warning("rollout agent: sync failed: %r", e)
                self.last_error = repr(e)

    async def sync(self) -> Rollout | None:
        """One round (see the module docstring); returns the rollout followed (None: none)."""
        buffer = self.buffer
        evidence = buffer.drain() if buffer is not None else None
        answers, self.answers = self.answers, []
        # The drift alarm is read by every replica that follows a running step (one monitor
        # call per sync): whichever holds the lease judges with it.
        drift = await self._drift_alarm() if buffer is not None else None
        try:
            rollout = await asyncio.to_thread(self._sync_store, buffer, evidence, answers, drift)
        except Exception:
            # The store did not take them: keep them for the next sync (bounded), so an outage
            # loses neither recorded answers nor evidence.
            self.answers = (answers + self.answers)[:10_000]
            if buffer is not None and evidence is not None and self.buffer is buffer:
                buffer.evidence.merge(evidence)
            raise
        await self._follow(rollout)
        return rollout

    async def _drift_alarm(self) -> bool | None:
        if getattr(self.core, "monitor", None) is None:
            return None
        try:
            report = await self.core.drift()
        except Exception as e:  # noqa: BLE001 - no report: hold, as an alarm would
            logger.warning("rollout agent: no drift report: %r", e)
            return True
        # The intent monitor reports ``alarm``; a model application's monitor its ``status``.
        return bool(report.get("alarm", report.get("status") == "drift"))

    def _sync_store(
        self,
        buffer: EvidenceBuffer | None,
        evidence: Evidence | None,
        answers: list[dict[str, Any]],
        drift: bool | None,
    ) -> Rollout | None:
        store = get_store(self.store_url)
        if answers:
            store.record_predictions(answers)
        rollout = store.current(self.app)
        if rollout is None:
            self.leader = False
            return None
        ours = buffer is not None and buffer.rollout_id == rollout.id
        if ours and evidence is not None and rollout.active:
            assert buffer is not None
            store.add_evidence(buffer.rollout_id, buffer.step, evidence)
        self.leader = store.lead(rollout.id, self.replica, lease_s=max(3.0, 3 * self.sync_s))
        if not self.leader:
            return rollout
        if rollout.active:
            signals = Signals(drift_alarm=drift)
            if rollout.plan.gates.accuracy:
                signals.accuracy = store.accuracy(self.app, rollout.step_started_at)
            folded = store.fold_evidence(rollout.id, lambda r: r.evaluate(signals, time.time()))
            if folded is not None:
                rollout, decision = folded
                if decision is not None:
                    log_decision(rollout, decision)
        if rollout.tagged < len(rollout.history) or (
            not rollout.active and not rollout.effects_done
        ):
            rollout = sync_registry(store, rollout)
        now = time.time()
        if now - self._forgotten_at > 3600:
            self._forgotten_at = now
            store.forget_predictions(now - PREDICTION_RETENTION_S)
        return rollout

    # --- following the rollout ----------------------------------------------------------------

    def _export(self, rollout: Rollout) -> None:
        tags = {"app": self.app}
        metric("intent_rollout_step").set(float(rollout.step), tags=tags)
        traffic = rollout.traffic()
        metric("intent_rollout_traffic").set(0.0 if traffic is None else traffic[0], tags=tags)
        metric("intent_rollout_status").set(STATUS_VALUE[rollout.status], tags=tags)
        for gate in rollout.gates:
            metric("intent_rollout_gate").set(
                VERDICT_VALUE[gate.verdict], tags={"app": self.app, "gate": gate.gate}
            )

    async def _follow(self, rollout: Rollout | None) -> None:
        if rollout is not None:
            self._export(rollout)
        traffic = None if rollout is None else rollout.traffic()
        if traffic is None or rollout is None:
            if self.applied is not None:
                # Ending: serve what the registry names now (the promoted release, warmed up)
                # before the candidate variant goes, so no request meets a cold release.
                self.buffer = None
                found = await asyncio.to_thread(self.core.resolve_all)
                await self.core.switch_to(found)
                await self.apply(None)
                logger.info(
                    "rollout agent: %s ended; base traffic knobs apply", self.applied.rollout
                )
                self.applied = None
            return
        wanted = Override(rollout.id, traffic[0], traffic[1])
        if wanted == self.applied:
            return
        champion = self.core.knobs.experiment.variants[0].name
        buffer = EvidenceBuffer(rollout.id, rollout.step, champion) if rollout.active else None
        if self.applied is None or self.applied.rollout != rollout.id:
            await self._warm_candidate(buffer)
        await self.apply(wanted)
        self.buffer = buffer
        logger.info(
            "rollout agent: %s step %d: candidate %g%%, shadow %g",
            rollout.id,
            rollout.step,
            wanted.candidate_percent,
            wanted.shadow,
        )
        self.applied = wanted

    async def _warm_candidate(self, buffer: EvidenceBuffer | None) -> None:
        """One call through the whole graph on the candidate's release before it gets traffic;
        a failure is evidence against it (a failed candidate request)."""
        try:
            release = await asyncio.to_thread(self.core.release_at, CANDIDATE_ALIAS)
            await self.core._warm_up(release)
        except Exception as e:  # noqa: BLE001 - counted; the gates decide
            logger.warning("rollout agent: the candidate failed its warm-up: %r", e)
            if buffer is not None:
                buffer.request(CANDIDATE_VARIANT, True, None)

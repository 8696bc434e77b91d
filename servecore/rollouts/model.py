"""A rollout as plain data: its plan (steps and gates), the evidence gathered in the current step,
the gates' verdicts on it, and the state machine that turns verdicts into decisions.

Nothing here talks to Ray, MLflow or a database: :class:`Rollout` is a pydantic model that the
store (:mod:`servecore.rollouts.store`) keeps as JSON, and :meth:`Rollout.evaluate` is a pure
function of the rollout, the time and the outside signals (feedback accuracy, drift alarm). The
gateway's agent (:mod:`servecore.rollouts.agent`) gathers the evidence and applies what is decided.

The gates (README, "Progressive delivery"), each ``pass``, ``fail``, ``wait`` (not enough
evidence yet) or ``skip`` (not measured in this step):

* ``errors`` — the candidate's share of failed or fallback-answered requests (its shadow calls
  included) against the champion's: one-sided test of ``p_candidate - p_champion <= tolerance``
  on the Agresti–Caffo interval at level ``alpha``.
* ``latency`` — with ``T = champion p95 × (1 + tolerance) + slack_ms``, the candidate's p95 is
  above ``T`` exactly when more than 5% of its requests are: exact one-sided binomial test of
  ``share(candidate latency > T) <= 5%`` at level ``alpha``.
* ``agreement`` — on shadowed texts, exact one-sided binomial test of
  ``agreement >= min_agreement`` at level ``alpha``.
* ``accuracy`` (opt-in) — labelled feedback per variant, the errors test on misclassifications.
* ``drift`` — while the drift monitor's alarm holds, the step does not advance (evidence from
  drifting traffic does not describe normal traffic); it never rolls back on its own.

A gate may fail at any time, with however little evidence, as long as the test rejects; it passes
only once each variant has ``min_requests`` in the step. The test is repeated at every
evaluation, so ``alpha`` is a per-look level: the default 0.001 keeps the chance of rolling back a
good candidate small over the hundreds of looks of a long rollout.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from servecore.rollouts.stats import (
    binomial_cdf,
    binomial_sf,
    difference_interval,
    merge_samples,
    quantile,
)

Status = Literal["running", "completed", "rolled_back", "aborted"]
ACTIVE: frozenset[str] = frozenset({"running"})
Verdict = Literal["pass", "fail", "wait", "skip"]
Action = Literal["start", "advance", "promote", "rollback", "pause", "resume", "abort"]
CANDIDATE_ALIAS = "candidate"
CANDIDATE_VARIANT = "candidate"
LATENCY_CAP = 4096
"""Latency samples kept per variant and step (a uniform sample of all of them)."""


class Step(BaseModel):
    """One step: the candidate's share of requests, the share of the champion's requests
    replayed on it, and how long and how much evidence the step needs before it may advance."""

    model_config = ConfigDict(extra="forbid")

    traffic: float = Field(ge=0.0, le=100.0)
    """Percent of requests answered by the candidate (sticky by the A/B key)."""
    shadow: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of the champion's answered requests replayed on the candidate and compared."""
    min_duration_s: float = Field(default=60.0, ge=0.0, le=7 * 24 * 3600.0)
    min_requests: int = Field(default=200, ge=1, le=10_000_000)
    """Requests each variant needs in this step before a gate may pass (compared texts for the
    agreement gate)."""

    @model_validator(mode="after")
    def _measures_something(self) -> Step:
        if self.traffic == 0 and self.shadow == 0:
            raise ValueError("a step needs traffic or shadow (else nothing is measured)")
        return self


def default_steps() -> list[Step]:
    return [
        Step(traffic=0, shadow=0.5),
        Step(traffic=5, shadow=0.2),
        Step(traffic=25, shadow=0.1),
        Step(traffic=50),
        Step(traffic=100),
    ]


class Gates(BaseModel):
    """The gates' levels and tolerances (README, "Progressive delivery")."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(default=0.001, gt=0.0, lt=0.5)
    """One-sided level of every test, per evaluation."""
    errors_tolerance: float = Field(default=0.0, ge=0.0, le=1.0)
    """Increase of the failed-or-fallback share over the champion's that is accepted."""
    latency_tolerance: float = Field(default=0.25, ge=0.0, le=100.0)
    """Relative p95 increase accepted."""
    latency_slack_ms: float = Field(default=10.0, ge=0.0, le=60_000.0)
    """Absolute p95 increase accepted on top (timer noise at millisecond latencies)."""
    min_agreement: float = Field(default=0.9, ge=0.0, le=1.0)
    """Share of shadowed texts on which the candidate must give the champion's label."""
    accuracy: bool = False
    """Gate on labelled feedback (``POST /v1/feedback``; needs ``feedback.record_rate`` > 0)."""
    accuracy_tolerance: float = Field(default=0.0, ge=0.0, le=1.0)
    min_labels: int = Field(default=50, ge=1, le=10_000_000)
    """Labelled texts each variant needs in the step before the accuracy gate may pass."""
    drift_hold: bool = True
    """Hold (never advance) while the drift monitor's alarm holds."""


class RolloutPlan(BaseModel):
    """What an operator (or the retraining job) asks for."""

    model_config = ConfigDict(extra="forbid")

    app: str = Field(min_length=1, max_length=100)
    candidate: dict[str, str] = Field(min_length=1, max_length=16)
    """Registered model → version: the models the candidate replaces (others stay the
    champion's)."""
    steps: list[Step] = Field(default_factory=default_steps, min_length=1, max_length=20)
    gates: Gates = Field(default_factory=Gates)
    champion_alias: str = Field(default="champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")
    note: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _ends_at_full_traffic(self) -> RolloutPlan:
        if self.steps[-1].traffic != 100:
            raise ValueError("the last step must send 100% of traffic to the candidate")
        shares = [s.traffic for s in self.steps]
        if shares != sorted(shares):
            raise ValueError(f"step traffic must not decrease: {shares}")
        for name, version in self.candidate.items():
            if not version.isdigit():
                raise ValueError(f"candidate {name}: version must be a number, not {version!r}")
        return self


# --- evidence -------------------------------------------------------------------------------


class VariantEvidence(BaseModel):
    """Requests of one variant in one step, across every gateway replica."""

    requests: int = 0
    failures: int = 0
    """Errors and answers given by the fallback instead."""
    latencies_ms: list[float] = Field(default_factory=list)
    """A uniform sample (at most :data:`LATENCY_CAP`) of the latencies of computed answers."""
    latency_seen: int = 0

    def merge(self, other: VariantEvidence, rng: random.Random) -> None:
        self.latencies_ms = merge_samples(
            self.latencies_ms,
            self.latency_seen,
            other.latencies_ms,
            other.latency_seen,
            LATENCY_CAP,
            rng,
        )
        self.requests += other.requests
        self.failures += other.failures
        self.latency_seen += other.latency_seen


class Evidence(BaseModel):
    """Everything one step has seen: both variants, and the shadow comparison."""

    champion: VariantEvidence = Field(default_factory=VariantEvidence)
    candidate: VariantEvidence = Field(default_factory=VariantEvidence)
    shadow_calls: int = 0
    shadow_failures: int = 0
    compared: int = 0
    agreed: int = 0

    def merge(self, other: Evidence, rng: random.Random | None = None) -> None:
        rng = rng or random.Random()
        self.champion.merge(other.champion, rng)
        self.candidate.merge(other.candidate, rng)
        self.shadow_calls += other.shadow_calls
        self.shadow_failures += other.shadow_failures
        self.compared += other.compared
        self.agreed += other.agreed

    @property
    def empty(self) -> bool:
        return self == Evidence()


class Accuracy(BaseModel):
    """Labelled feedback of one variant in the step."""

    labelled: int = 0
    correct: int = 0


class Signals(BaseModel):
    """What the evaluation reads besides the evidence: feedback accuracy and the drift alarm."""

    accuracy: dict[str, Accuracy] = Field(default_factory=dict)
    drift_alarm: bool | None = None
    """None: the application has no drift monitor."""


class GateResult(BaseModel):
    gate: str
    verdict: Verdict
    counts: dict[str, float | int | None] = Field(default_factory=dict)
    statistic: float | None = None
    threshold: float | None = None
    detail: str = ""


def _errors_gate(
    evidence: Evidence, baseline: VariantEvidence, step: Step, gates: Gates
) -> GateResult:
    cand = evidence.candidate
    n1 = cand.requests + evidence.shadow_calls
    x1 = cand.failures + evidence.shadow_failures
    n0, x0 = baseline.requests, baseline.failures
    counts: dict[str, float | int | None] = {
        "candidate_requests": n1,
        "candidate_failures": x1,
        "champion_requests": n0,
        "champion_failures": x0,
    }
    diff, lower, _ = difference_interval(x1, n1, x0, n0, gates.alpha)
    common: dict[str, Any] = {
        "counts": counts,
        "statistic": lower,
        "threshold": gates.errors_tolerance,
    }
    if n1 and lower > gates.errors_tolerance:
        detail = (
            f"candidate fails {x1}/{n1} against the champion's {x0}/{n0}: the "
            f"{1 - gates.alpha:.1%} lower bound of the difference, {lower:.4f}, is above "
            f"{gates.errors_tolerance:g}"
        )
        return GateResult(gate="errors", verdict="fail", detail=detail, **common)
    if n1 < step.min_requests or n0 < step.min_requests:
        detail = f"needs {step.min_requests} requests per variant ({n1} and {n0} so far)"
        return GateResult(gate="errors", verdict="wait", detail=detail, **common)
    detail = f"difference {diff:+.4f}, lower bound {lower:.4f} <= {gates.errors_tolerance:g}"
    return GateResult(gate="errors", verdict="pass", detail=detail, **common)


def _latency_gate(
    evidence: Evidence, baseline: VariantEvidence, step: Step, gates: Gates
) -> GateResult:
    champion = baseline.latencies_ms
    candidate = evidence.candidate.latencies_ms
    p95 = quantile(champion, 0.95)
    counts: dict[str, float | int | None] = {
        "champion_samples": len(champion),
        "candidate_samples": len(candidate),
        "champion_p95_ms": p95,
        "candidate_p95_ms": quantile(candidate, 0.95),
    }
    if p95 is None or len(champion) < min(step.min_requests, 50):
        return GateResult(
            gate="latency",
            verdict="wait",
            counts=counts,
            detail=f"the champion's p95 needs {min(step.min_requests, 50)} samples",
        )
    bound = p95 * (1 + gates.latency_tolerance) + gates.latency_slack_ms
    slow = sum(value > bound for value in candidate)
    counts["candidate_over_bound"] = slow
    p_value = binomial_sf(slow, len(candidate), 0.05) if candidate else 1.0
    common: dict[str, Any] = {"counts": counts, "statistic": p_value, "threshold": gates.alpha}
    if p_value < gates.alpha:
        detail = (
            f"{slow} of {len(candidate)} candidate answers took over {bound:.1f} ms (champion "
            f"p95 {p95:.1f} ms × {1 + gates.latency_tolerance:g} + {gates.latency_slack_ms:g} ms): "
            f"p = {p_value:.2g} that its p95 is within that"
        )
        return GateResult(gate="latency", verdict="fail", detail=detail, **common)
    if len(candidate) < step.min_requests or len(champion) < step.min_requests:
        detail = f"needs {step.min_requests} samples per variant"
        return GateResult(gate="latency", verdict="wait", detail=detail, **common)
    detail = f"{slow}/{len(candidate)} over {bound:.1f} ms, p = {p_value:.2g}"
    return GateResult(gate="latency", verdict="pass", detail=detail, **common)


def _agreement_gate(evidence: Evidence, step: Step, gates: Gates) -> GateResult:
    m, a = evidence.compared, evidence.agreed
    counts: dict[str, float | int | None] = {
        "compared": m,
        "agreed": a,
        "agreement": a / m if m else None,
    }
    if step.shadow == 0 and m == 0:
        return GateResult(gate="agreement", verdict="skip", counts=counts, detail="no shadow")
    p_value = binomial_cdf(a, m, gates.min_agreement) if m else 1.0
    common: dict[str, Any] = {"counts": counts, "statistic": p_value, "threshold": gates.alpha}
    if p_value < gates.alpha:
        detail = (
            f"the candidate agreed with the champion on {a} of {m} shadowed texts: p = "
            f"{p_value:.2g} that its agreement is at least {gates.min_agreement:g}"
        )
        return GateResult(gate="agreement", verdict="fail", detail=detail, **common)
    if m < step.min_requests:
        detail = f"needs {step.min_requests} compared texts ({m} so far)"
        return GateResult(gate="agreement", verdict="wait", detail=detail, **common)
    detail = f"agreement {a / m:.3f} on {m} texts, p = {p_value:.2g}"
    return GateResult(gate="agreement", verdict="pass", detail=detail, **common)


def _accuracy_gate(signals: Signals, step: Step, gates: Gates) -> GateResult:
    if not gates.accuracy:
        return GateResult(gate="accuracy", verdict="skip", detail="not enabled")
    cand = signals.accuracy.get(CANDIDATE_VARIANT, Accuracy())
    champ = signals.accuracy.get("champion", Accuracy())
    counts: dict[str, float | int | None] = {
        "candidate_labelled": cand.labelled,
        "candidate_correct": cand.correct,
        "champion_labelled": champ.labelled,
        "champion_correct": champ.correct,
    }
    if step.traffic == 0:
        return GateResult(gate="accuracy", verdict="skip", counts=counts, detail="no traffic")
    wrong1, wrong0 = cand.labelled - cand.correct, champ.labelled - champ.correct
    _, lower, _ = difference_interval(wrong1, cand.labelled, wrong0, champ.labelled, gates.alpha)
    common: dict[str, Any] = {
        "counts": counts,
        "statistic": lower,
        "threshold": gates.accuracy_tolerance,
    }
    if cand.labelled and lower > gates.accuracy_tolerance:
        detail = (
            f"candidate right on {cand.correct}/{cand.labelled} labelled texts against the "
            f"champion's {champ.correct}/{champ.labelled}: lower bound of the error difference "
            f"{lower:.4f} > {gates.accuracy_tolerance:g}"
        )
        return GateResult(gate="accuracy", verdict="fail", detail=detail, **common)
    if min(cand.labelled, champ.labelled) < gates.min_labels:
        detail = f"needs {gates.min_labels} labelled texts per variant"
        return GateResult(gate="accuracy", verdict="wait", detail=detail, **common)
    return GateResult(gate="accuracy", verdict="pass", detail=f"lower bound {lower:.4f}", **common)


def _drift_gate(signals: Signals, gates: Gates) -> GateResult:
    if not gates.drift_hold or signals.drift_alarm is None:
        return GateResult(gate="drift", verdict="skip", detail="no drift monitor")
    if signals.drift_alarm:
        return GateResult(
            gate="drift",
            verdict="wait",
            counts={"alarm": 1},
            detail="the drift monitor's alarm holds: no step advances on drifting traffic",
        )
    return GateResult(gate="drift", verdict="pass", counts={"alarm": 0}, detail="no alarm")


# --- the rollout --------------------------------------------------------------------------


class Decision(BaseModel):
    """One decision, as the history, the log line, the metric and the MLflow tag record it."""

    at: float
    action: Action
    by: str
    """``auto`` (the gates), ``operator``, or who started it (``admin``, ``cli``, ``retrain``)."""
    step_from: int
    step_to: int
    reason: str
    gates: list[GateResult] = Field(default_factory=list)


class Rollout(BaseModel):
    """A rollout and everything it has seen and decided (the store keeps it as JSON)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    plan: RolloutPlan
    champion: dict[str, str] = Field(default_factory=dict)
    """Registered model → the champion's version when the rollout started."""
    status: Status = "running"
    paused: bool = False
    step: int = 0
    started_at: float = Field(default_factory=time.time)
    step_started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    evidence: Evidence = Field(default_factory=Evidence)
    baseline: VariantEvidence | None = None
    """The champion's evidence of the last step it still served, for a 100% step."""
    gates: list[GateResult] = Field(default_factory=list)
    """The last evaluation's verdicts."""
    history: list[Decision] = Field(default_factory=list)
    tagged: int = 0
    """Decisions already written to the registry as tags."""
    effects_done: bool = False
    """The registry reflects the end (champion moved on promotion; candidate alias removed)."""

    @property
    def app(self) -> str:
        return self.plan.app

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def current(self) -> Step:
        return self.plan.steps[self.step]

    def traffic(self) -> tuple[float, float] | None:
        """(candidate percent, shadow share) the gateways apply now; None: champion only."""
        if self.status == "running":
            return self.current.traffic, self.current.shadow
        if self.status == "completed" and not self.effects_done:
            return 100.0, 0.0  # until the champion alias names the candidate's versions
        return None

    # --- decisions ---------------------------------------------------------------------------

    def _decide(
        self,
        action: Action,
        by: str,
        reason: str,
        now: float,
        step_to: int | None = None,
        gates: list[GateResult] | None = None,
    ) -> Decision:
        decision = Decision(
            at=now,
            action=action,
            by=by,
            step_from=self.step,
            step_to=self.step if step_to is None else step_to,
            reason=reason,
            gates=list(gates or []),
        )
        self.history.append(decision)
        self.updated_at = now
        return decision

    def start(self, by: str, now: float) -> Decision:
        versions = ", ".join(f"{n}/{v}" for n, v in sorted(self.plan.candidate.items()))
        return self._decide("start", by, f"candidate {versions}; {len(self.plan.steps)} steps", now)

    def _advance(self, by: str, reason: str, now: float, gates: list[GateResult]) -> Decision:
        if self.step + 1 >= len(self.plan.steps):
            self.status = "completed"
            return self._decide("promote", by, reason, now, gates=gates)
        decision = self._decide("advance", by, reason, now, step_to=self.step + 1, gates=gates)
        if self.plan.steps[self.step + 1].traffic == 100:
            # The champion serves nothing in a 100% step: its evidence of this step is the
            # baseline the candidate is held to there.
            self.baseline = self.evidence.champion.model_copy(deep=True)
        self.step += 1
        self.step_started_at = now
        self.evidence = Evidence()
        self.gates = []
        return decision

    def _roll_back(
        self, action: Action, by: str, reason: str, now: float, gates: list[GateResult]
    ) -> Decision:
        self.status = "aborted" if action == "abort" else "rolled_back"
        return self._decide(action, by, reason, now, gates=gates)

    def act(self, action: str, by: str, now: float, reason: str = "") -> Decision:
        """An operator's ``pause``, ``resume``, ``advance`` or ``abort``; ValueError when the
        rollout is over or the action does not apply."""
        if not self.active:
            raise ValueError(f"rollout {self.id} is {self.status}")
        if action == "pause":
            if self.paused:
                raise ValueError(f"rollout {self.id} is already paused")
            self.paused = True
            return self._decide("pause", by, reason or "paused by hand", now)
        if action == "resume":
            if not self.paused:
                raise ValueError(f"rollout {self.id} is not paused")
            self.paused = False
            return self._decide("resume", by, reason or "resumed by hand", now)
        if action == "advance":
            return self._advance(by, reason or "advanced by hand", now, self.gates)
        if action == "abort":
            return self._roll_back("abort", by, reason or "aborted by hand", now, self.gates)
        raise ValueError(f"unknown action {action!r}: pause, resume, advance or abort")

    def judge(self, signals: Signals) -> list[GateResult]:
        """Every gate's verdict on the current step's evidence."""
        step, gates = self.current, self.plan.gates
        baseline = (
            self.baseline if step.traffic == 100 and self.baseline else self.evidence.champion
        )
        return [
            _errors_gate(self.evidence, baseline, step, gates),
            _latency_gate(self.evidence, baseline, step, gates),
            _agreement_gate(self.evidence, step, gates),
            _accuracy_gate(signals, step, gates),
            _drift_gate(signals, gates),
        ]

    def evaluate(self, signals: Signals, now: float) -> Decision | None:
        """Judge the step: roll back on any failed gate (paused or not), advance (or promote,
        after the last step) when every gate passed or is skipped and the step has lasted its
        minimum; else nothing."""
        if not self.active:
            return None
        self.gates = self.judge(signals)
        failed = [g for g in self.gates if g.verdict == "fail"]
        if failed:
            reason = "; ".join(f"{g.gate}: {g.detail}" for g in failed)
            return self._roll_back("rollback", "auto", reason, now, self.gates)
        if self.paused:
            return None
        if any(g.verdict == "wait" for g in self.gates):
            return None
        elapsed = now - self.step_started_at
        if elapsed < self.current.min_duration_s:
            return None
        passed = ", ".join(g.gate for g in self.gates if g.verdict == "pass")
        reason = f"step {self.step} held {elapsed:.0f} s; passed: {passed}"
        return self._advance("auto", reason, now, self.gates)

    def view(self) -> dict[str, Any]:
        """``GET /v1/rollouts/{id}``: the plan, where it stands, each gate's evidence, history."""
        traffic = self.traffic()
        return {
            "id": self.id,
            "app": self.app,
            "status": self.status,
            "paused": self.paused,
            "step": self.step,
            "step_plan": self.current.model_dump(),
            "traffic": None if traffic is None else {"candidate": traffic[0], "shadow": traffic[1]},
            "candidate": self.plan.candidate,
            "champion": self.champion,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "updated_at": self.updated_at,
            "gates": [g.model_dump() for g in self.gates],
            "evidence": {
                "champion_requests": self.evidence.champion.requests,
                "candidate_requests": self.evidence.candidate.requests,
                "shadow_calls": self.evidence.shadow_calls,
                "compared": self.evidence.compared,
            },
            "history": [d.model_dump() for d in self.history],
            "plan": self.plan.model_dump(),
            "registry_updated": self.effects_done,
        }

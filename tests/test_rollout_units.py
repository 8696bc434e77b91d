"""Rollouts as plain objects: the statistics of the gates, the state machine, and the store on a
sqlite file (``servecore/rollouts``). The served walk, rollbacks and resumption are in
``tests/test_rollouts.py``."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
from pydantic import ValidationError

from servecore.rollouts.model import (
    Accuracy,
    Evidence,
    Gates,
    Rollout,
    RolloutPlan,
    Signals,
    Step,
    VariantEvidence,
)
from servecore.rollouts.stats import (
    binomial_cdf,
    binomial_sf,
    difference_interval,
    merge_samples,
    quantile,
)
from servecore.rollouts.store import RolloutConflict, RolloutStore


def test_binomial_tails_are_exact():
    assert binomial_sf(0, 10, 0.3) == 1.0
    assert binomial_sf(11, 10, 0.3) == 0.0
    assert binomial_sf(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_sf(1, 10, 0.5) == pytest.approx(1 - 0.5**10)
    assert binomial_cdf(0, 3, 0.9) == pytest.approx(0.1**3)
    assert binomial_cdf(3, 3, 0.9) == 1.0
    # Against scipy (installed with scikit-learn) for larger n.
    binom = pytest.importorskip("scipy.stats").binom
    for k, n, p in ((20, 200, 0.05), (3, 4000, 0.001), (180, 200, 0.9)):
        assert binomial_sf(k, n, p) == pytest.approx(binom.sf(k - 1, n, p), rel=1e-9)
        assert binomial_cdf(k, n, p) == pytest.approx(binom.cdf(k, n, p), rel=1e-9)


def test_difference_interval_handles_zero_events_and_detects_a_real_increase():
    diff, lower, upper = difference_interval(0, 200, 0, 800, alpha=0.001)
    assert lower < 0 < upper and upper < 0.03  # no events anywhere: no evidence of harm
    _, lower, _ = difference_interval(5, 10, 0, 400, alpha=0.001)
    assert lower > 0  # half of ten requests failing is enough against a clean champion
    _, lower, _ = difference_interval(1, 10, 0, 400, alpha=0.001)
    assert lower < 0  # one failure in ten is not


def test_merged_samples_stay_uniform_over_what_they_stand_for():
    rng = random.Random(0)
    merged = merge_samples([0.0] * 100, 10_000, [1.0] * 100, 100, cap=100, rng=rng)
    assert len(merged) == 100 and sum(merged) == 1  # the small side keeps ~1%
    assert merge_samples([1.0], 1, [2.0], 1, cap=10, rng=rng) == [1.0, 2.0]
    assert quantile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.95) == 10
    assert quantile([], 0.5) is None


def _plan(**gates) -> RolloutPlan:
    return RolloutPlan(
        app="demo",
        candidate={"head": "2"},
        steps=[
            Step(traffic=0, shadow=0.5, min_duration_s=10, min_requests=20),
            Step(traffic=10, min_duration_s=10, min_requests=20),
            Step(traffic=100, min_duration_s=10, min_requests=20),
        ],
        gates=Gates(**gates),
    )


def _rollout(**gates) -> Rollout:
    return Rollout(plan=_plan(**gates), started_at=0.0, step_started_at=0.0)


def _variant(requests: int, failures: int = 0, latency: float = 10.0) -> VariantEvidence:
    return VariantEvidence(
        requests=requests,
        failures=failures,
        latencies_ms=[latency + (i % 5) for i in range(requests)],
        latency_seen=requests,
    )


def test_plans_are_checked():
    with pytest.raises(ValidationError, match="100%"):
        RolloutPlan(app="a", candidate={"m": "1"}, steps=[Step(traffic=50)])
    with pytest.raises(ValidationError, match="must not decrease"):
        RolloutPlan(
            app="a",
            candidate={"m": "1"},
            steps=[Step(traffic=50), Step(traffic=10), Step(traffic=100)],
        )
    with pytest.raises(ValidationError, match="traffic or shadow"):
        Step(traffic=0)
    with pytest.raises(ValidationError, match="number"):
        RolloutPlan(app="a", candidate={"m": "latest"})


def test_a_good_candidate_walks_every_step_and_is_promoted_with_the_evidence_recorded():
    rollout = _rollout()
    rollout.start("test", 0.0)
    # Shadow step: enough comparisons and requests, but the minimum time first.
    rollout.evidence = Evidence(
        champion=_variant(100), compared=40, agreed=40, shadow_calls=40,
        candidate=_variant(40),
    )  # fmt: skip
    assert rollout.evaluate(Signals(), now=5.0) is None
    decision = rollout.evaluate(Signals(), now=11.0)
    assert decision is not None and decision.action == "advance" and rollout.step == 1
    assert {g.gate: g.verdict for g in decision.gates} == {
        "errors": "pass",
        "latency": "pass",
        "agreement": "pass",
        "accuracy": "skip",
        "drift": "skip",
    }
    assert rollout.traffic() == (10.0, 0.0) and rollout.evidence.empty
    # 10% step: the candidate's own requests.
    rollout.evidence = Evidence(champion=_variant(300), candidate=_variant(30))
    assert rollout.evaluate(Signals(drift_alarm=True), now=30.0) is None  # drift holds
    assert [g.verdict for g in rollout.gates if g.gate == "drift"] == ["wait"]
    assert rollout.evaluate(Signals(drift_alarm=False), now=31.0).action == "advance"
    assert rollout.baseline is not None and rollout.baseline.requests == 300
    # 100% step: the candidate against the champion's last evidence (the baseline).
    rollout.evidence = Evidence(candidate=_variant(50))
    decision = rollout.evaluate(Signals(), now=45.0)
    assert decision.action == "promote" and rollout.status == "completed"
    assert rollout.traffic() == (100.0, 0.0)  # until the registry names the candidate
    rollout.effects_done = True
    assert rollout.traffic() is None
    assert [d.action for d in rollout.history] == ["start", "advance", "advance", "promote"]


def test_failures_latency_and_disagreement_each_roll_back_with_their_evidence():
    failing = _rollout()
    failing.step = 1
    failing.evidence = Evidence(champion=_variant(200), candidate=_variant(12, failures=6))
    decision = failing.evaluate(Signals(), now=1.0)  # long before the minimum time
    assert decision.action == "rollback" and failing.status == "rolled_back"
    (errors,) = [g for g in decision.gates if g.verdict == "fail"]
    assert errors.gate == "errors" and errors.counts["candidate_failures"] == 6
    assert errors.statistic > errors.threshold == 0.0
    assert failing.traffic() is None

    slow = _rollout()
    slow.step = 1
    slow.evidence = Evidence(champion=_variant(200), candidate=_variant(5, latency=300.0))
    decision = slow.evaluate(Signals(), now=1.0)
    assert decision.action == "rollback"
    (latency,) = [g for g in decision.gates if g.verdict == "fail"]
    assert latency.gate == "latency" and latency.counts["candidate_over_bound"] == 5
    assert latency.statistic < latency.threshold

    disagreeing = _rollout()
    disagreeing.evidence = Evidence(champion=_variant(200), compared=15, agreed=5, shadow_calls=15)
    decision = disagreeing.evaluate(Signals(), now=1.0)
    assert decision.action == "rollback" and decision.step_from == decision.step_to == 0
    assert [g.gate for g in decision.gates if g.verdict == "fail"] == ["agreement"]


def test_a_noisy_but_equal_candidate_is_not_rolled_back():
    rng = random.Random(1)
    rollout = _rollout()
    rollout.step = 1
    champion = [rng.lognormvariate(2.5, 0.4) for _ in range(2000)]
    candidate = [rng.lognormvariate(2.5, 0.4) for _ in range(200)]
    rollout.evidence = Evidence(
        champion=VariantEvidence(
            requests=2000, failures=20, latencies_ms=champion, latency_seen=2000
        ),
        candidate=VariantEvidence(
            requests=200, failures=3, latencies_ms=candidate, latency_seen=200
        ),
    )
    decision = rollout.evaluate(Signals(), now=20.0)
    assert decision.action == "advance", rollout.gates


def test_the_accuracy_gate_reads_labelled_feedback_per_variant():
    rollout = _rollout(accuracy=True, min_labels=20)
    rollout.step = 1
    rollout.evidence = Evidence(champion=_variant(300), candidate=_variant(30))
    waiting = Signals(accuracy={"champion": Accuracy(labelled=50, correct=45)})
    assert rollout.evaluate(waiting, now=20.0) is None
    assert [g.verdict for g in rollout.gates if g.gate == "accuracy"] == ["wait"]
    worse = Signals(
        accuracy={
            "champion": Accuracy(labelled=50, correct=48),
            "candidate": Accuracy(labelled=30, correct=12),
        }
    )
    decision = rollout.evaluate(worse, now=21.0)
    assert decision.action == "rollback" and "accuracy" in decision.reason


def test_operator_actions_pause_resume_advance_abort():
    rollout = _rollout()
    rollout.act("pause", "ops", 1.0)
    rollout.evidence = Evidence(
        champion=_variant(100), candidate=_variant(40), compared=40, agreed=40, shadow_calls=40
    )
    assert rollout.evaluate(Signals(), now=20.0) is None  # paused: no advance
    with pytest.raises(ValueError, match="already paused"):
        rollout.act("pause", "ops", 2.0)
    rollout.act("resume", "ops", 21.0)
    assert rollout.act("advance", "ops", 22.0, "looks fine").action == "advance"
    assert rollout.step == 1
    assert rollout.act("abort", "ops", 23.0).action == "abort" and rollout.status == "aborted"
    with pytest.raises(ValueError, match="aborted"):
        rollout.act("resume", "ops", 24.0)
    assert [(d.action, d.by) for d in rollout.history][-2:] == [
        ("advance", "ops"),
        ("abort", "ops"),
    ]


def test_the_store_keeps_one_running_rollout_per_app_and_folds_evidence_by_step(tmp_path):
    store = RolloutStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    rollout = _rollout()
    rollout.start("test", 0.0)
    store.create(rollout)
    with pytest.raises(RolloutConflict):
        store.create(_rollout())
    assert store.active("demo").id == rollout.id and store.active("other") is None
    store.add_evidence(rollout.id, 0, Evidence(champion=_variant(3)))
    store.add_evidence(rollout.id, 7, Evidence(champion=_variant(100)))  # an old split's
    folded, result = store.fold_evidence(rollout.id, lambda r: r.evidence.champion.requests)
    assert result == 3 and folded.evidence.champion.requests == 3
    assert store.fold_evidence(rollout.id, lambda r: r.evidence.champion.requests)[1] == 3
    # Leases: one leader until its lease lapses.
    assert store.lead(rollout.id, "a", 3.0, now=100.0)
    assert not store.lead(rollout.id, "b", 3.0, now=101.0)
    assert store.lead(rollout.id, "b", 3.0, now=104.0)

    # Concurrent updates never lose one another's decisions.
    def record(n: int) -> None:
        for _ in range(5):
            store.update(rollout.id, lambda r: r.history.append(r.history[0]))

    threads = [threading.Thread(target=record, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.get(rollout.id).history) == 1 + 15
    store.update(rollout.id, lambda r: r.act("abort", "ops", 1.0))
    assert store.active("demo") is None and store.current("demo").status == "aborted"
    store.create(_rollout())  # the app may run a new one


def test_feedback_is_checked_against_the_recorded_answer(tmp_path):
    store = RolloutStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.record_predictions(
        [
            {
                "request_id": "r1",
                "app": "demo",
                "variant": "champion",
                "release": "m/1",
                "texts": ["a", "b"],
                "labels": ["refund", "billing"],
                "created_at": 10.0,
            }
        ]
    )
    assert store.add_feedback("r1", 1, "billing", 11.0)["correct"] is True
    again = store.add_feedback("r1", 1, "refund", 12.0)
    assert again["replaced"] and not again["correct"]
    with pytest.raises(KeyError):
        store.add_feedback("nope", 0, "refund", 12.0)
    with pytest.raises(IndexError):
        store.add_feedback("r1", 2, "refund", 12.0)
    (item,) = store.labelled("demo")
    assert (item.text, item.label, item.predicted) == ("b", "refund", "billing")
    assert store.accuracy("demo", 0.0) == {"champion": Accuracy(labelled=1, correct=0)}
    assert store.forget_predictions(older_than=11.0) == 1 and store.labelled("demo") == []
    assert store.acquire("retrain:demo", "me", 60) is None
    assert store.acquire("retrain:demo", "you", 60) == "me"
    store.release("retrain:demo", "me")
    assert store.acquire("retrain:demo", "you", 60) is None


def test_the_replica_buffer_counts_both_variants_and_keeps_a_bounded_uniform_sample():
    from servecore.rollouts.agent import EvidenceBuffer
    from servecore.rollouts.model import LATENCY_CAP

    buffer = EvidenceBuffer("r1", 2, champion="champion")
    for i in range(LATENCY_CAP + 1000):
        buffer.request("champion", False, float(i))
    buffer.request("candidate", True, 5.0)  # a failure's latency is not a speed sample
    buffer.request("candidate", False, None)  # a cached answer: counted, no latency
    buffer.request("other", False, 1.0)  # a variant outside the rollout: ignored
    buffer.shadow(False, compared=3, agreed=2, latency_ms=7.0)
    buffer.shadow(True, compared=0, agreed=0, latency_ms=None)
    evidence = buffer.drain()
    assert evidence is not None and buffer.drain() is None
    champion = evidence.champion
    assert champion.requests == LATENCY_CAP + 1000 == champion.latency_seen
    assert len(champion.latencies_ms) == LATENCY_CAP
    assert max(champion.latencies_ms) >= LATENCY_CAP  # later values get in too
    candidate = evidence.candidate
    assert (candidate.requests, candidate.failures, candidate.latencies_ms) == (2, 1, [7.0])
    assert (evidence.shadow_calls, evidence.shadow_failures) == (2, 1)
    assert (evidence.compared, evidence.agreed) == (3, 2)


def test_the_retraining_scheduler_runs_on_time_and_on_a_held_drift_alarm_with_a_cooldown():
    from training.retrain import Trigger

    timed = Trigger(every_s=100, drift_checks=0, cooldown_s=0)
    assert [timed.due(t, None) for t in (0, 50, 99, 100, 150, 200)] == [
        True, False, False, True, False, True
    ]  # fmt: skip
    drift = Trigger(every_s=0, drift_checks=3, cooldown_s=1000)
    seen = [drift.due(t, alarm) for t, alarm in enumerate([True, True, False, True, True, True])]
    assert seen == [False, False, False, False, False, True]  # three in a row, not three in all
    assert not drift.wants_drift(500) and drift.wants_drift(1005)
    assert not drift.due(1006, True)


class _Core:
    """The few traffic-core calls an agent makes, for two agents sharing one store."""

    def __init__(self) -> None:
        from servecore.traffic.base import TrafficConfig

        self.knobs = TrafficConfig()
        self.uris: list[str] = []
        self.monitor = None
        self.switches = 0

    def resolve_all(self) -> dict:
        return {}

    def release_at(self, alias: str) -> Any:
        from servecore.traffic.releases import Release

        return Release(())

    async def switch_to(self, found: dict) -> dict:
        self.switches += 1
        return {}

    async def _warm_up(self, release) -> None:
        return None


def test_two_replica_agents_pool_their_evidence_one_leads_and_the_other_takes_over(
    tmp_path, monkeypatch
):
    import asyncio

    import sqlalchemy as sa

    from servecore.rollouts import agent as agent_module
    from servecore.rollouts.agent import RolloutAgent
    from servecore.rollouts.store import rollouts_table

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = RolloutStore(url)

    def registry_in_step(store: RolloutStore, rollout: Rollout) -> Rollout:  # no MLflow here
        def mark(stored: Rollout) -> None:
            stored.tagged = len(stored.history)
            stored.effects_done = not stored.active

        return store.update(rollout.id, mark)[0]

    monkeypatch.setattr(agent_module, "sync_registry", registry_in_step)
    steps = [
        Step(traffic=10, min_duration_s=0, min_requests=5),
        Step(traffic=100, min_duration_s=0, min_requests=5),
    ]
    rollout = Rollout(plan=RolloutPlan(app="demo", candidate={"head": "2"}, steps=steps))
    rollout.start("test", 0.0)
    store.create(rollout)
    applied: dict[str, list] = {"a": [], "b": []}

    def replica(name: str) -> RolloutAgent:
        async def apply(override) -> None:
            applied[name].append(None if override is None else override.candidate_percent)

        return RolloutAgent(_Core(), "demo", name, apply, store_url=url)

    a, b = replica("a"), replica("b")

    def serve(agent: RolloutAgent, champion: int, candidate: int) -> None:
        for _ in range(champion):
            agent.buffer.request("champion", False, 10.0)
        for _ in range(candidate):
            agent.buffer.request("candidate", False, 11.0)

    async def scenario() -> None:
        await a.sync()  # a takes the lease; both split 10% to the candidate
        await b.sync()
        assert (a.leader, b.leader) == (True, False)
        serve(a, 5, 3)
        serve(b, 5, 3)  # neither replica alone has the 5 candidate requests the step needs
        await b.sync()
        await a.sync()
        advanced = store.get(rollout.id)
        assert advanced.step == 1
        (errors,) = [g for g in advanced.history[-1].gates if g.gate == "errors"]
        assert errors.counts["candidate_requests"] == 6 and errors.counts["champion_requests"] == 10
        # a dies: its lease lapses and b judges the 100% step against the champion's baseline.
        with store.engine.begin() as tx:
            tx.execute(sa.update(rollouts_table).values(lease_until=0.0))
        await b.sync()
        assert b.leader
        serve(b, 0, 6)
        await b.sync()
        done = store.get(rollout.id)
        assert done.status == "completed" and done.effects_done
        assert [d.action for d in done.history] == ["start", "advance", "promote"]
        await b.sync()  # the end: switch to the promoted release, then the base knobs
        assert b.core.switches == 1 and applied["b"][-1] is None

    asyncio.run(scenario())
    # a followed the advance it decided (then "died"); b followed every step, then the end.
    assert applied["a"] == [10.0, 100.0] and applied["b"] == [10.0, 100.0, None]

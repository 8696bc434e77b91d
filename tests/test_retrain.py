"""The retraining loop on the session's registry and Ray (issue 21): labelled feedback in the job
store's database → Ray Data embeddings → new heads → offline comparison with the champion →
registered with lineage and a rollout started, or nothing registered and the reason given.

The feedback is synthetic: answers recorded as the gateway records them and labelled as
``POST /v1/feedback`` labels them (``tests/test_rollouts.py`` covers that route). The rollouts
belong to applications no gateway serves, so they wait at their first step; each test ends them.
"""

from __future__ import annotations

import time
import uuid

import pytest

from servecore import LABELS
from servecore.rollouts import control
from training.retrain import Retrainer, RetrainOptions

pytestmark = pytest.mark.serve

HEADS = ("intent-head-linear", "intent-head-mlp")
# A made-up phrasing far from every training text: the champion has never seen it.
TEXTS = [f"zqx vrool {i} plonk {i * 7 % 13} zqx" for i in range(40)]


def _options(app: str) -> RetrainOptions:
    return RetrainOptions(app=app, config_app="intent", min_feedback=20, num_cpus=0.25)


def _feed(app: str, labels: list[str]) -> None:
    store = control.get_store()
    now = time.time()
    records = []
    for text, label in zip(TEXTS, labels, strict=True):
        rid = uuid.uuid4().hex
        records.append(
            {
                "request_id": rid,
                "app": app,
                "variant": "champion",
                "release": "synthetic",
                "texts": [text],
                "labels": [label],
                "created_at": now,
            }
        )
    store.record_predictions(records)
    for record, label in zip(records, labels, strict=True):
        store.add_feedback(record["request_id"], 0, label, now)


def _versions(name: str) -> set[str]:
    from servecore.registry.client import get_client

    return {str(v.version) for v in get_client().search_model_versions(f"name = '{name}'")}


@pytest.fixture(scope="module")
def champion_labels(serve_instance, registry) -> list[str]:
    """What the champion answers for :data:`TEXTS` (through the retrainer's own evaluation)."""
    return Retrainer(_options("retrain-probe")).champion_labels(TEXTS)


def test_a_candidate_that_learns_the_feedback_is_registered_with_lineage_and_rolled_out(
    champion_labels,
):
    from servecore.registry.client import get_client

    # The truth is a label the champion gives none of these texts.
    truth = next(label for label in LABELS if label not in champion_labels)
    _feed("retrain-better", [truth] * len(TEXTS))
    report = Retrainer(_options("retrain-better")).run()
    assert report["status"] == "rollout_started", report
    assert report["candidate"]["feedback_accuracy"] > report["champion"]["feedback_accuracy"]
    assert report["champion"]["feedback_accuracy"] == 0.0
    assert report["candidate"]["test_accuracy"] >= report["champion"]["test_accuracy"] - 0.01
    versions = report["versions"]
    assert set(versions) == set(HEADS)
    client = get_client()
    for name, version in versions.items():
        tags = client.get_model_version(name, version).tags
        parent = client.get_model_version_by_alias(name, "champion").version
        assert tags["lineage.parent"] == f"{name}/{parent}"
        assert tags["lineage.parent_encoder"].startswith("intent-encoder/")
        assert int(tags["lineage.feedback_rows"]) + int(tags["lineage.feedback_holdout_rows"]) == 40
        assert len(tags["lineage.data_digest"]) == 16 and tags["lineage.source"] == "retrain"
        assert float(tags["candidate_feedback_accuracy"]) > float(
            tags["champion_feedback_accuracy"]
        )
        assert str(client.get_registered_model(name).aliases["candidate"]) == version
    store = control.get_store()
    rollout = store.active("retrain-better")
    assert rollout is not None and rollout.id == report["rollout"]
    assert rollout.plan.candidate == versions and rollout.history[0].by == "retrain"
    # Ends it (no gateway serves this app): the candidate alias goes, the champion stays.
    control.act(store, rollout.id, "abort", "test")
    control.sync_registry(store, store.get(rollout.id))
    for name in HEADS:
        assert "candidate" not in client.get_registered_model(name).aliases


def test_a_candidate_that_does_not_beat_the_champion_registers_nothing_and_says_why(
    champion_labels,
):
    # The callers confirm every champion answer: nothing to learn, nothing to win.
    _feed("retrain-same", champion_labels)
    before = {name: _versions(name) for name in HEADS}
    report = Retrainer(_options("retrain-same")).run()
    assert report["status"] == "rejected", report
    assert "not better on held-out feedback" in report["reason"]
    assert report["champion"]["feedback_accuracy"] == 1.0
    assert {name: _versions(name) for name in HEADS} == before
    assert control.get_store().active("retrain-same") is None
    # Too little feedback, and a second run while one holds the lock, do nothing either.
    assert Retrainer(_options("retrain-empty")).run()["status"] == "skipped"
    store = control.get_store()
    assert store.acquire("retrain:retrain-same", "someone-else", 60) is None
    try:
        busy = Retrainer(_options("retrain-same")).run()
    finally:
        store.release("retrain:retrain-same", "someone-else")
    assert busy["status"] == "busy" and "someone-else" in busy["reason"]

"""Rollouts on real Serve, a real registry and real HTTP traffic from a bounded load generator
(issue 21).

One application serves the module: the real gateway, stage wrapper and ensemble around fake
stages, except the linear head, a :class:`~tests.fixtures.VersionedHead` on a registered model of
its own (``rollout-head``), whose every version is scripted through one file: answer like the
champion, fail a share of calls, be slow, or disagree. Each test registers a fresh version as
the candidate and starts a rollout through ``POST /v1/rollouts``; the gateway's agent does the
rest. The gateway answers failures from the bag-of-words fallback (as a demanding operator would
configure it), so a failing candidate costs clients degraded answers, never errors.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from servecore.config_check import load_app_spec
from servecore.pipeline.spec import PipelineSpec
from tests.conftest import ROOT
from tests.fixtures import await_knobs, delete_app, fake_graph, scrape, write_script

pytestmark = pytest.mark.serve

APP = "rollouts"
MODEL = "rollout-head"
SYNC_S = 1.0
"""The agents' sync interval (settings ``rollout_sync_s``, default)."""
KNOBS = {
    "fallback": {"stage": "BagOfWords", "deadline_s": 5.0, "failure_threshold": 1000},
    "feedback": {"record_rate": 1.0},
    "registry_poll_s": 2.0,
}


@dataclass
class Served:
    url: str
    script: Path
    source: Path
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def register(self, **mode: Any) -> str:
        """A new version of the scripted head behaving as ``mode`` (empty: like the champion)."""
        from servecore.registry.client import get_client

        version = str(get_client().create_model_version(MODEL, source=str(self.source)).version)
        if mode:
            self.versions[version] = mode
        write_script(self.script, **self.versions)
        return version

    def start(self, version: str, steps: list[dict[str, Any]], **gates: Any) -> dict[str, Any]:
        body = {"candidate": {MODEL: version}, "steps": steps}
        if gates:
            body["gates"] = gates
        response = httpx.post(f"{self.url}/v1/rollouts", json=body, timeout=30)
        assert response.status_code == 201, response.text
        return response.json()

    def get(self, rollout_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/rollouts/{rollout_id}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, rollout_id: str, done: Any, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.get(rollout_id)
            if done(view):
                return view
            assert time.monotonic() < deadline, f"rollout never got there: {view}"
            time.sleep(0.25)


def _step(traffic: float, shadow: float = 0.0, **more: Any) -> dict[str, Any]:
    return {"traffic": traffic, "shadow": shadow, "min_duration_s": 1.0, "min_requests": 20, **more}


@pytest.fixture(scope="module")
def served(serve_instance, registry, tmp_path_factory) -> Iterator[Served]:
    from ray import serve

    from servecore.registry.client import get_client

    home = tmp_path_factory.mktemp("rollouts")
    source = home / "weights"
    source.mkdir()
    (source / "README").write_text("the scripted head loads nothing\n")
    client = get_client()
    client.create_registered_model(MODEL)
    first = client.create_model_version(MODEL, source=str(source)).version
    client.set_registered_model_alias(MODEL, "champion", str(first))
    script = home / "script.json"
    write_script(script)

    spec = load_app_spec(ROOT / "serve_config.yaml", "intent").model_dump()
    (linear,) = [m for m in spec["members"] if m["deployment"] == "LinearHead"]
    linear.update(model_uri=f"models:/{MODEL}@champion", input="text")
    spec = PipelineSpec.model_validate(spec)
    head = (
        "tests.fixtures:VersionedHead",
        {"model_uri": linear["model_uri"], "script": str(script)},
    )
    graph = fake_graph(
        spec, {"LinearHead": head}, KNOBS, gateway_options={"health_check_period_s": 2}
    )
    serve.run(graph, name=APP, route_prefix=f"/{APP}")
    await_knobs(APP, {"feedback": {"record_rate": 1.0}})
    yield Served(f"{serve_instance.base_url}/{APP}", script, source)
    delete_app(APP)


class Load:
    """A bounded closed-loop load: ``workers`` clients, one text per request, a fresh sticky key
    each (so the split is by weight), at most ``rate`` requests/s in all and ``limit`` requests."""

    def __init__(self, url: str, workers: int = 4, rate: float = 60.0, limit: int = 6000) -> None:
        self.url = url
        self.workers = workers
        self.pause = workers / rate
        self.limit = limit
        self.stop = threading.Event()
        self.outcomes: list[tuple[float, int, str, bool, str]] = []
        """(time, status, variant, degraded, request id) per request."""
        self._pool = concurrent.futures.ThreadPoolExecutor(workers)
        self._futures: list[concurrent.futures.Future[None]] = []

    def _client(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set() and len(self.outcomes) < self.limit:
                text = f"where is order {uuid.uuid4().hex[:8]}"
                headers = {"X-User-Key": uuid.uuid4().hex, "Cache-Control": "no-cache"}
                try:
                    r = http.post(f"{self.url}/v1/predict", json={"texts": [text]}, headers=headers)
                    body = r.json() if r.status_code == 200 else {}
                    self.outcomes.append(
                        (
                            time.monotonic(),
                            r.status_code,
                            body.get("variant", ""),
                            bool(body.get("degraded")),
                            body.get("request_id", ""),
                        )
                    )
                except httpx.HTTPError:
                    self.outcomes.append((time.monotonic(), 0, "", False, ""))
                time.sleep(self.pause)

    def __enter__(self) -> Load:
        self._futures = [self._pool.submit(self._client) for _ in range(self.workers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()

    def statuses(self) -> Counter[int]:
        return Counter(status for _, status, _, _, _ in self.outcomes)

    def variants(self, since: float = 0.0) -> Counter[str]:
        return Counter(v for t, s, v, _, _ in self.outcomes if s == 200 and t >= since)


def _gates(decision: dict[str, Any]) -> dict[str, str]:
    return {g["gate"]: g["verdict"] for g in decision["gates"]}


def _aliases() -> dict[str, str]:
    from servecore.registry.client import get_client

    return {k: str(v) for k, v in (get_client().get_registered_model(MODEL).aliases or {}).items()}


def _tags(version: str) -> dict[str, str]:
    from servecore.registry.client import get_client

    return dict(get_client().get_model_version(MODEL, version).tags or {})


# --- the walk ---------------------------------------------------------------------------------


def test_a_candidate_that_answers_like_the_champion_walks_every_step_and_becomes_champion(
    served, serve_instance
):
    version = served.register()
    # The default plan's shape (shadow → a small share with shadow → … → 100%), sized for the
    # test's 60 req/s.
    steps = [_step(0, 0.5), _step(10, 0.2), _step(25, 0.1), _step(50), _step(100)]
    with Load(served.url) as load:
        rollout = served.start(version, steps)
        assert rollout["status"] == "running" and rollout["step"] == 0
        view = served.wait(rollout["id"], lambda v: v["registry_updated"], timeout_s=90)
        time.sleep(2 * SYNC_S)  # the gateway leaves the override behind
        after = time.monotonic()
        time.sleep(1.0)
    assert load.statuses() == {200: len(load.outcomes)}, load.statuses()
    assert not any(degraded for _, _, _, degraded, _ in load.outcomes)
    assert view["status"] == "completed"
    actions = [(d["action"], d["step_from"], d["step_to"], d["by"]) for d in view["history"]]
    assert actions == [
        ("start", 0, 0, "admin"),
        ("advance", 0, 1, "auto"),
        ("advance", 1, 2, "auto"),
        ("advance", 2, 3, "auto"),
        ("advance", 3, 4, "auto"),
        ("promote", 4, 4, "auto"),
    ]
    for decision in view["history"][1:]:
        gates = _gates(decision)
        step = steps[decision["step_from"]]
        assert gates["errors"] == gates["latency"] == "pass", decision
        assert gates["agreement"] == ("pass" if step["shadow"] else "skip"), decision
        (errors,) = [g for g in decision["gates"] if g["gate"] == "errors"]
        assert errors["counts"]["candidate_requests"] >= 20
        assert errors["counts"]["candidate_failures"] == 0
        assert errors["statistic"] <= errors["threshold"]
    # The candidate answered clients in the traffic steps, and only there.
    assert load.variants()["candidate"] > 20
    # The registry: champion names the candidate, the candidate alias is gone, every decision
    # is a tag on the version.
    assert _aliases()["champion"] == version and "candidate" not in _aliases()
    tags = _tags(version)
    assert tags[f"rollout.{rollout['id']}.result"] == "completed"
    assert len([k for k in tags if k.startswith(f"rollout.{rollout['id']}.0")]) == 6
    # Afterwards every answer is the champion's, on the promoted version.
    assert set(load.variants(since=after)) == {"champion"}
    models = httpx.get(f"{served.url}/v1/models", timeout=10).json()
    assert f"{MODEL}/{version}" in models["release"]
    # The rollout's families are on the metrics endpoint.
    found = scrape(serve_instance.metrics_port)
    for family in ("step", "traffic", "status", "gate"):
        assert f"ray_intent_rollout_{family}" in found
    assert found["ray_intent_rollout_decisions_total"] >= 1


# --- rollbacks ---------------------------------------------------------------------------------


def _rolled_back(
    served: Served, mode: dict[str, Any], steps: list[dict[str, Any]], rate: float = 60.0
) -> tuple[dict, Load, float]:
    champion = _aliases()["champion"]
    version = served.register(**mode)
    with Load(served.url, rate=rate) as load:
        started = time.monotonic()
        rollout = served.start(version, steps)
        view = served.wait(rollout["id"], lambda v: v["registry_updated"], timeout_s=60)
        took = time.monotonic() - started
        time.sleep(2 * SYNC_S)
        after = time.monotonic()
        time.sleep(1.0)
    assert view["status"] == "rolled_back", view
    assert [d["action"] for d in view["history"]] == ["start", "rollback"]
    # No client request failed: the candidate's failures were answered by the fallback, and
    # the rollback itself loses nothing in flight.
    assert load.statuses() == {200: len(load.outcomes)}, load.statuses()
    assert set(load.variants(since=after)) == {"champion"}
    assert _aliases()["champion"] == champion and "candidate" not in _aliases()
    assert _tags(version)[f"rollout.{rollout['id']}.result"] == "rolled_back"
    return view, load, took


def test_a_failing_candidate_is_rolled_back_within_its_first_step(served):
    view, load, took = _rolled_back(
        served, {"mode": "error", "rate": 0.5}, [_step(10), _step(50), _step(100)]
    )
    rollback = view["history"][-1]
    assert rollback["by"] == "auto" and rollback["step_from"] == 0
    assert _gates(rollback)["errors"] == "fail"
    (errors,) = [g for g in rollback["gates"] if g["gate"] == "errors"]
    assert errors["counts"]["candidate_failures"] >= 3
    assert errors["statistic"] > errors["threshold"]
    # It never had more than the first step's share: no advance, and about 10% of answers.
    share = load.variants()["candidate"] / sum(load.variants().values())
    assert share < 0.25, load.variants()
    # The bound stated in the README: once the failures prove it (five or so when half fail),
    # the candidate answers nobody more than three sync intervals later.
    failures = sorted(t for t, _, v, degraded, _ in load.outcomes if v == "candidate" and degraded)
    last = max(t for t, _, v, _, _ in load.outcomes if v == "candidate")
    # The candidate's failed warm-up counts as evidence too: the gate may have its proof before
    # five clients see a degraded answer, so the bound runs from the fifth or the last one.
    assert failures, "no client saw a candidate failure"
    proof = failures[min(4, len(failures) - 1)]
    assert last - proof <= 3 * SYNC_S + 0.5, (last - proof, took)
    print(
        f"rollback: {took:.1f} s after the start, last candidate answer {last - proof:.2f} s "
        f"after its 5th failure; {len(failures)} failed candidate answers in all"
    )


def test_a_slower_candidate_is_rolled_back_by_the_latency_gate(served):
    # A slow version shares the stage replicas with the champion (pinned calls): at a low rate
    # its calls rarely delay the champion's, as in production at a first step's share.
    view, _, _ = _rolled_back(
        served, {"mode": "slow", "seconds": 0.2}, [_step(10), _step(50), _step(100)], rate=20
    )
    rollback = view["history"][-1]
    assert _gates(rollback)["latency"] == "fail" and _gates(rollback)["errors"] != "fail"
    (latency,) = [g for g in rollback["gates"] if g["gate"] == "latency"]
    assert latency["counts"]["candidate_p95_ms"] > 200 > latency["counts"]["champion_p95_ms"]
    assert latency["statistic"] < latency["threshold"]


def test_a_disagreeing_candidate_never_leaves_the_shadow_step(served):
    view, load, _ = _rolled_back(served, {"mode": "flip"}, [_step(0, 0.5), _step(10), _step(100)])
    rollback = view["history"][-1]
    assert rollback["step_from"] == rollback["step_to"] == 0
    assert _gates(rollback)["agreement"] == "fail"
    (agreement,) = [g for g in rollback["gates"] if g["gate"] == "agreement"]
    assert agreement["counts"]["agreement"] < 0.5
    assert load.variants()["candidate"] == 0  # shadowed only: no client got its answers


# --- feedback and the accuracy gate ---------------------------------------------------------------


def test_feedback_is_stored_checked_and_a_less_accurate_candidate_is_rolled_back(served):
    ok = httpx.post(f"{served.url}/v1/predict", json={"texts": ["a", "b"]}, timeout=30).json()
    time.sleep(2 * SYNC_S)  # recorded answers reach the store at the next sync
    answer = httpx.post(
        f"{served.url}/v1/feedback",
        json={
            "request_id": ok["request_id"],
            "label": ok["predictions"][1]["label"],
            "position": 1,
        },
        timeout=10,
    )
    assert answer.status_code == 200 and answer.json()["correct"] is True, answer.text
    for body, status, kind in (
        ({"request_id": "nope", "label": "returns"}, 404, "answer_not_found"),
        ({"request_id": ok["request_id"], "label": "sunshine"}, 422, "validation_error"),
        (
            {"request_id": ok["request_id"], "label": "returns", "position": 2},
            422,
            "validation_error",
        ),
    ):
        bad = httpx.post(f"{served.url}/v1/feedback", json=body, timeout=10)
        assert bad.status_code == status and bad.json()["error"]["type"] == kind, bad.text

    # A candidate that disagrees, with no shadow step to catch it: the labels callers send
    # (here: the champion's answers are right) roll it back through the accuracy gate.
    version = served.register(mode="flip")
    steps = [_step(30), _step(100)]
    labelled = set()
    with Load(served.url, rate=40) as load:
        rollout = served.start(version, steps, accuracy=True, min_labels=10)

        def label_answers(view: dict[str, Any]) -> bool:
            for _, status, _, _, rid in list(load.outcomes):
                if status == 200 and rid not in labelled and (truth := _truth(rid)) is not None:
                    sent = httpx.post(
                        f"{served.url}/v1/feedback",
                        json={"request_id": rid, "label": truth},
                        timeout=10,
                    )
                    assert sent.status_code == 200, sent.text
                    labelled.add(rid)
            return bool(view["registry_updated"])

        view = served.wait(rollout["id"], label_answers, timeout_s=60)
    assert view["status"] == "rolled_back"
    rollback = view["history"][-1]
    assert _gates(rollback)["accuracy"] == "fail", rollback
    assert load.statuses() == {200: len(load.outcomes)}


def _truth(rid: str) -> str | None:
    """The label the champion gives (the truth in this test) for a recorded answer; None until
    the answer reaches the store (at its gateway's next sync)."""
    import zlib

    from servecore import LABELS
    from servecore.rollouts.control import get_store
    from servecore.rollouts.store import predictions_table

    with get_store().engine.connect() as connection:
        row = connection.execute(
            predictions_table.select().where(predictions_table.c.request_id == rid)
        ).first()
    if row is None:
        return None
    return LABELS[zlib.crc32(row.texts[0].encode()) % len(LABELS)]


# --- operators, conflicts and a gateway that dies ------------------------------------------------


def _gateway_pids() -> set[int]:
    from ray._private import state

    return {
        int(actor["Pid"])
        for actor in state.actors().values()
        if actor.get("ActorClassName") == f"ServeReplica:{APP}:Gateway"
        and actor.get("State") == "ALIVE"
        and actor.get("Pid")
    }


def test_a_killed_gateway_resumes_the_rollout_at_its_step_and_operators_steer_it(served):
    version = served.register()
    steps = [_step(0, 0.5), _step(20, min_duration_s=3600), _step(100)]
    bad = httpx.post(f"{served.url}/v1/rollouts", json={"candidate": {MODEL: "999"}}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "validation_error"
    wrong = httpx.post(
        f"{served.url}/v1/rollouts",
        json={"candidate": {MODEL: version}, "steps": [{"traffic": 50}]},
        timeout=30,
    )
    assert wrong.status_code == 422 and "100%" in wrong.json()["error"]["message"]
    with Load(served.url) as load:
        rollout = served.start(version, steps)
        again = httpx.post(
            f"{served.url}/v1/rollouts", json={"candidate": {MODEL: version}}, timeout=30
        )
        assert again.status_code == 409 and again.json()["error"]["type"] == "rollout_conflict"
        served.wait(rollout["id"], lambda v: v["step"] == 1)
        (victim,) = _gateway_pids()
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        # A new replica comes back, reads the rollout from the store and splits traffic again.
        deadline = killed + 60
        while not load.variants(since=killed + 1)["candidate"]:
            assert time.monotonic() < deadline, "the candidate never got traffic back"
            time.sleep(0.5)
        view = served.get(rollout["id"])
        assert view["status"] == "running" and view["step"] == 1
        assert [d["action"] for d in view["history"]] == ["start", "advance"]
        # By hand: pause, resume, advance (past the hour-long step), then abort.
        base = f"{served.url}/v1/rollouts/{rollout['id']}"
        assert httpx.post(f"{base}/pause", json={"reason": "look"}, timeout=30).json()["paused"]
        paused_twice = httpx.post(f"{base}/pause", timeout=30)
        assert paused_twice.status_code == 409
        assert not httpx.post(f"{base}/resume", timeout=30).json()["paused"]
        assert httpx.post(f"{base}/advance", timeout=30).json()["step"] == 2
        served.wait(rollout["id"], lambda v: v["traffic"]["candidate"] == 100)
        aborted = httpx.post(f"{base}/abort", json={"reason": "enough"}, timeout=30).json()
        assert aborted["status"] == "aborted"
        served.wait(rollout["id"], lambda v: v["registry_updated"])
    view = served.get(rollout["id"])
    assert [(d["action"], d["by"]) for d in view["history"]] == [
        ("start", "admin"),
        ("advance", "auto"),
        ("pause", "operator"),
        ("resume", "operator"),
        ("advance", "operator"),
        ("abort", "operator"),
    ]
    assert view["history"][2]["reason"] == "look"
    # Requests failed only while no gateway replica was up (one replica in this app).
    failed = [t - killed for t, status, *_ in load.outcomes if status != 200]
    assert all(-1 <= t <= 30 for t in failed), failed
    assert httpx.get(f"{served.url}/v1/rollouts/nope", timeout=10).status_code == 404
    listed = httpx.get(f"{served.url}/v1/rollouts", timeout=10).json()["rollouts"]
    assert listed[0]["id"] == rollout["id"]

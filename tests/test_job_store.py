"""The job store (a real sqlite file) and webhook signing/targets/delivery (a real local server)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servecore.errors import IdempotencyConflict, InvalidRequest, JobFinished, JobNotFound
from servecore.jobs.store import Delivery, JobStore
from servecore.jobs.webhooks import (
    SIGNATURE_HEADER,
    WebhookPolicy,
    check_target,
    deliver,
    parse_networks,
    signature,
    verify,
)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")


def new_job(store: JobStore, owner: str = "alice", key: str | None = None, texts=("a", "b")):
    return store.create(
        owner=owner,
        kind="texts",
        request={"texts": list(texts)},
        total=len(texts),
        idempotency_key=key,
    )


def test_idempotency_key_returns_the_same_job_and_refuses_another_body(store: JobStore) -> None:
    first, created = new_job(store, key="k1")
    again, created_again = new_job(store, key="k1")
    assert created and not created_again
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict, match="different request body"):
        new_job(store, key="k1", texts=("other",))
    other_owner, created = new_job(store, owner="bob", key="k1")  # keys are per owner
    assert created and other_owner.id != first.id


def test_owner_isolation_and_paging(store: JobStore) -> None:
    ids = [new_job(store)[0].id for _ in range(5)]
    new_job(store, owner="bob")
    with pytest.raises(JobNotFound):
        store.get(ids[0], owner="bob")
    with pytest.raises(JobNotFound):
        store.cancel(ids[0], owner="bob")
    page, cursor = store.page("alice", limit=2)
    seen = [j.id for j in page]
    while cursor is not None:
        page, cursor = store.page("alice", limit=2, after=cursor)
        seen += [j.id for j in page]
    assert seen == list(reversed(ids))  # newest first, each exactly once
    assert [j.id for j in store.page("alice", state="running")[0]] == []


def test_claim_lease_takeover_and_single_visible_result(store: JobStore) -> None:
    job, _ = new_job(store)
    first = store.claim(job.id, "runner-1", lease_s=0.3)
    assert first == 1
    assert store.claim(job.id, "runner-2", lease_s=10) is None  # held: a duplicate message
    assert store.heartbeat(job.id, first, 0.3, done=1)
    time.sleep(0.4)  # runner-1 "died": the lease lapsed
    assert job.id in store.stalled(queued_after_s=3600)
    second = store.claim(job.id, "runner-2", lease_s=10)
    assert second == 2
    # The dead attempt can neither renew nor write its result; the live one can, once.
    assert not store.heartbeat(job.id, first, 10, done=2)
    assert not store.finish(job.id, first, "succeeded", result={"from": 1})
    assert store.finish(job.id, second, "succeeded", result={"from": 2}, done=2)
    assert not store.finish(job.id, second, "failed", error={"x": 1})
    final = store.get(job.id)
    assert (final.state, final.result, final.attempts, final.progress) == (
        "succeeded",
        {"from": 2},
        2,
        1.0,
    )
    assert store.claim(job.id, "runner-3", lease_s=10) is None


def test_cancel_queued_running_and_finished(store: JobStore) -> None:
    queued, _ = new_job(store)
    assert store.cancel(queued.id).state == "cancelled"
    assert store.claim(queued.id, "r", 10) is None

    running, _ = new_job(store)
    attempt = store.claim(running.id, "r", 10)
    assert attempt is not None
    job = store.cancel(running.id)
    assert job.state == "running" and job.cancel_requested
    assert not store.heartbeat(running.id, attempt, 10, done=1)  # the runner is told to stop
    # Whatever the runner reports, a job whose cancel was requested ends cancelled.
    assert store.finish(running.id, attempt, "succeeded", result={"late": True})
    assert store.get(running.id).state == "cancelled"
    assert store.get(running.id).result is None

    with pytest.raises(JobFinished):
        store.cancel(running.id)


def test_queued_job_whose_message_was_lost_is_sent_again(store: JobStore) -> None:
    job, _ = new_job(store)
    store.mark_enqueued(job.id)
    assert store.stalled(queued_after_s=60) == []
    assert store.stalled(queued_after_s=0) == [job.id]


def test_webhook_claims_and_retries_are_recorded(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job, _ = store.create(
        owner="a", kind="texts", request={"texts": ["x"]}, total=1, callback_url="http://x/"
    )
    attempt = store.claim(job.id, "r", 10)
    assert attempt is not None
    assert store.claim_delivery(lease_s=10) is None  # not finished: nothing to deliver
    store.finish(job.id, attempt, "succeeded", result={})
    taken = store.claim_delivery(lease_s=10)
    assert taken is not None and taken.webhook_state == "delivering"
    assert store.claim_delivery(lease_s=10) is None  # leased to the first deliverer
    failure = Delivery(attempt=1, at=time.time(), error="HTTP 500", status_code=500)
    store.record_delivery(job.id, failure, delivered=False, retry_at=time.time() - 1)
    retry = store.claim_delivery(lease_s=10)
    assert retry is not None and len(retry.deliveries) == 1
    store.record_delivery(
        job.id, Delivery(attempt=2, at=time.time()), delivered=True, retry_at=None
    )
    final = store.get(job.id)
    assert final.webhook_state == "delivered" and len(final.deliveries) == 2


def test_signature_verifies_and_rejects_tampering_and_replays() -> None:
    body = b'{"event":"job.succeeded"}'
    now = int(time.time())
    header = signature("s3cret", now, body)
    assert verify("s3cret", header, body)
    assert not verify("s3cret", header, body + b" ")
    assert not verify("other", header, body)
    assert not verify("s3cret", signature("s3cret", now - 3600, body), body)
    assert not verify("s3cret", "garbage", body)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "ftp://example.com/hook",
        "http://user:pw@example.com/hook",
        "not a url",
    ],
)
def test_callback_targets_refused_by_default(url: str) -> None:
    with pytest.raises(InvalidRequest):
        check_target(url, [])


def test_loopback_allowed_only_when_listed() -> None:
    check_target("http://127.0.0.1:9/hook", parse_networks(["127.0.0.0/8"]))
    with pytest.raises(InvalidRequest):
        check_target("http://10.0.0.1/hook", parse_networks(["127.0.0.0/8"]))


class Receiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[Receiver]]]:
    handler = type("Handler", (Receiver,), {"received": [], "status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    server.shutdown()
    server.server_close()


def test_delivery_signs_the_body_and_reports_failures(receiver) -> None:
    url, handler = receiver
    policy = WebhookPolicy(secret="k", allow=tuple(parse_networks(["127.0.0.0/8"])))
    outcome = deliver(url, b'{"a":1}', "job.succeeded", policy)
    assert outcome.delivered and outcome.status_code == 200
    headers, body = handler.received[0]
    assert body == b'{"a":1}'
    assert verify("k", headers[SIGNATURE_HEADER], body)

    handler.status = 503
    failed = deliver(url, b"{}", "job.failed", policy)
    assert not failed.delivered and failed.error == "HTTP 503"
    refused = deliver(url, b"{}", "job.failed", WebhookPolicy(secret="k"))
    assert not refused.delivered and "private or reserved" in (refused.error or "")
    assert len(handler.received) == 2  # the refused target was never contacted


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = WebhookPolicy(secret="k", backoff_s=1.0, max_delay_s=5.0)
    assert [policy.retry_delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_the_embedded_store_creates_its_folder(tmp_path: Path) -> None:
    """A gateway without a job runner is the first to touch the store: its folder may not exist."""
    store = JobStore(f"sqlite:///{tmp_path / 'not' / 'yet' / 'jobs.db'}")
    job, created = store.create(
        owner="a", kind="texts", request={"texts": ["x"]}, total=1, idempotency_key=None
    )
    assert created and store.get(job.id, "a").state == "queued"

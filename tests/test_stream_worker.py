"""The stream worker alone (issue 18): a real ``redis-server``, no Ray, and a scoring function in
place of the traffic core, so each rule of :mod:`servecore.streams.worker` is seen on its own:
what is dead-lettered and why, retries, one result per message, claims, back-pressure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from servecore.errors import InvalidRequest, ModelUnavailable
from servecore.streams.config import StreamsConfig, StreamSpec
from servecore.streams.messages import BadMessage, parse
from servecore.streams.status import stream_status
from servecore.streams.worker import WRITE_SCRIPT, StreamWorker
from tests.conftest import free_port
from tests.streams_support import RedisServer

MODELS = [{"stage": "Pipeline", "name": "intent-linear", "version": "3", "uri": "u", "aliases": []}]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("stream-worker-redis"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def spec(redis_server, request) -> StreamSpec:
    """A fresh input stream per test."""
    return StreamSpec(input=f"in-{request.node.name[:40]}")


def answer(texts: list[str]) -> dict[str, Any]:
    return {
        "predictions": [
            {"label": "billing", "probabilities": {"billing": 1.0, "other": 0.0}} for _ in texts
        ],
        "models": MODELS,
        "variant": "control",
        "degraded": False,
        "degraded_reason": None,
    }


async def scored(texts: list[str], user_key: str | None, trace: str) -> dict[str, Any]:
    return answer(texts)


def run_worker(
    server: RedisServer,
    spec: StreamSpec,
    score: Callable[[list[str], str | None, str], Awaitable[dict[str, Any]]],
    until: Callable[[Any], bool],
    knobs: StreamsConfig | None = None,
    consumer: str = "c1",
    timeout_s: float = 20.0,
) -> None:
    """Run one worker until ``until(redis client)`` holds (checked every 50 ms)."""

    async def main() -> None:
        import redis.asyncio

        worker = StreamWorker(
            lambda: redis.asyncio.Redis.from_url(server.url),
            spec,
            knobs or StreamsConfig(streams=[spec], claim_interval_s=0.2, block_ms=50),
            score,
            consumer,
        )
        worker.start()
        try:
            async with asyncio.timeout(timeout_s):
                while not until(server.client()):
                    await asyncio.sleep(0.05)
        finally:
            await worker.stop()

    asyncio.run(main())


def entries(client: Any, stream: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange(stream)
    ]


def settled(spec: StreamSpec, n: int) -> Callable[[Any], bool]:
    def check(client: Any) -> bool:
        done = client.xlen(spec.output_stream) + client.xlen(spec.dead_letter_stream)
        pending = client.xpending(spec.input, spec.group)["pending"] if done else 1
        return done >= n and pending == 0

    return check


# --- messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"data": b"{not json"}, "data is not JSON: Expecting property name"),
        ({b"data": b"[1, 2]"}, "data must be a JSON object, got list"),
        ({b"data": b'{"txt": "hi"}'}, "data has unknown fields ['txt']; allowed: text, user_key"),
        ({b"data": b"{}"}, "data has no text"),
        ({b"data": b'{"text": 42}'}, "text must be a string, got number"),
        ({b"data": b'{"text": "hi", "user_key": 7}'}, "user_key must be a string, got number"),
        ({b"text": b"   "}, "text is empty"),
        ({b"text": b"x" * 2001}, "text is 2001 characters, at most 2000"),
        ({b"text": b"\xff\xfe"}, "text is not UTF-8"),
        ({b"body": b"hi"}, "no text: the message needs a text or data field, it has ['body']"),
    ],
)
def test_bad_messages_say_what_is_wrong(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(BadMessage) as raised:
        parse("1-0", fields)
    assert str(raised.value).startswith(reason)


def test_a_message_is_a_text_field_or_a_json_object() -> None:
    assert parse("1-0", {b"text": b"refund please"}).text == "refund please"
    message = parse("1-0", {b"data": b'{"text": "refund", "user_key": "u1"}'})
    assert (message.text, message.user_key) == ("refund", "u1")


# --- the worker on a real Redis ------------------------------------------------------------------


def test_results_and_dead_letters_one_per_message(redis_server, spec) -> None:
    client = redis_server.client()
    good = [client.xadd(spec.input, {"text": f"text {i}"}).decode() for i in range(10)]
    bad = client.xadd(spec.input, {"data": "{oops"}).decode()
    run_worker(redis_server, spec, scored, settled(spec, 11))
    results = entries(client, spec.output_stream)
    assert [r["id"] for r in results] == good
    first = results[0]
    assert first["label"] == "billing"
    assert json.loads(first["probabilities"]) == {"billing": 1.0, "other": 0.0}
    assert json.loads(first["models"]) == [
        {"stage": "Pipeline", "name": "intent-linear", "version": "3"}
    ]
    assert (first["variant"], first["degraded"]) == ("control", "0")
    assert float(first["latency_ms"]) >= 0.0
    (dead,) = entries(client, spec.dead_letter_stream)
    assert dead["id"] == bad
    assert dead["reason"].startswith("data is not JSON")
    assert json.loads(dead["message"]) == {"data": "{oops"}
    assert dead["attempts"] == "1"
    totals = {k.decode(): int(v) for k, v in client.hgetall(spec.stats_key).items()}
    assert totals == {"scored": 10, "dead_letters": 1, "duplicates": 0}


def test_transient_failures_are_retried_then_dead_lettered(redis_server, spec) -> None:
    client = redis_server.client()
    calls: list[list[str]] = []

    async def flaky(texts: list[str], user_key: str | None, trace: str) -> dict[str, Any]:
        calls.append(texts)
        if len(calls) <= 2 or "never" in texts[0]:
            raise ModelUnavailable("the model pipeline is unavailable; retry shortly")
        return answer(texts)

    knobs = StreamsConfig(streams=[spec], max_attempts=3, retry_backoff_s=0.01, block_ms=50)
    recovered = client.xadd(spec.input, {"text": "recovers"}).decode()
    run_worker(redis_server, spec, flaky, settled(spec, 1), knobs)
    assert [r["id"] for r in entries(client, spec.output_stream)] == [recovered]
    assert len(calls) == 3

    calls.clear()
    lost = client.xadd(spec.input, {"text": "never answered"}).decode()
    run_worker(redis_server, spec, flaky, settled(spec, 2), knobs)
    (dead,) = entries(client, spec.dead_letter_stream)
    assert dead["id"] == lost
    assert dead["reason"] == (
        "not scored after 3 attempts: ModelUnavailable: the model pipeline is unavailable; "
        "retry shortly"
    )
    assert len(calls) == 3


def test_a_refusal_is_dead_lettered_at_once(redis_server, spec) -> None:
    client = redis_server.client()
    calls = []

    async def refuses(texts: list[str], user_key: str | None, trace: str) -> dict[str, Any]:
        calls.append(texts)
        raise InvalidRequest("texts: no such variant")

    client.xadd(spec.input, {"text": "hello"})
    run_worker(redis_server, spec, refuses, settled(spec, 1))
    (dead,) = entries(client, spec.dead_letter_stream)
    assert dead["reason"] == "refused by the model (422): InvalidRequest: texts: no such variant"
    assert len(calls) == 1


def test_a_message_scored_twice_is_written_once(redis_server, spec) -> None:
    """A slow consumer's messages are claimed by another; both finish; one result each."""
    client = redis_server.client()
    ids = [client.xadd(spec.input, {"text": f"t{i}"}).decode() for i in range(5)]
    client.xgroup_create(spec.input, spec.group, id="0")
    # "slow" reads the messages and never acknowledges them (it hangs)...
    client.xreadgroup(spec.group, "slow", {spec.input: ">"}, count=5)
    knobs = StreamsConfig(streams=[spec], claim_idle_s=0.2, claim_interval_s=0.1, block_ms=50)
    # ... "fast" claims them once idle and writes their results ...
    run_worker(redis_server, spec, scored, settled(spec, 5), knobs, consumer="fast")
    assert [r["id"] for r in entries(client, spec.output_stream)] == ids

    # ... then "slow" wakes up and writes the same results: acknowledged, not written again.
    async def late_write() -> None:
        import redis.asyncio

        slow = StreamWorker(
            lambda: redis.asyncio.Redis.from_url(redis_server.url), spec, knobs, scored, "slow"
        )
        slow.redis = slow.connect()
        slow._script = slow.redis.register_script(WRITE_SCRIPT)
        found = [(i, {b"text": b"t"}) for i in ids]
        await slow._process(found, {})
        assert slow.counts["duplicate"] == 5
        await slow.redis.aclose()

    asyncio.run(late_write())
    assert len(entries(client, spec.output_stream)) == 5
    totals = {k.decode(): int(v) for k, v in client.hgetall(spec.stats_key).items()}
    assert totals == {"scored": 5, "dead_letters": 0, "duplicates": 5}


def test_a_message_that_keeps_coming_back_is_dead_lettered(redis_server, spec) -> None:
    client = redis_server.client()
    poison = client.xadd(spec.input, {"text": "crashes consumers"}).decode()
    client.xgroup_create(spec.input, spec.group, id="0")
    client.xreadgroup(spec.group, "a", {spec.input: ">"})  # three consumers took it and died
    for name in ("b", "c"):
        client.xclaim(spec.input, spec.group, name, 0, [poison])
    knobs = StreamsConfig(
        streams=[spec], max_deliveries=2, claim_idle_s=0.1, claim_interval_s=0.1, block_ms=50
    )
    run_worker(redis_server, spec, scored, settled(spec, 1), knobs)
    (dead,) = entries(client, spec.dead_letter_stream)
    assert dead["id"] == poison
    assert dead["reason"].startswith("delivered 4 times without a result")
    assert client.xlen(spec.output_stream) == 0


def test_reading_waits_for_scoring(redis_server, spec) -> None:
    """Back-pressure: with one batch in flight and scoring stuck, no more is read."""
    client = redis_server.client()
    for i in range(20):
        client.xadd(spec.input, {"text": f"t{i}"})
    release = asyncio.Event()
    seen: list[int] = []

    async def stuck(texts: list[str], user_key: str | None, trace: str) -> dict[str, Any]:
        seen.append(len(texts))
        await release.wait()
        return answer(texts)

    async def main() -> tuple[int, int]:
        import redis.asyncio

        knobs = StreamsConfig(streams=[spec], batch_size=4, max_in_flight=1, block_ms=50)
        worker = StreamWorker(
            lambda: redis.asyncio.Redis.from_url(redis_server.url), spec, knobs, stuck, "c1"
        )
        worker.start()
        while not seen:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # time for many reads, were reading not held back
        info = client.xinfo_groups(spec.input)[0]
        held = (int(info["pending"]), int(info["lag"]))
        release.set()
        while client.xlen(spec.output_stream) < 20:
            await asyncio.sleep(0.02)
        await worker.stop()
        return held

    assert asyncio.run(main()) == (4, 16)
    assert client.xpending(spec.input, spec.group)["pending"] == 0


def test_status_shows_lag_pending_totals_and_consumers(redis_server, spec) -> None:
    client = redis_server.client()
    for i in range(3):
        client.xadd(spec.input, {"text": f"t{i}"})
    run_worker(redis_server, spec, scored, settled(spec, 3))
    client.xadd(spec.input, {"text": "not yet read"})

    async def status() -> dict[str, Any]:
        import redis.asyncio

        async with redis.asyncio.Redis.from_url(redis_server.url) as r:
            return await stream_status(r, spec, interval_s=60.0)

    found = asyncio.run(status())
    assert {k: found[k] for k in ("length", "lag", "pending", "output_length")} == {
        "length": 4,
        "lag": 1,
        "pending": 0,
        "output_length": 3,
    }
    assert found["totals"] == {"scored": 3, "dead_letters": 0, "duplicates": 0}
    (consumer,) = found["consumers"]
    assert consumer["name"] == "c1" and consumer["pending"] == 0


def test_the_cli_sends_a_file_tails_the_results_and_shows_the_status(
    redis_server, spec, tmp_path, capsys
) -> None:
    from servecore.streams.__main__ import main

    texts = tmp_path / "texts.txt"
    texts.write_text('I was charged twice\n\n{"text": "where is my parcel", "user_key": "u7"}\n')
    url = ["--url", redis_server.url]
    assert main([*url, "send", str(texts), "--stream", spec.input]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert (sent["stream"], sent["sent"]) == (spec.input, 2)
    client = redis_server.client()
    assert [e for e in entries(client, spec.input)] == [
        {"text": "I was charged twice"},
        {"data": '{"text": "where is my parcel", "user_key": "u7"}'},
    ]
    run_worker(redis_server, spec, scored, settled(spec, 2))

    assert main([*url, "tail", spec.output_stream]) == 0
    tailed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t["id"] for t in tailed] == [sent["first"], sent["last"]]
    assert tailed[0]["probabilities"] == {"billing": 1.0, "other": 0.0}  # JSON, not a string
    assert main([*url, "tail", spec.output_stream, "--count", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1

    assert main([*url, "status", "--stream", spec.input]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["length"], status["pending"], status["output_length"]) == (2, 0, 2)


def test_the_cli_says_when_redis_is_unreachable(capsys) -> None:
    from servecore.streams.__main__ import main

    assert main(["--url", f"redis://127.0.0.1:{free_port()}/0", "status"]) == 2
    assert "cannot reach Redis at redis://127.0.0.1:" in capsys.readouterr().err

"""One stream, one consumer group, one reader per replica: read, score, write, acknowledge.

:class:`StreamWorker` runs on the replica's event loop (``redis.asyncio``); it knows nothing of
Serve: the deployment hands it a ``score`` coroutine (the gateway's traffic core behind a handle).

The guarantees, and how each is kept:

* **Acknowledged only after the result is written.** The result entries, the dead-letter entries
  and the ``XACK`` of a batch are one Lua script (:data:`WRITE_SCRIPT`), so Redis applies them
  together or not at all.
* **One result per message.** The script writes a message's entry only if it can create the
  message's idempotency key (``SET NX`` with a TTL): a message scored twice (its consumer was
  slow rather than dead, or died between writing and hearing back) is acknowledged again but
  written once.
* **Nothing left behind.** A message stays pending in the group until acknowledged. A replica
  that dies leaves its pending messages; every replica looks for messages idle longer than
  ``claim_idle_s`` (``XAUTOCLAIM``) and finishes them. A message that keeps coming back (it
  kills its consumers) is dead-lettered after ``max_deliveries``.
* **Never retried forever.** A message that cannot be scored (:class:`~.messages.BadMessage`, a
  4xx from the core) is dead-lettered at once with the reason; a transient failure (5xx, a stage
  unavailable, a deadline) is retried ``max_attempts`` times with backoff, then dead-lettered.
* **Back-pressure.** A read waits for one of ``max_in_flight`` slots; a slot is held until its
  batch is written, so a saturated graph slows reading rather than timing messages out.
* **Redis going away.** Any Redis error drops the in-flight batches (their messages stay
  pending), waits with backoff, reconnects, re-creates the group if Redis lost it, and first
  reads this consumer's own pending messages again.

The Lua script touches keys it builds (the idempotency keys), which a Redis Cluster only allows
within one hash slot: name the streams with one hash tag there (``{orders}:in``, ...).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from servecore.monitoring.telemetry import metric
from servecore.streams.config import StreamsConfig, StreamSpec
from servecore.streams.messages import (
    BadMessage,
    Fields,
    Message,
    dead_letter_fields,
    message_time_ms,
    parse,
    result_fields,
)
from servecore.streams.status import forget_gone_consumers, group_info, text_of

logger = logging.getLogger("ray.serve")

Score = Callable[[list[str], str | None, str], Awaitable[dict[str, Any]]]
"""``score(texts, user_key, trace)``: the traffic core's answer as ``/v1/predict`` renders it
(``predictions``, ``models``, ``variant``, ``degraded``, ``degraded_reason``)."""
Item = tuple[str, str, dict[str, str]]
"""One entry to write: message id, ``r`` (result) or ``d`` (dead letter), its fields."""

WRITE_SCRIPT = """
local group, ttl, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local maxlen = tonumber(ARGV[4])
local items = cjson.decode(ARGV[5])
local counts = {r = 0, d = 0, duplicate = 0}
for _, item in ipairs(items) do
  local id, kind, fields = item[1], item[2], item[3]
  if redis.call('SET', prefix .. id, kind, 'NX', 'EX', ttl) then
    local target = KEYS[2]
    if kind == 'd' then target = KEYS[3] end
    if maxlen > 0 then
      redis.call('XADD', target, 'MAXLEN', '~', maxlen, '*', unpack(fields))
    else
      redis.call('XADD', target, '*', unpack(fields))
    end
    counts[kind] = counts[kind] + 1
  else
    counts.duplicate = counts.duplicate + 1
  end
  redis.call('XACK', KEYS[1], group, id)
end
redis.call('HINCRBY', KEYS[4], 'scored', counts.r)
redis.call('HINCRBY', KEYS[4], 'dead_letters', counts.d)
redis.call('HINCRBY', KEYS[4], 'duplicates', counts.duplicate)
return {counts.r, counts.d, counts.duplicate}
"""
"""KEYS: input, output, dead letter, stats hash. ARGV: group, idempotency TTL (s), idempotency
key prefix, output cap (0: none), the items as JSON ``[[id, kind, [field, value, ...]], ...]``."""

RECENT_S = 60.0
"""Window of the throughput and latency each replica reports."""


@dataclass
class Recent:
    """This replica's last minute: when each message was written and its end-to-end latency."""

    written: collections.deque[tuple[float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=100_000)
    )

    def add(self, now: float, latency_ms: float) -> None:
        self.written.append((now, latency_ms))

    def summary(self, now: float) -> dict[str, float | None]:
        while self.written and self.written[0][0] < now - RECENT_S:
            self.written.popleft()
        latencies = sorted(lat for _, lat in self.written)
        last_10s = sum(1 for t, _ in self.written if t >= now - 10.0)

        def pct(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

        return {
            "messages_per_s": round(last_10s / 10.0, 2),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
        }


class StreamWorker:
    """The reader of one stream for one replica; see the module docstring. ``connect`` makes
    the ``redis.asyncio`` client (called again after Redis went away)."""

    def __init__(
        self,
        connect: Callable[[], Any],
        spec: StreamSpec,
        knobs: StreamsConfig,
        score: Score,
        consumer: str,
    ) -> None:
        self.connect = connect
        self.spec = spec
        self.knobs = knobs
        self.score = score
        self.consumer = consumer
        self.redis: Any = None
        self.connected = False
        self.recent = Recent()
        self.counts: collections.Counter[str] = collections.Counter()
        self._slots = asyncio.Semaphore(knobs.max_in_flight)
        self._batches: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._main: asyncio.Task[None] | None = None
        self._status: asyncio.Task[None] | None = None
        self._script: Any = None
        self._served_since_connect = False
        self.last_error: str | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.get_running_loop().create_task(self.run())
        self._status = asyncio.get_running_loop().create_task(self._report_forever())

    async def stop(self) -> None:
        """Stop reading and wait for the batches in flight (their results are written)."""
        self._stopping = True
        for task in (self._main, self._status):
            if task is not None:
                task.cancel()
        for task in (self._main, self._status):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()

    def reconfigure(self, knobs: StreamsConfig) -> None:
        """New knobs for the next read (a new ``max_in_flight`` applies once the batches in
        flight are done)."""
        if knobs.max_in_flight != self.knobs.max_in_flight:
            self._slots = asyncio.Semaphore(knobs.max_in_flight)
        self.knobs = knobs

    async def run(self) -> None:
        backoff = 0.2
        while not self._stopping:
            try:
                await self._serve()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis away, group lost: reconnect
                self.connected = False
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                await self._drop_batches()
                if self._served_since_connect:
                    backoff = 0.2
                logger.warning(
                    "stream %s: %s; reconnecting in %.1fs",
                    self.spec.input,
                    self.last_error,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _drop_batches(self) -> None:
        """Cancel the batches in flight: their messages stay pending and are read again."""
        for task in list(self._batches):
            task.cancel()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        self._slots = asyncio.Semaphore(self.knobs.max_in_flight)
        if self.redis is not None:
            try:
                await self.redis.aclose()
            except Exception:  # noqa: BLE001 - the connection is gone anyway
                pass
            self.redis = None

    # --- reading -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        self._served_since_connect = False
        self.redis = self.connect()
        self._script = self.redis.register_script(WRITE_SCRIPT)
        await self._ensure_group()
        self.connected = True
        self.last_error = None
        await self._read_own_pending()
        cursor = "0-0"
        next_claim = time.monotonic() + self.knobs.claim_interval_s
        while not self._stopping:
            slots = self._slots
            await slots.acquire()
            try:
                entries: list[tuple[str, Fields | None]] = []
                deliveries: dict[str, int] = {}
                if time.monotonic() >= next_claim:
                    cursor, entries, deliveries = await self._claim(cursor)
                    more = cursor != "0-0"
                    wait = 0.0 if more else self.knobs.claim_interval_s
                    next_claim = time.monotonic() + wait
                if not entries:
                    entries = await self._read(">", self.knobs.block_ms)
                self._served_since_connect = True
            except BaseException:
                slots.release()
                raise
            if entries:
                self._spawn(entries, deliveries, slots)
            else:
                slots.release()

    async def _ensure_group(self) -> None:
        import redis.exceptions

        try:
            await self.redis.xgroup_create(self.spec.input, self.spec.group, id="0", mkstream=True)
            logger.info("stream %s: created group %s", self.spec.input, self.spec.group)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _read(self, start: str, block_ms: int | None) -> list[tuple[str, Fields | None]]:
        found = await self.redis.xreadgroup(
            self.spec.group,
            self.consumer,
            {self.spec.input: start},
            count=self.knobs.batch_size,
            block=block_ms,
        )
        if not found:
            return []
        _, entries = found[0]
        return [(text_of(mid), fields or None) for mid, fields in entries]

    async def _read_own_pending(self) -> None:
        """What this consumer had read but not acknowledged before Redis went away."""
        start = "0-0"
        while not self._stopping:
            entries = await self._read(start, None)
            if not entries:
                return
            await self._slots.acquire()
            self._spawn(entries, {}, self._slots)
            start = entries[-1][0]

    async def _claim(
        self, cursor: str
    ) -> tuple[str, list[tuple[str, Fields | None]], dict[str, int]]:
        """Messages idle past ``claim_idle_s`` in any consumer (a dead one), now this one's, and
        how often each was delivered."""
        reply = await self.redis.xautoclaim(
            self.spec.input,
            self.spec.group,
            self.consumer,
            min_idle_time=int(self.knobs.claim_idle_s * 1000),
            start_id=cursor,
            count=self.knobs.batch_size,
        )
        next_cursor, claimed = text_of(reply[0]), reply[1]
        entries = [(text_of(mid), fields or None) for mid, fields in claimed]
        deliveries: dict[str, int] = {}
        if entries:
            pending = await self.redis.xpending_range(
                self.spec.input,
                self.spec.group,
                min=entries[0][0],
                max=entries[-1][0],
                count=len(entries),
                consumername=self.consumer,
            )
            deliveries = {text_of(p["message_id"]): int(p["times_delivered"]) for p in pending}
            logger.warning(
                "stream %s: claimed %d messages left pending by other consumers",
                self.spec.input,
                len(entries),
            )
            metric("intent_stream_messages").inc(
                len(entries), tags={"stream": self.spec.input, "outcome": "claimed"}
            )
        return next_cursor, entries, deliveries

    def _spawn(
        self,
        entries: list[tuple[str, Fields | None]],
        deliveries: dict[str, int],
        slots: asyncio.Semaphore,
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._process(entries, deliveries))
        self._batches.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._batches.discard(finished)
            slots.release()
            if not finished.cancelled() and finished.exception() is not None:
                logger.warning(
                    "stream %s: batch not written (%r); its messages stay pending",
                    self.spec.input,
                    finished.exception(),
                )

        task.add_done_callback(done)

    # --- scoring and writing ---------------------------------------------------------------

    async def _process(
        self, entries: list[tuple[str, Fields | None]], deliveries: dict[str, int]
    ) -> None:
        items: list[Item] = []
        gone: list[str] = []
        by_key: dict[str | None, list[Message]] = {}
        for message_id, fields in entries:
            if fields is None:  # deleted from the stream while pending
                gone.append(message_id)
                continue
            delivered = deliveries.get(message_id, 0)
            if delivered > self.knobs.max_deliveries:
                reason = f"delivered {delivered} times without a result (it may crash consumers)"
                items.append(self._dead(message_id, fields, reason, delivered))
                continue
            try:
                message = parse(message_id, fields)
            except BadMessage as e:
                items.append(self._dead(message_id, fields, str(e), 1))
                continue
            by_key.setdefault(message.user_key, []).append(message)
        fields_of = {mid: fields for mid, fields in entries if fields is not None}
        scored = await asyncio.gather(
            *(self._score(messages, key, fields_of) for key, messages in by_key.items())
        )
        for part in scored:
            items.extend(part)
        if gone:
            await self.redis.xack(self.spec.input, self.spec.group, *gone)
        if items:
            await self._write(items)

    async def _score(
        self, messages: list[Message], user_key: str | None, fields_of: dict[str, Fields]
    ) -> list[Item]:
        texts = [m.text for m in messages]
        trace = f"stream-{messages[0].id}"
        delay = self.knobs.retry_backoff_s
        for attempt in range(1, self.knobs.max_attempts + 1):
            try:
                answer = await self.score(texts, user_key, trace)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - refused: dead letters; else retried
                status = getattr(e, "status_code", 500)
                reason = _reason(e)
                if isinstance(status, int) and status < 500:
                    why = f"refused by the model ({status}): {reason}"
                    return [self._dead(m.id, fields_of[m.id], why, attempt) for m in messages]
                if attempt == self.knobs.max_attempts:
                    why = f"not scored after {attempt} attempts: {reason}"
                    return [self._dead(m.id, fields_of[m.id], why, attempt) for m in messages]
                logger.warning(
                    "stream %s: scoring failed (%s); attempt %d of %d in %.1fs",
                    self.spec.input,
                    reason,
                    attempt + 1,
                    self.knobs.max_attempts,
                    delay,
                )
                metric("intent_stream_messages").inc(
                    len(messages), tags={"stream": self.spec.input, "outcome": "retried"}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            now_ms = time.time() * 1000.0
            return [
                (m.id, "r", result_fields(m.id, prediction, answer, now_ms))
                for m, prediction in zip(messages, answer["predictions"], strict=True)
            ]
        raise AssertionError("unreachable")

    def _dead(self, message_id: str, fields: Fields, reason: str, attempts: int) -> Item:
        return (
            message_id,
            "d",
            dead_letter_fields(message_id, fields, reason, self.consumer, attempts),
        )

    async def _write(self, items: list[Item]) -> None:
        import json

        payload = json.dumps(
            [
                [mid, kind, [x for pair in fields.items() for x in pair]]
                for mid, kind, fields in items
            ]
        )
        spec = self.spec
        written, dead, duplicates = await self._script(
            keys=[spec.input, spec.output_stream, spec.dead_letter_stream, spec.stats_key],
            args=[spec.group, self.knobs.dedupe_ttl_s, spec.done_prefix, self.knobs.output_max_len]
            + [payload],
        )
        now = time.time()
        latency = metric("intent_stream_latency_ms")
        for mid, kind, _ in items:
            if kind == "r":
                took = max(0.0, now * 1000.0 - message_time_ms(mid))
                self.recent.add(now, took)
                latency.observe(took, tags={"stream": spec.input})
        messages = metric("intent_stream_messages")
        for outcome, n in (("scored", written), ("dead_letter", dead), ("duplicate", duplicates)):
            if n:
                self.counts[outcome] += n
                messages.inc(n, tags={"stream": spec.input, "outcome": outcome})

    # --- reporting -----------------------------------------------------------------------------

    async def _report_forever(self) -> None:
        """Lag and pending into the metrics, this replica's recent rate into its heartbeat."""
        import json

        ticks = 0
        while not self._stopping:
            await asyncio.sleep(self.knobs.status_interval_s)
            if not self.connected or self.redis is None:
                continue
            ticks += 1
            try:
                if ticks % 100 == 1:
                    await forget_gone_consumers(self.redis, self.spec)
                group = await group_info(self.redis, self.spec)
                tags = {"stream": self.spec.input, "group": self.spec.group}
                if group is not None:
                    if group["lag"] is not None:
                        metric("intent_stream_lag").set(group["lag"], tags=tags)
                    metric("intent_stream_pending").set(group["pending"], tags=tags)
                beat = {
                    **self.recent.summary(time.time()),
                    **self.counts,
                    "at": time.time(),
                    "in_flight": len(self._batches),
                }
                await self.redis.hset(self.spec.heartbeat_key, self.consumer, json.dumps(beat))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the reader reconnects; try again next time
                logger.debug("stream %s: status not read: %r", self.spec.input, e)


def _reason(error: BaseException) -> str:
    """A short reason for a dead-letter entry (the error's last line, no traceback)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]

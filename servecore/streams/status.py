"""A stream's state as Redis and the live consumers see it: ``GET /v1/streams`` and the CLI's
``status``.

Lag and pending come from the group itself (``XINFO GROUPS``), so they are the same whichever
replica is asked; rates and latencies come from each consumer's heartbeat (written every
``status_interval_s`` by its worker), and a consumer whose heartbeat is older than three
intervals is shown as not live.
"""

from __future__ import annotations

import json
import time
from typing import Any

from servecore.streams.config import StreamSpec

LIVE_INTERVALS = 3
FORGET_AFTER_S = 3600.0
"""A consumer with nothing pending that has been idle this long (a replica that is gone) is
removed from the group, so restarts do not pile up names."""


def text_of(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def group_info(client: Any, spec: StreamSpec) -> dict[str, Any] | None:
    """The group's lag (entries not yet delivered to it; None when Redis cannot tell), pending
    count and consumers, or None when the stream or the group does not exist yet."""
    import redis.exceptions

    try:
        groups = await client.xinfo_groups(spec.input)
    except redis.exceptions.ResponseError:
        return None  # no such stream yet
    for group in groups:
        if text_of(group["name"]) == spec.group:
            lag = group.get("lag")
            return {
                "lag": None if lag is None else int(lag),
                "pending": int(group["pending"]),
                "consumers": int(group["consumers"]),
                "last_delivered_id": text_of(group["last-delivered-id"]),
            }
    return None


async def stream_status(redis: Any, spec: StreamSpec, interval_s: float) -> dict[str, Any]:
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(spec.input)
    pipe.xlen(spec.output_stream)
    pipe.xlen(spec.dead_letter_stream)
    pipe.hgetall(spec.stats_key)
    pipe.hgetall(spec.heartbeat_key)
    length, output_length, dead_length, totals, beats = await pipe.execute()
    group = await group_info(redis, spec)
    consumers: list[dict[str, Any]] = []
    if group is not None:
        now = time.time()
        beat_of = {text_of(k): json.loads(v) for k, v in beats.items()}
        for entry in await redis.xinfo_consumers(spec.input, spec.group):
            name = text_of(entry["name"])
            beat = beat_of.get(name, {})
            live = bool(beat) and now - float(beat.get("at", 0)) <= LIVE_INTERVALS * interval_s
            consumers.append(
                {
                    "name": name,
                    "pending": int(entry["pending"]),
                    "idle_ms": int(entry["idle"]),
                    "live": live,
                    "messages_per_s": beat.get("messages_per_s") if live else 0.0,
                    "p50_ms": beat.get("p50_ms") if live else None,
                    "p99_ms": beat.get("p99_ms") if live else None,
                }
            )
    live_consumers = [c for c in consumers if c["live"]]
    p99s = [c["p99_ms"] for c in live_consumers if c["p99_ms"] is not None]
    return {
        "input": spec.input,
        "output": spec.output_stream,
        "dead_letter": spec.dead_letter_stream,
        "group": spec.group,
        "length": int(length),
        "lag": None if group is None else group["lag"],
        "last_delivered_id": None if group is None else group["last_delivered_id"],
        "pending": 0 if group is None else group["pending"],
        "output_length": int(output_length),
        "dead_letter_length": int(dead_length),
        "totals": {
            name: int(totals.get(name.encode(), 0))
            for name in ("scored", "dead_letters", "duplicates")
        },
        "messages_per_s": round(sum(c["messages_per_s"] or 0.0 for c in live_consumers), 2),
        "worst_p99_ms": max(p99s) if p99s else None,
        "consumers": consumers,
    }


async def forget_gone_consumers(redis: Any, spec: StreamSpec) -> list[str]:
    """Remove consumers with nothing pending that have been idle :data:`FORGET_AFTER_S`."""
    gone = []
    for entry in await redis.xinfo_consumers(spec.input, spec.group):
        name = text_of(entry["name"])
        if int(entry["pending"]) == 0 and int(entry["idle"]) > FORGET_AFTER_S * 1000:
            await redis.xgroup_delconsumer(spec.input, spec.group, name)
            await redis.hdel(spec.heartbeat_key, name)
            gone.append(name)
    return gone

"""The stream consumer: a Serve deployment whose replicas read Redis Streams through one consumer
group and score every message through the gateway's traffic core.

Each replica runs one :class:`~servecore.streams.worker.StreamWorker` per configured stream on its
event loop; the workers call the gateway's ``classify_texts`` handle method (one call per batch
of messages), so release pinning, A/B variants, the cache, the fallback and coalescing apply to
a message exactly as to ``/v1/predict``. Replicas share the group: each message goes to one of
them, and what a dead replica left pending another one claims.

The deployment is part of the application only when ``INTENT_SERVING_STREAMS_URL`` is set
(:func:`graphs.intent.build_app`); its ``user_config`` (:class:`~servecore.streams.config.
StreamsConfig`) lists the streams and the live knobs. No streams listed: no reader starts and
Redis is never contacted.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve

from servecore.settings import get_settings
from servecore.streams.config import StreamsConfig, StreamSpec
from servecore.streams.status import stream_status
from servecore.streams.worker import StreamWorker

logger = logging.getLogger("ray.serve")


@serve.deployment(name="StreamConsumer", max_ongoing_requests=16)
class StreamConsumer:
    def __init__(self, app_name: str | None = None) -> None:
        context = serve.get_replica_context()
        self.app_name = app_name or context.app_name
        self.consumer = f"consumer-{context.replica_id.unique_id}"
        self.knobs = StreamsConfig()
        self.workers: dict[StreamSpec, StreamWorker] = {}
        self._gateway: Any = None
        self._redis: Any = None

    def _connect(self) -> Any:
        import redis.asyncio

        url = get_settings().streams_url
        if url is None:
            raise RuntimeError("INTENT_SERVING_STREAMS_URL is not set")
        return redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=self.knobs.block_ms / 1000 + 10,
            health_check_interval=30,
        )

    async def _score(self, texts: list[str], user_key: str | None, trace: str) -> dict[str, Any]:
        if self._gateway is None:
            self._gateway = serve.get_deployment_handle("Gateway", app_name=self.app_name)
        answer: dict[str, Any] = await self._gateway.classify_texts.remote(texts, user_key, trace)
        return answer

    async def reconfigure(self, config: dict[str, Any]) -> None:
        knobs = StreamsConfig.model_validate(config or {})
        if knobs.streams and get_settings().streams_url is None:
            raise ValueError("streams are listed but INTENT_SERVING_STREAMS_URL is not set")
        self.knobs = knobs
        wanted = set(knobs.streams)
        for spec in [s for s in self.workers if s not in wanted]:
            logger.info("stream %s: stopping (no longer configured)", spec.input)
            await self.workers.pop(spec).stop()
        for spec in knobs.streams:
            worker = self.workers.get(spec)
            if worker is not None:
                worker.reconfigure(knobs)
                continue
            logger.info(
                "stream %s: consuming as %s in group %s -> %s (dead letters: %s)",
                spec.input,
                self.consumer,
                spec.group,
                spec.output_stream,
                spec.dead_letter_stream,
            )
            worker = StreamWorker(self._connect, spec, knobs, self._score, self.consumer)
            worker.start()
            self.workers[spec] = worker

    async def status(self) -> dict[str, Any]:
        """Every configured stream as Redis sees it (lag, pending, totals, the live consumers'
        rates and latencies) and this replica's readers (a handle method: ``GET /v1/streams``)."""
        if not self.knobs.streams:
            return {"enabled": True, "consumer": self.consumer, "streams": []}
        import redis.exceptions

        try:
            return await self._status()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            # Redis went away since the last call (a restart): one more try on a new connection.
            if self._redis is not None:
                await self._redis.aclose()
            self._redis = None
            return await self._status()

    async def _status(self) -> dict[str, Any]:
        if self._redis is None:
            self._redis = self._connect()
        streams = []
        for spec in self.knobs.streams:
            worker = self.workers.get(spec)
            found = await stream_status(self._redis, spec, self.knobs.status_interval_s)
            found["reader"] = {
                "consumer": self.consumer,
                "connected": worker.connected if worker else False,
                "last_error": worker.last_error if worker else None,
            }
            streams.append(found)
        return {
            "enabled": True,
            "consumer": self.consumer,
            "knobs": self.knobs.model_dump(mode="json", exclude={"streams"}),
            "streams": streams,
        }

    def describe(self) -> dict[str, Any]:
        """This replica's process and consumer name (for operators and the fault tests)."""
        return {"pid": os.getpid(), "consumer": self.consumer}

    async def __del__(self) -> None:
        for worker in list(self.workers.values()):
            await worker.stop()
        self.workers.clear()

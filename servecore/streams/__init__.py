"""Predictions from a message stream: Redis Streams in, one result per message out.

* :mod:`.config` — the consumer's live knobs and the streams it reads;
* :mod:`.messages` — what a message must hold, and the result and dead-letter entries written
  for it (plain Python, no Redis);
* :mod:`.worker` — one consumer-group reader per stream (asyncio, ``redis.asyncio``): reads no
  more than it can score, claims what dead consumers left, writes each result exactly once;
* :mod:`.status` — lag, pending and throughput as ``GET /v1/streams`` and the CLI show them;
* ``python -m servecore.streams`` — send a file of texts, tail a stream, show the status.

The Serve deployment around the worker is :mod:`deployments.stream_consumer`.
"""

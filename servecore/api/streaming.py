"""Answers that stream over HTTP: newline-delimited JSON or server-sent events.

A client asks with ``Accept: application/x-ndjson`` (one JSON object per line) or
``Accept: text/event-stream`` (SSE: ``event:``/``data:`` blocks, which browsers' ``EventSource``
reads). A failure after the first line cannot change the status any more: it is the stream's
last line (NDJSON ``{"error": {...}}``, SSE ``event: error``), in DESIGN contract 7's shape.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

from fastapi import Request

NDJSON: Final = "application/x-ndjson"
SSE: Final = "text/event-stream"
Format = Literal["application/x-ndjson", "text/event-stream"]


def streamed_format(request: Request) -> Format | None:
    """The streaming format the client's ``Accept`` header asks for, if any (NDJSON first)."""
    accept = request.headers.get("accept", "").lower()
    if NDJSON in accept:
        return NDJSON
    if SSE in accept:
        return SSE
    return None


def encode(fmt: Format, event: str, payload: dict[str, Any], event_id: str | None = None) -> bytes:
    """One NDJSON line (the payload; ``event`` is implied by its fields) or one SSE block."""
    data = json.dumps(payload, separators=(",", ":"))
    if fmt == NDJSON:
        return (data + "\n").encode()
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"
"""An SSE comment: keeps idle proxies from closing a quiet event stream (NDJSON sends none)."""

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Ask proxies (nginx, HAProxy with buffering) to pass each line on as it comes."""

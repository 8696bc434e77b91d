"""``GET /v1/streams``: the application's stream consumers as Redis sees them.

The gateway asks one ``StreamConsumer`` replica (a handle call); lag, pending and totals come from
the consumer group itself, so any replica gives the same picture, and every live consumer's rate
and latency come from its heartbeat (:mod:`servecore.streams.status`).
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from servecore.api.common import ERRORS, json_response
from servecore.api.context import services
from servecore.errors import ModelUnavailable

router = APIRouter()


@router.get("/v1/streams", responses=ERRORS)
async def streams() -> Response:
    """Per configured input stream: its length, the group's ``lag`` (entries not yet delivered)
    and ``pending`` (delivered, not acknowledged), the output and dead-letter streams' lengths,
    the totals written, and each consumer's pending count, idle time, messages/s and end-to-end
    p50/p99 latency. ``enabled`` is false when the application has no stream consumer
    (``INTENT_SERVING_STREAMS_URL`` unset)."""
    handle = services().streams
    if handle is None:
        return json_response(
            {
                "enabled": False,
                "reason": "no stream consumer: set INTENT_SERVING_STREAMS_URL and list the "
                "streams in the StreamConsumer deployment's user_config",
                "streams": [],
            }
        )
    try:
        status = await handle.status.remote()
    except Exception as e:  # noqa: BLE001 - Redis or the consumer is away: a 503, not a 500
        raise ModelUnavailable(f"the stream status is unavailable: {type(e).__name__}") from e
    return json_response(status)

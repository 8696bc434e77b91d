"""``POST /v1/feedback``: the true label of a text the gateway answered (``predict`` scope).

Only answers recorded under ``feedback.record_rate`` can be labelled; the label is kept in the
job store's database beside the answer, where the rollouts' accuracy gate and the retraining job
(``python -m training.retrain``) read it.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Response

from servecore import LABELS
from servecore.api.common import ERRORS, json_response
from servecore.api.context import services
from servecore.api.schemas import FeedbackRequest
from servecore.errors import AnswerNotFound, InvalidRequest
from servecore.rollouts import control

router = APIRouter()


@router.post("/v1/feedback", responses=ERRORS)
async def feedback(body: FeedbackRequest) -> Response:
    """Store ``label`` as the truth for text ``position`` of answer ``request_id`` (sending it
    again replaces it). 404 when the answer was not recorded; 422 for an unknown label or a
    position the answer lacks."""
    if body.label not in LABELS:
        raise InvalidRequest(f"unknown label {body.label!r}; labels: {list(LABELS)}")
    record_rate = services().core.knobs.feedback.record_rate
    store = control.get_store()
    try:
        stored = await asyncio.to_thread(
            store.add_feedback, body.request_id, body.position, body.label, time.time()
        )
    except KeyError as e:
        hint = (
            "answers are not recorded here (feedback.record_rate is 0)"
            if record_rate == 0
            else f"only a share of answers is recorded (feedback.record_rate {record_rate:g})"
        )
        raise AnswerNotFound(f"no recorded answer {body.request_id!r}: {hint}") from e
    except IndexError as e:
        raise InvalidRequest(
            f"answer {body.request_id!r} has no text at position {body.position}"
        ) from e
    return json_response(stored)

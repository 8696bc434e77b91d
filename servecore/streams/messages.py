"""What a stream message must hold, and the entries written for it (plain Python, no Redis).

A message is a stream entry with either

* a ``text`` field: the text itself (``XADD intents * text "I was charged twice"``), or
* a ``data`` field: a JSON object ``{"text": ..., "user_key": ...}``; ``user_key`` is the A/B
  experiment's sticky key, as the ``X-User-Key`` header is for ``/v1/predict``.

A message that breaks these rules gets a :class:`BadMessage` whose reason goes to the
dead-letter stream; it is never retried.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from servecore.api.schemas import MAX_TEXT_CHARS

Fields = dict[bytes, bytes]


class BadMessage(ValueError):
    """The message cannot be scored; the text is the reason the dead-letter entry gives."""


@dataclass(frozen=True)
class Message:
    id: str
    text: str
    user_key: str | None


def parse(message_id: str, fields: Fields) -> Message:
    """The message's text and sticky key, or :class:`BadMessage` saying what is wrong."""
    if b"text" in fields:
        text: Any = _utf8(fields[b"text"], "text")
        user_key: Any = _utf8(fields[b"user_key"], "user_key") if b"user_key" in fields else None
    elif b"data" in fields:
        raw = _utf8(fields[b"data"], "data")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise BadMessage(f"data is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise BadMessage(f"data must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"text", "user_key"})
        if unknown:
            raise BadMessage(f"data has unknown fields {unknown}; allowed: text, user_key")
        if "text" not in data:
            raise BadMessage("data has no text")
        text, user_key = data["text"], data.get("user_key")
    else:
        names = sorted(k.decode("utf-8", "replace") for k in fields)
        raise BadMessage(f"no text: the message needs a text or data field, it has {names}")
    if not isinstance(text, str):
        raise BadMessage(f"text must be a string, got {_json_type(text)}")
    if not text.strip():
        raise BadMessage("text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise BadMessage(f"text is {len(text)} characters, at most {MAX_TEXT_CHARS}")
    if user_key is not None and not isinstance(user_key, str):
        raise BadMessage(f"user_key must be a string, got {_json_type(user_key)}")
    return Message(message_id, text, user_key)


def _utf8(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadMessage(f"{name} is not UTF-8") from e


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def message_time_ms(message_id: str) -> int:
    """When Redis took the message in (the first part of an auto-generated id)."""
    return int(message_id.split("-", 1)[0])


def result_fields(
    message_id: str, prediction: dict[str, Any], answer: dict[str, Any], now_ms: float
) -> dict[str, str]:
    """The output entry of one scored message: its id, label and probabilities, the model
    versions, the A/B variant, whether a backup answered, and the end-to-end latency (from the
    message's id time to this write)."""
    models = [
        {"stage": m["stage"], "name": m["name"], "version": m["version"]} for m in answer["models"]
    ]
    fields = {
        "id": message_id,
        "label": prediction["label"],
        "probabilities": json.dumps(prediction["probabilities"]),
        "models": json.dumps(models),
        "variant": answer["variant"],
        "degraded": "1" if answer["degraded"] else "0",
        "latency_ms": f"{max(0.0, now_ms - message_time_ms(message_id)):.1f}",
    }
    if answer.get("degraded_reason"):
        fields["degraded_reason"] = answer["degraded_reason"]
    return fields


def dead_letter_fields(
    message_id: str, fields: Fields, reason: str, consumer: str, attempts: int
) -> dict[str, str]:
    """The dead-letter entry of a message: its id, the reason, the message as it came (JSON),
    who gave up on it and after how many attempts."""
    original = {
        k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()
    }
    return {
        "id": message_id,
        "reason": reason,
        "message": json.dumps(original),
        "consumer": consumer,
        "attempts": str(attempts),
    }

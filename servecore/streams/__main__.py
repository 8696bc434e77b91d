"""``python -m servecore.streams``: try the stream path by hand.

* ``send FILE`` — one message per line of FILE (``-``: stdin): a plain line becomes a ``text``
  field, a line holding a JSON object a ``data`` field (``{"text": ..., "user_key": ...}``);
* ``tail STREAM`` — print a stream's entries as JSON lines (results, dead letters, or inputs),
  ``--follow`` to wait for new ones;
* ``status`` — the group's lag, pending, totals and consumers, as ``GET /v1/streams`` shows them.

The Redis URL is ``--url``, else ``INTENT_SERVING_STREAMS_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from servecore.settings import get_settings
from servecore.streams.config import StreamSpec

SEND_CHUNK = 500
JSON_FIELDS = ("probabilities", "models", "message")
"""Fields of result and dead-letter entries that hold JSON: printed as JSON, not as strings."""


def _url(given: str | None) -> str:
    url = given or get_settings().streams_url
    if not url:
        raise SystemExit(
            "no Redis: pass --url redis://host:6379/0 or set INTENT_SERVING_STREAMS_URL"
        )
    return url


def message_fields(line: str) -> dict[str, str]:
    """A line of the input file as the fields of one message."""
    text = line.rstrip("\n")
    if text.lstrip().startswith("{"):
        return {"data": text}
    return {"text": text}


def send(client: Any, stream: str, lines: TextIO) -> tuple[int, str | None, str | None]:
    """Add one message per non-empty line; returns how many, and the first and last ids."""
    count, first, last = 0, None, None
    batch: list[dict[str, str]] = []

    def flush() -> None:
        nonlocal count, first, last
        pipe = client.pipeline(transaction=False)
        for fields in batch:
            pipe.xadd(stream, fields)
        ids = [i.decode() for i in pipe.execute()]
        if ids:
            first = first or ids[0]
            last = ids[-1]
            count += len(ids)
        batch.clear()

    for line in lines:
        if line.strip():
            batch.append(message_fields(line))
        if len(batch) >= SEND_CHUNK:
            flush()
    flush()
    return count, first, last


def readable(entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {"entry": entry_id.decode()}
    for key, value in fields.items():
        name, text = key.decode(), value.decode("utf-8", "replace")
        out[name] = json.loads(text) if name in JSON_FIELDS else text
    return out


def tail(
    client: Any, stream: str, start: str, count: int | None, follow: bool
) -> Iterator[dict[str, Any]]:
    """Entries after ``start`` (``0``: from the beginning, ``$``: only new ones)."""
    shown = 0
    last = start
    if start == "$":
        newest = client.xrevrange(stream, count=1)
        last = newest[0][0].decode() if newest else "0-0"
    while count is None or shown < count:
        found = client.xread({stream: last}, count=100, block=1000 if follow else None)
        if not found:
            if follow:
                continue
            return
        for entry_id, fields in found[0][1]:
            yield readable(entry_id, fields)
            last = entry_id.decode()
            shown += 1
            if count is not None and shown >= count:
                return


async def _status(url: str, spec: StreamSpec) -> dict[str, Any]:
    import redis.asyncio

    from servecore.streams.status import stream_status

    async with redis.asyncio.Redis.from_url(url) as client:
        return await stream_status(client, spec, interval_s=2.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servecore.streams", description=__doc__)
    parser.add_argument("--url", help="Redis URL (default: INTENT_SERVING_STREAMS_URL)")
    commands = parser.add_subparsers(dest="command", required=True)
    sending = commands.add_parser("send", help="one message per line of a file")
    sending.add_argument("file", help="text file, one message per line; - for stdin")
    sending.add_argument("--stream", default="tickets", help="input stream (default: tickets)")
    tailing = commands.add_parser("tail", help="print a stream's entries as JSON lines")
    tailing.add_argument("stream", help="e.g. tickets:results or tickets:dead")
    tailing.add_argument("--from", dest="start", default="0", help="0 (all) or $ (new only)")
    tailing.add_argument("--count", type=int, default=None, help="stop after this many")
    tailing.add_argument("--follow", "-f", action="store_true", help="wait for new entries")
    status = commands.add_parser("status", help="lag, pending, totals and consumers")
    status.add_argument("--stream", default="tickets", help="input stream (default: tickets)")
    status.add_argument("--group", default="intent-serving")
    args = parser.parse_args(argv)

    import redis

    url = _url(args.url)
    client = redis.Redis.from_url(url)
    try:
        if args.command == "send":
            if args.file == "-":
                count, first, last = send(client, args.stream, sys.stdin)
            else:
                with open(args.file, encoding="utf-8") as lines:
                    count, first, last = send(client, args.stream, lines)
            print(json.dumps({"stream": args.stream, "sent": count, "first": first, "last": last}))
        elif args.command == "tail":
            for entry in tail(client, args.stream, args.start, args.count, args.follow):
                print(json.dumps(entry), flush=True)
        else:
            spec = StreamSpec(input=args.stream, group=args.group)
            print(json.dumps(asyncio.run(_status(url, spec)), indent=2))
    except redis.ConnectionError as e:
        print(f"cannot reach Redis at {url}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

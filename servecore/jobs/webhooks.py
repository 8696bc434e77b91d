"""Signed job-completion callbacks: where they may go, how they are signed, how they are retried.

Signature: ``X-Intent-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
A receiver recomputes the HMAC over the timestamp, a dot and the raw body with the shared secret,
compares in constant time, and refuses old timestamps (replays); :func:`verify` does all three.

Targets are checked when a job is submitted and again before every delivery (a name may resolve
elsewhere later): by default only public addresses are allowed — loopback, private, link-local,
multicast and reserved ranges are refused, because a callback is a request *from inside* the
cluster. ``allow`` lists networks that are allowed anyway (tests allow ``127.0.0.0/8``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from servecore.errors import InvalidRequest

SIGNATURE_HEADER = "X-Intent-Signature"
EVENT_HEADER = "X-Intent-Event"
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and is at most ``tolerance_s`` old."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body)
    return hmac.compare_digest(expected, f"t={timestamp},v1={parts.get('v1', '')}")


def parse_networks(values: Sequence[str]) -> list[IpNetwork]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def check_target(url: str, allow: Sequence[IpNetwork]) -> None:
    """Raise :class:`InvalidRequest` unless ``url`` is an http(s) URL whose host resolves only to
    addresses the policy admits (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("callback_url must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise InvalidRequest("callback_url must not carry credentials")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidRequest(f"callback_url host {parts.hostname!r} does not resolve") from e
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if any(address in network for network in allow):
            continue
        if _refused(address):
            raise InvalidRequest(
                f"callback_url host {parts.hostname!r} resolves to {address}, a private or "
                "reserved address; allow it explicitly in the webhook settings"
            )


@dataclass(frozen=True)
class WebhookPolicy:
    secret: str
    allow: tuple[IpNetwork, ...] = ()
    max_attempts: int = 6
    backoff_s: float = 2.0
    """Delay before the second attempt; doubled after every failure (capped at ``max_delay_s``)."""
    max_delay_s: float = 300.0
    timeout_s: float = 10.0

    def retry_delay(self, attempts_made: int) -> float:
        return min(self.backoff_s * 2 ** (attempts_made - 1), self.max_delay_s)


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    status_code: int | None
    error: str | None
    took_s: float


def payload(job: dict[str, Any]) -> bytes:
    """The callback body: the job as ``GET /v1/jobs/{id}`` shows it, under an event name."""
    return json.dumps(
        {"event": f"job.{job['state']}", "job": job}, separators=(",", ":"), sort_keys=True
    ).encode()


def deliver(url: str, body: bytes, event: str, policy: WebhookPolicy) -> Outcome:
    """One POST; any 2xx is delivered, anything else (3xx included: redirects are not followed,
    they could lead past the target check) is a failure to retry."""
    started = time.perf_counter()
    try:
        check_target(url, policy.allow)
        timestamp = int(time.time())
        response = httpx.post(
            url,
            content=body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: signature(policy.secret, timestamp, body),
                EVENT_HEADER: event,
            },
            timeout=policy.timeout_s,
            follow_redirects=False,
            trust_env=False,
        )
    except (httpx.HTTPError, InvalidRequest) as e:
        message = e.message if isinstance(e, InvalidRequest) else f"{type(e).__name__}: {e}"
        return Outcome(False, None, message[:300], time.perf_counter() - started)
    ok = 200 <= response.status_code < 300
    return Outcome(
        ok,
        response.status_code,
        None if ok else f"HTTP {response.status_code}",
        time.perf_counter() - started,
    )


def listen(port: int, secret: str) -> None:
    """A local receiver for trying callbacks out: prints each one and whether it verifies."""
    import http.server

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            ok = verify(secret, self.headers.get(SIGNATURE_HEADER, ""), body)
            event = self.headers.get(EVENT_HEADER)
            print(f"{event} signature {'valid' if ok else 'INVALID'}: {body[:300].decode()}")
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Receiver)
    print(f"listening on http://127.0.0.1:{port}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import os

    parser = argparse.ArgumentParser(
        prog="python -m servecore.jobs.webhooks",
        description="Receive job callbacks on 127.0.0.1 and check their signatures.",
    )
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--secret",
        default=os.environ.get("INTENT_SERVING_WEBHOOK_SECRET"),
        help="signing secret (default: $INTENT_SERVING_WEBHOOK_SECRET)",
    )
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("no secret: pass --secret or set INTENT_SERVING_WEBHOOK_SECRET")
    listen(args.port, args.secret)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

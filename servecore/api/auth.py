"""API keys with scopes, per-key rate limits and body-size limits, as one ASGI middleware.

Keys are configured hashed (``INTENT_SERVING_API_KEYS``, a JSON list of :class:`ApiKey`); the
plain key is shown once, by ``python -m servecore.api.auth new NAME --scopes predict,jobs``. A
caller sends it as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

:class:`Guard` answers, before the route runs and in the one error shape:

* 401 for a missing or unknown key (with ``WWW-Authenticate``), 403 for a key without the route's
  scope (:func:`required_scope`: ``predict``, ``jobs`` or ``admin``; health checks need nothing);
* 429 with ``Retry-After`` when the key's token bucket is empty (per gateway replica);
* 413 for a body larger than the route's limit, whether announced by ``Content-Length`` or not;
* 400 for a request carrying one of the Serve proxy's per-request override headers
  (:data:`PROXY_HINTS`), on every route.

The key's name becomes ``request.state.caller``: jobs belong to it. Presented keys are hashed
and compared with :func:`hmac.compare_digest` against every configured hash, so neither the match
nor its position leaks through timing; no key or hash is ever logged.

With no key configured every route is open (the local default, logged loudly at start-up) and
every caller is ``anonymous``: size limits apply, rate limits do not (there is no key to count
against; one shared bucket would throttle every client together).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Scope = Literal["predict", "jobs", "admin"]
SCOPES: tuple[Scope, ...] = ("predict", "jobs", "admin")
ANONYMOUS = "anonymous"
KEY_PREFIX = "isk_"

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class ApiKey(BaseModel):
    """One configured key: its name (the caller), the hash of the key, what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    scopes: tuple[Scope, ...] = Field(min_length=1)
    rate_per_s: float | None = Field(default=None, gt=0.0, le=1_000_000.0)
    """This key's sustained requests per second (per gateway replica); default: the gateway's."""
    burst: int | None = Field(default=None, ge=1, le=1_000_000)


class LimitsConfig(BaseModel):
    """Live request limits of the gateway (``user_config.limits``)."""

    model_config = ConfigDict(extra="forbid")

    rate_per_s: float = Field(default=50.0, gt=0.0, le=1_000_000.0)
    """Sustained requests per second per key, per gateway replica."""
    burst: int = Field(default=100, ge=1, le=1_000_000)
    """Requests a key may send at once after a quiet spell."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    """Largest request body (1 MiB: 64 texts of 2,000 characters fit several times over)."""
    max_job_body_bytes: int = Field(default=32 << 20, ge=1024, le=1 << 31)
    """Largest ``POST /v1/jobs`` body (10,000 texts)."""


def hash_key(key: str) -> str:
    """Keys are 256-bit random tokens: one SHA-256 is enough (no password stretching needed)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def required_scope(path: str) -> Scope | None | Literal["open"]:
    """The scope a route needs; ``None`` means any valid key, ``"open"`` no key at all."""
    if path in ("/healthz", "/readyz"):
        return "open"
    if path.startswith("/v1/jobs"):
        return "jobs"
    if path.startswith(
        ("/v1/experiments", "/v1/monitoring", "/v1/admin", "/v1/streams", "/v1/rollouts")
    ):
        return "admin"
    if path.startswith(("/v1/predict", "/v1/embeddings", "/v1/models", "/v1/feedback")):
        return "predict"
    if path in ("/v2/health/live", "/v2/health/ready"):
        return "open"
    if path == "/v2" or path.startswith(("/v2/models", "/v2/repository")):
        return "predict"
    if path in ("/ping", "/health", "/version"):  # MLflow's scoring server's own probes
        return "open"
    if path == "/invocations":
        return "predict"
    return None  # the docs, the OpenAPI schema, unknown paths (which then answer 404)


def route_path(scope: Mapping[str, Any]) -> str:
    """The path within the app: Serve mounts an app under its route prefix (``root_path``),
    which ASGI servers leave at the front of ``path``."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


class KeyRing:
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"API key names must be unique: {names}")
        self.keys = tuple(keys)

    @property
    def open(self) -> bool:
        return not self.keys

    def identify(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented).encode()
        found = None
        for key in self.keys:  # every hash is compared: the time does not depend on the match
            if hmac.compare_digest(digest, key.hash.encode()):
                found = key
        return found


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    value = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return value or None


@dataclass
class TokenBucket:
    rate: float
    burst: int
    updated: float = field(default_factory=time.monotonic)
    tokens: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)  # a new caller starts with a full bucket

    def take(self, now: float | None = None) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One bucket per caller; a key's own rate overrides the default."""

    def __init__(self) -> None:
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, caller: str, rate: float, burst: int) -> float:
        bucket = self.buckets.get(caller)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            bucket = self.buckets[caller] = TokenBucket(rate, burst)
        return bucket.take()


PROXY_HINTS = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")
"""Headers by which the Serve proxy lets a *caller* lift its request timeout (``0``: none) or
stop it cancelling the work of a client that went away. Meant for a trusted front proxy; from a
client they undo two protections, so the guard refuses any request that carries them (by then
the proxy has read them, but the request ends at once)."""


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Denial:
    """Why a call is refused, in no protocol's shape: its HTTP status, error type, message and
    headers (``Retry-After``); gRPC fronts map the status to a gRPC code."""

    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def admit(
    keyring: KeyRing,
    limits: LimitsConfig,
    rates: RateLimiter,
    presented: str | None,
    needed: Scope | None,
    what: str,
) -> str | Denial:
    """The caller's name when the presented key may make a call that needs ``needed`` (and its
    rate allows one more), else the :class:`Denial`; ``what`` names the call in the refusal.
    Every front checks keys through this one function."""
    caller, rate, burst = ANONYMOUS, limits.rate_per_s, limits.burst
    if not keyring.open:
        if presented is None:
            return Denial(
                401,
                "unauthorized",
                "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            )
        key = keyring.identify(presented)
        if key is None:
            return Denial(401, "unauthorized", "unknown API key")
        if needed is not None and needed not in key.scopes:
            return Denial(
                403, "forbidden", f"this key may not use {what}: it needs the '{needed}' scope"
            )
        caller, rate, burst = key.name, key.rate_per_s or rate, key.burst or burst
    wait = 0.0 if keyring.open else rates.take(caller, rate, burst)
    if wait > 0:
        return Denial(
            429,
            "rate_limited",
            f"too many requests for {caller!r}: {rate:g}/s, bursts of {burst}; retry later",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return caller


class Guard:
    """ASGI middleware; see the module docstring. ``render(status, type, message, headers,
    scope)`` builds the error response (the app's one error shape)."""

    def __init__(
        self,
        app: ASGIApp,
        keyring: Callable[[], KeyRing],
        limits: Callable[[], LimitsConfig],
        render: Callable[..., Any],
        rates: Callable[[], RateLimiter] | None = None,
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.limits = limits
        self.render = render
        own = RateLimiter()
        self.rates = rates or (lambda: own)
        """The callers' buckets; given (a function, like ``keyring``: Serve pickles the app by
        value, so an object handed over here would be a copy) they are shared with the gRPC
        front, and a caller's rate is one budget over both protocols."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        for reserved in PROXY_HINTS:
            if reserved in headers:
                return await self._deny(
                    scope,
                    send,
                    400,
                    "reserved_header",
                    f"the {reserved.decode()} header is reserved: clients may not change the "
                    "request timeout or the cancelling of abandoned requests",
                )
        path = route_path(scope)
        needed = required_scope(path)
        if needed == "open":
            await self.app(scope, receive, send)
            return
        limits = self.limits()
        admitted = admit(self.keyring(), limits, self.rates(), presented_key(headers), needed, path)
        if isinstance(admitted, Denial):
            return await self._deny(
                scope,
                send,
                admitted.status,
                admitted.error_type,
                admitted.message,
                admitted.headers or None,
            )
        caller = admitted
        scope.setdefault("state", {})["caller"] = caller
        limit = limits.max_job_body_bytes if path.startswith("/v1/jobs") else limits.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, send, limit)
        try:
            body = await _read_body(receive, limit)
        except BodyTooLarge:
            return await self._too_large(scope, send, limit)
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, scope: dict[str, Any], send: Any, limit: int) -> None:
        await self._deny(scope, send, 413, "payload_too_large", f"request body over {limit} bytes")

    async def _deny(
        self,
        scope: dict[str, Any],
        send: Any,
        status: int,
        error_type: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        if status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="intent-serving"'}
        response = self.render(status, error_type, message, headers or {}, scope)
        await response(scope, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _read_body(receive: Any, limit: int) -> list[dict[str, Any]]:
    """Every ``http.request`` message of the body, refusing more than ``limit`` bytes."""
    messages = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client went away: let the app see it
        size += len(message.get("body", b""))
        if size > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[dict[str, Any]], receive: Any) -> Any:
    pending = list(messages)

    async def replayed() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        return await receive()  # after the body: disconnect notices

    return replayed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m servecore.api.auth",
        description="Make an API key. The key is printed once; store only the JSON entry (its "
        "hash) in INTENT_SERVING_API_KEYS, a JSON list of such entries.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("new", help="a new key and its configuration entry")
    make.add_argument("name", help="who uses it (becomes the owner of its jobs)")
    make.add_argument(
        "--scopes", default="predict", help=f"comma-separated, of {', '.join(SCOPES)}"
    )
    make.add_argument("--rate-per-s", type=float, default=None)
    make.add_argument("--burst", type=int, default=None)
    args = parser.parse_args(argv)
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    key = new_key()
    entry = ApiKey.model_validate(
        {
            "name": args.name,
            "hash": hash_key(key),
            "scopes": scopes,
            "rate_per_s": args.rate_per_s,
            "burst": args.burst,
        }
    )
    print(f"key (shown once, give it to {args.name}): {key}")
    print("entry for INTENT_SERVING_API_KEYS:")
    print(json.dumps(entry.model_dump(exclude_none=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

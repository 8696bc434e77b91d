"""Closed-loop HTTP load generator: a fixed number of clients, each sending requests back to back.

Every run is bounded twice, by a request count and by wall time, whichever comes first. Each
request's latency is recorded; a response that is not 200, not JSON, or that does not carry one
prediction per text counts as an error, and so does a transport failure. Errors are counted and a
few are kept as samples: they are reported, never dropped. Only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MAX_ERROR_SAMPLES = 5


def _intent_body(texts: list[str]) -> dict[str, Any]:
    return {"texts": texts}


def _intent_answers(body: Any) -> int:
    """Predictions in a ``/v1/predict`` answer (a ``TypeError``/``KeyError`` if it has none)."""
    predictions = body["predictions"]
    if not isinstance(predictions, list):
        raise TypeError(f"predictions is {type(predictions).__name__}, not a list")
    return len(predictions)


@dataclass(frozen=True)
class Protocol:
    """How one system is asked: the JSON body for some texts, and how many answers a response
    body holds (raising ``KeyError``, ``TypeError`` or ``ValueError`` if it holds none)."""

    name: str
    body: Callable[[list[str]], dict[str, Any]]
    answers: Callable[[Any], int]


INTENT = Protocol("intent /v1/predict", _intent_body, _intent_answers)
"""The gateway's own API, which the FastAPI peers speak too."""


@dataclass(frozen=True)
class LoadSpec:
    """One load pattern: how many clients, texts per request, and the two bounds."""

    concurrency: int
    texts_per_request: int
    max_requests: int
    max_seconds: float
    timeout_s: float = 60.0
    use_cache: bool = False
    """False sends ``Cache-Control: no-cache``: the served graph's response cache would otherwise
    answer the benchmark's repeated texts and hide the model path being measured."""
    headers: tuple[tuple[str, str], ...] = ()
    """More headers on every request (an API key)."""
    protocol: Protocol = INTENT


@dataclass
class LoadResult:
    """What one measured run produced."""

    concurrency: int
    texts_per_request: int
    requests: int = 0
    ok: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    requests_per_s: float = 0.0
    texts_per_s: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None
    stopped_by: str = ""
    """``count`` or ``time``: which bound ended the run."""
    status_counts: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/mean/max in milliseconds (None when nothing succeeded)."""
    if not latencies_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


class TextCycler:
    """Hands out texts round-robin from a fixed pool, so every system sees the same stream."""

    def __init__(self, texts: Sequence[str]) -> None:
        if not texts:
            raise ValueError("the text pool is empty")
        self._texts: Iterator[str] = itertools.cycle(list(texts))

    def take(self, n: int) -> list[str]:
        return [next(self._texts) for _ in range(n)]


def free_port() -> int:
    """A TCP port on the loopback address that was free a moment ago."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host != LOOPBACK:
        raise ValueError(f"the load generator only targets {LOOPBACK}, not {host!r} ({url})")


class _Run:
    """Shared state of one run's clients (all on one event loop, so no locks are needed)."""

    def __init__(self, spec: LoadSpec, texts: TextCycler) -> None:
        self.headers = {} if spec.use_cache else {"Cache-Control": "no-cache"}
        self.headers.update(dict(spec.headers))
        self.spec = spec
        self.texts = texts
        self.issued = 0
        self.deadline = 0.0
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.errors = 0
        self.error_samples: list[str] = []
        self.stopped_by = ""

    def next_request(self) -> list[str] | None:
        if self.issued >= self.spec.max_requests:
            self.stopped_by = self.stopped_by or "count"
            return None
        if time.perf_counter() >= self.deadline:
            self.stopped_by = self.stopped_by or "time"
            return None
        self.issued += 1
        return self.texts.take(self.spec.texts_per_request)

    def result(self, elapsed: float) -> LoadResult:
        """What the run produced, ``elapsed`` seconds after it started."""
        spec, ok = self.spec, len(self.latencies)
        return LoadResult(
            concurrency=spec.concurrency,
            texts_per_request=spec.texts_per_request,
            requests=self.issued,
            ok=ok,
            errors=self.errors,
            elapsed_s=elapsed,
            requests_per_s=ok / elapsed if elapsed > 0 else 0.0,
            texts_per_s=ok * spec.texts_per_request / elapsed if elapsed > 0 else 0.0,
            stopped_by=self.stopped_by,
            status_counts=dict(self.statuses),
            error_samples=self.error_samples,
            **percentiles(self.latencies),
        )

    def fail(self, status: str, detail: str) -> None:
        self.errors += 1
        self.statuses[status] += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{status}: {detail[:300]}")


async def _client(client: httpx.AsyncClient, url: str, run: _Run) -> None:
    protocol = run.spec.protocol
    while (texts := run.next_request()) is not None:
        started = time.perf_counter()
        try:
            response = await client.post(url, json=protocol.body(texts), headers=run.headers)
        except httpx.HTTPError as e:
            run.fail(type(e).__name__, repr(e))
            continue
        latency = time.perf_counter() - started
        if response.status_code != 200:
            run.fail(str(response.status_code), response.text)
            continue
        try:
            answers = protocol.answers(response.json())
        except (ValueError, KeyError, TypeError) as e:
            run.fail("bad-body", f"{e!r}: {response.text}")
            continue
        if answers != len(texts):
            run.fail("bad-body", f"expected {len(texts)} predictions: {response.text}")
            continue
        run.statuses["200"] += 1
        run.latencies.append(latency)


async def _run_load(url: str, spec: LoadSpec, texts: TextCycler) -> LoadResult:
    check_loopback(url)
    run = _Run(spec, texts)
    limits = httpx.Limits(
        max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency
    )
    # trust_env=False: a proxy from the environment must never see loopback benchmark traffic.
    async with httpx.AsyncClient(limits=limits, timeout=spec.timeout_s, trust_env=False) as client:
        started = time.perf_counter()
        run.deadline = started + spec.max_seconds
        await asyncio.gather(*(_client(client, url, run) for _ in range(spec.concurrency)))
        elapsed = time.perf_counter() - started
    return run.result(elapsed)


def run_load(url: str, spec: LoadSpec, texts: TextCycler) -> LoadResult:
    """Drive ``url`` (``POST`` in ``spec.protocol``; a ``grpc://`` target gets OIP v2
    ``ModelInfer`` calls, :mod:`bench.grpc_load`) with ``spec``'s load; blocks until done."""
    if url.startswith("grpc://"):
        from bench.grpc_load import run_grpc_load

        return run_grpc_load(url, spec, texts)
    return asyncio.run(_run_load(url, spec, texts))


def warm_up(url: str, spec: LoadSpec, texts: TextCycler, seconds: float, label: str) -> None:
    """``seconds`` of the same load as ``spec``, discarded (its errors are logged)."""
    if seconds <= 0:
        return
    warm = dataclasses.replace(spec, max_requests=10**9, max_seconds=seconds)
    result = run_load(url, warm, texts)
    if result.errors:
        logger.warning(
            "%s: %d errors during warm-up: %s", label, result.errors, result.error_samples
        )


def measure(url: str, spec: LoadSpec, texts: TextCycler, label: str) -> LoadResult:
    """The measured run, logged (at warning level when any request failed)."""
    result = run_load(url, spec, texts)
    log = logger.warning if result.errors else logger.info
    log(
        "%s: %.1f req/s, %.1f texts/s, p50 %s ms, p99 %s ms, %d errors (%d requests, by %s)",
        label,
        result.requests_per_s,
        result.texts_per_s,
        _fmt(result.p50_ms),
        _fmt(result.p99_ms),
        result.errors,
        result.requests,
        result.stopped_by,
    )
    if result.errors:
        logger.warning("%s: error samples: %s", label, result.error_samples)
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"

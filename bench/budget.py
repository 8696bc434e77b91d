"""Where the milliseconds of one request go: a latency budget of the served graph at c=1.

Read from the metrics the application exports anyway (nothing is added to the request path):
Serve's own ``serve_deployment_processing_latency_ms`` (time inside each deployment's replica per
call) and the project's ``intent_request_latency_ms`` (the gateway's classification work) and
``intent_inference_latency_ms`` (each stage's model call). The metrics endpoint is scraped before
and after a measured run; the differences of the histograms' sums and counts give mean times per
call, and the load generator gives the mean round trip. The budget then peels the layers off:

=================================  ===========================================================
ingress                            round trip − gateway replica time: HAProxy, the HTTP
                                   server in the replica before the handler, the network
                                   stack and the load generator
gateway HTTP layer                 gateway replica time − classification time: the API-key
                                   guard, FastAPI's parsing and validation, the answer's JSON,
                                   Serve's per-request bookkeeping
gateway → groups                   classification time − the groups' time: coalescing, the
                                   response cache lookup, the handle hops (both ways) and any
                                   queueing for the group
group <name>                       group time − its stages' time: batching, the hand-off to
                                   the worker thread, concatenating and splitting rows
stage <name>                       the model call itself
=================================  ===========================================================

Means are per call. At c=1 every request is one graph call, so per call is per request, except
that the monitor's drift scoring (one tokenizer+encoder call per second, off the request path)
adds a few calls to the group holding the encoder; the counts are reported. A route whose groups
run in parallel (the fully split graph's members) would count overlapping time twice in the
``gateway → groups`` row: the budget is meant for the shipped, sequential routes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""``(metric name, sorted labels) → value`` of one scrape."""

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

SERVE_LATENCY = "ray_serve_deployment_processing_latency_ms"
REQUEST_LATENCY = "ray_intent_request_latency_ms"
STAGE_LATENCY = "ray_intent_inference_latency_ms"


def parse(text: str) -> Samples:
    """Prometheus text exposition → samples (comments and malformed lines skipped)."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        key = (name, tuple(sorted(_LABEL.findall(labels or ""))))
        samples[key] = number
    return samples


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    import httpx

    response = httpx.get(f"http://{host}:{port}/metrics", timeout=10, trust_env=False)
    response.raise_for_status()
    return parse(response.text)


@dataclass(frozen=True)
class Totals:
    """A histogram's sum (ms) and count over the series that match, between two scrapes."""

    sum_ms: float
    count: float

    @property
    def mean_ms(self) -> float | None:
        return self.sum_ms / self.count if self.count > 0 else None


def histogram(before: Samples, after: Samples, family: str, **labels: str) -> Totals:
    """Growth of ``family``'s ``_sum`` and ``_count`` over every series with ``labels``."""

    def total(samples: Samples, suffix: str) -> float:
        found = 0.0
        for (name, series), value in samples.items():
            if name != family + suffix:
                continue
            tags = dict(series)
            if all(tags.get(k) == v for k, v in labels.items()):
                found += value
        return found

    return Totals(
        total(after, "_sum") - total(before, "_sum"),
        total(after, "_count") - total(before, "_count"),
    )


def wait_for_export(
    read: Callable[[], Samples],
    before: Samples,
    ready: Callable[[Samples, Samples], bool],
    timeout_s: float = 45.0,
    interval_s: float = 1.0,
) -> Samples:
    """Scrape until ``ready(before, now)`` (Ray exports metrics every few seconds)."""
    deadline = time.monotonic() + timeout_s
    now = read()
    while not ready(before, now) and time.monotonic() < deadline:
        time.sleep(interval_s)
        now = read()
    return now


def settled(
    read: Callable[[], Samples],
    count: Callable[[Samples], float],
    quiet_s: float = 11.0,
    timeout_s: float = 45.0,
    interval_s: float = 1.0,
) -> Samples:
    """A scrape taken once ``count`` has not moved for ``quiet_s``: Ray exports a process's
    metrics every few seconds (10 s by default), so a scrape right after a load still misses
    its last requests, which would then count in the next measurement."""
    deadline = time.monotonic() + timeout_s
    now = read()
    last, since = count(now), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        now = read()
        value = count(now)
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return now


def latency_budget(
    before: Samples,
    after: Samples,
    round_trip_ms: float,
    app: str,
    route: Sequence[tuple[str, Sequence[str]]],
) -> dict[str, Any]:
    """The budget of one request (see the module docstring). ``route`` is ``[(group, [stage,
    ...]), ...]`` in the order the gateway visits them; ``round_trip_ms`` the client's mean."""
    gateway = histogram(before, after, SERVE_LATENCY, application=app, deployment="Gateway")
    classify = histogram(before, after, REQUEST_LATENCY, outcome="ok")
    rows: list[dict[str, Any]] = []

    def row(part: str, ms: float | None, calls: float | None = None, what: str = "") -> None:
        rows.append({"part": part, "ms": ms, "calls": calls, "what": what})

    groups: list[tuple[str, Totals, list[tuple[str, Totals]]]] = []
    for group, stages in route:
        totals = histogram(before, after, SERVE_LATENCY, application=app, deployment=group)
        per_stage = [(s, histogram(before, after, STAGE_LATENCY, stage=s)) for s in stages]
        groups.append((group, totals, per_stage))
    g_ms, c_ms = gateway.mean_ms, classify.mean_ms
    row(
        "ingress",
        None if g_ms is None else round_trip_ms - g_ms,
        None,
        "HAProxy, the replica's HTTP server, network, load generator",
    )
    row(
        "gateway HTTP layer",
        None if g_ms is None or c_ms is None else g_ms - c_ms,
        gateway.count,
        "API-key guard, FastAPI parsing and validation, JSON answer, Serve bookkeeping",
    )
    group_ms = [t.mean_ms for _, t, _ in groups]
    row(
        "gateway → groups",
        None if c_ms is None or None in group_ms else c_ms - sum(m for m in group_ms if m),
        classify.count,
        "coalescing, cache lookup, handle hops both ways, queueing",
    )
    for group, totals, per_stage in groups:
        stage_ms = [t.mean_ms for _, t in per_stage]
        inner = None
        if totals.mean_ms is not None and None not in stage_ms:
            inner = totals.mean_ms - sum(m for m in stage_ms if m)
        row(
            f"group {group}",
            inner,
            totals.count,
            "batching, hand-off to the worker thread, rows concatenated and split",
        )
        for stage, stage_totals in per_stage:
            row(f"stage {stage}", stage_totals.mean_ms, stage_totals.count, "the model call")
    known = [r["ms"] for r in rows if r["ms"] is not None]
    return {
        "round_trip_ms": round_trip_ms,
        "accounted_ms": sum(known),
        "complete": len(known) == len(rows),
        "rows": rows,
    }


def markdown(budget: Mapping[str, Any]) -> str:
    lines = [
        f"Latency budget, served (b) c=1 (mean of {budget['round_trip_ms']:.1f} ms per request):",
        "",
        "| part | ms | calls | what |",
        "|---|---:|---:|---|",
    ]
    for r in budget["rows"]:
        ms = "–" if r["ms"] is None else f"{r['ms']:.2f}"
        calls = "" if r["calls"] is None else f"{r['calls']:.0f}"
        lines.append(f"| {r['part']} | {ms} | {calls} | {r['what']} |")
    lines.append(f"| **total** | **{budget['accounted_ms']:.1f}** | | |")
    return "\n".join(lines)

"""Writes ``intent-serving.json``, the Grafana dashboard of the serving platform (issue 6).

It also refreshes the metrics table of ``docs/metrics.md`` from ``servecore.monitoring.telemetry``,
so one command brings both up to date after the catalogue changes.

The dashboard charts Ray Serve's built-in metrics (HTTP traffic, latency, errors, replicas, the
``@serve.batch`` queue) beside the model-level ones of ``servecore.monitoring.telemetry.CATALOGUE``.
Edit the panels here, then run ``python cluster/grafana/build_dashboard.py``: the output is
deterministic, and ``tests/test_dashboards.py`` checks that the checked-in JSON matches it and that
every metric a query names exists (in the catalogue, or in Ray Serve's source).

Every query filters on the ``application`` variable; rates use Grafana's ``$__rate_interval``,
ratios a fixed 5-minute window so that sparse events (cache hits, shadow comparisons) do not
flicker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("intent-serving.json")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
TABLE_START = "<!-- metrics-table:"
TABLE_END = "<!-- /metrics-table -->"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
APP = 'application=~"$application"'
RATE = "[$__rate_interval]"
QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 12
    maximum: float | None = None


def rate(series: str, selector: str = APP, window: str = RATE) -> str:
    return f"rate({series}{{{selector}}}{window})"


def quantiles(
    bucket: str, by: str, legend: str, levels: tuple[float, ...] = QUANTILES
) -> tuple[Query, ...]:
    """Quantiles (p50, p95, p99 unless told) of a histogram's ``_bucket`` series, per ``by``."""
    group = ", ".join(["le", *([by] if by else [])])
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) ({rate(bucket)}))",
            f"p{round(q * 100)} {legend}".strip(),
        )
        for q in levels
    )


def ratio(numerator: str, denominator: str, by: str = "") -> str:
    group = f" by ({by}) " if by else ""
    return f"sum{group}({numerator}) / sum{group}({denominator})"


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Throughput",
        (
            Panel(
                "HTTP requests/s (Serve proxy)",
                "Requests through Serve's HTTP proxies per application and status code "
                "(built-in `ray_serve_num_http_requests_total`).",
                (
                    Query(
                        "sum by (application, status_code) "
                        f"({rate('ray_serve_num_http_requests_total')})",
                        "{{application}} {{status_code}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
            Panel(
                "Predictions/s by label",
                "Texts answered per predicted label, cached answers included.",
                (
                    Query(
                        f"sum by (label) ({rate('ray_intent_predictions_total')})",
                        "{{label}}",
                    ),
                ),
                unit="ops",
                width=8,
            ),
            Panel(
                "A/B variants: requests/s",
                "Classification requests routed to each A/B variant.",
                (
                    Query(
                        f"sum by (variant) ({rate('ray_intent_variant_requests_total')})",
                        "{{variant}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
        ),
    ),
    (
        "Latency",
        (
            Panel(
                "HTTP latency (Serve proxy)",
                "End-to-end latency measured by Serve's HTTP proxies "
                "(built-in `ray_serve_http_request_latency_ms`).",
                quantiles("ray_serve_http_request_latency_ms_bucket", "", ""),
                unit="ms",
                width=8,
            ),
            Panel(
                "Gateway request latency by variant",
                "Time the Gateway takes to answer one classification request (cache, pipeline "
                "and fallback included), per A/B variant; the dashed line is the mean.",
                (
                    *quantiles("ray_intent_request_latency_ms_bucket", "variant", "{{variant}}"),
                    Query(
                        ratio(
                            rate("ray_intent_request_latency_ms_sum"),
                            rate("ray_intent_request_latency_ms_count"),
                            "variant",
                        ),
                        "mean {{variant}}",
                    ),
                ),
                unit="ms",
                width=8,
            ),
            Panel(
                "Inference latency by stage and version",
                "Time of one model call on one batch, per stage and registered model version.",
                quantiles(
                    "ray_intent_inference_latency_ms_bucket",
                    "stage, version",
                    "{{stage}} {{version}}",
                ),
                unit="ms",
                width=8,
            ),
        ),
    ),
    (
        "Errors",
        (
            Panel(
                "HTTP errors/s by status code",
                "Errored HTTP responses (4xx and 5xx) per application and code "
                "(built-in `ray_serve_num_http_error_requests_total`).",
                (
                    Query(
                        "sum by (application, error_code) "
                        f"({rate('ray_serve_num_http_error_requests_total')})",
                        "{{application}} {{error_code}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
            Panel(
                "HTTP errors/s by deployment",
                "Errored HTTP responses per deployment that returned them "
                "(built-in `ray_serve_num_deployment_http_error_requests_total`).",
                (
                    Query(
                        "sum by (deployment, error_code) "
                        f"({rate('ray_serve_num_deployment_http_error_requests_total')})",
                        "{{deployment}} {{error_code}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
            Panel(
                "Gateway outcomes/s",
                "Classification requests answered per outcome: `ok`, `degraded` or `error` "
                "(the count of `ray_intent_request_latency_ms`).",
                (
                    Query(
                        f"sum by (outcome) ({rate('ray_intent_request_latency_ms_count')})",
                        "{{outcome}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
        ),
    ),
    (
        "Batching",
        (
            Panel(
                "Rows per model call by stage",
                "Rows per model call of each stage (`Gateway`: texts per coalesced graph "
                "call); the dashed line is the mean.",
                (
                    *quantiles("ray_intent_batch_size_bucket", "stage", "{{stage}}", (0.5, 0.95)),
                    Query(
                        ratio(
                            rate("ray_intent_batch_size_sum"),
                            rate("ray_intent_batch_size_count"),
                            "stage",
                        ),
                        "mean {{stage}}",
                    ),
                ),
                width=8,
            ),
            Panel(
                "@serve.batch: requests per batch",
                "Requests in each `@serve.batch` call, per deployment "
                "(built-in `ray_serve_actual_batch_size`).",
                quantiles(
                    "ray_serve_actual_batch_size_bucket",
                    "deployment",
                    "{{deployment}}",
                    (0.5, 0.95),
                ),
                width=8,
            ),
            Panel(
                "@serve.batch: queue length",
                "Requests waiting for a batch, per deployment and batched method "
                "(built-in `ray_serve_batch_queue_length`).",
                (
                    Query(
                        "sum by (deployment, function_name) "
                        f"(ray_serve_batch_queue_length{{{APP}}})",
                        "{{deployment}}.{{function_name}}",
                    ),
                ),
                width=8,
            ),
        ),
    ),
    (
        "Replicas",
        (
            Panel(
                "Healthy replicas per deployment",
                "Healthy replicas (built-in `ray_serve_deployment_replica_healthy`) and the "
                "autoscaler's target (`ray_serve_autoscaling_target_replicas`, dashed).",
                (
                    Query(
                        f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})",
                        "{{deployment}}",
                    ),
                    Query(
                        f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{APP}}})",
                        "target {{deployment}}",
                    ),
                ),
                width=12,
            ),
            Panel(
                "Ongoing requests per deployment",
                "Requests being processed by the replicas of each deployment "
                "(built-in `ray_serve_replica_processing_queries`).",
                (
                    Query(
                        f"sum by (deployment) (ray_serve_replica_processing_queries{{{APP}}})",
                        "{{deployment}}",
                    ),
                ),
                width=12,
            ),
        ),
    ),
    (
        "Cache, fallbacks, shadow",
        (
            Panel(
                "Cache hit ratio",
                "Response-cache hits over hits and misses (bypassed lookups left out), 5m.",
                (
                    Query(
                        ratio(
                            rate("ray_intent_cache_lookups_total", f'{APP}, result="hit"', "[5m]"),
                            rate(
                                "ray_intent_cache_lookups_total",
                                f'{APP}, result=~"hit|miss"',
                                "[5m]",
                            ),
                        ),
                        "hit ratio",
                    ),
                ),
                unit="percentunit",
                width=6,
                maximum=1,
            ),
            Panel(
                "Cache lookups/s by result",
                "Response-cache lookups per text: `hit`, `miss` or `bypass`.",
                (
                    Query(
                        f"sum by (result) ({rate('ray_intent_cache_lookups_total')})",
                        "{{result}}",
                    ),
                ),
                unit="ops",
                width=6,
            ),
            Panel(
                "Fallbacks/s by reason",
                "Requests answered by the fallback model, by why the primary did not answer.",
                (
                    Query(
                        f"sum by (reason) ({rate('ray_intent_fallbacks_total')})",
                        "{{reason}}",
                    ),
                ),
                unit="reqps",
                width=6,
            ),
            Panel(
                "Shadow agreement",
                "Share of shadow-scored texts whose label agrees with the served one, per "
                "shadow variant, 5m.",
                (
                    Query(
                        ratio(
                            rate(
                                "ray_intent_shadow_comparisons_total",
                                f'{APP}, outcome="agree"',
                                "[5m]",
                            ),
                            rate("ray_intent_shadow_comparisons_total", APP, "[5m]"),
                            "variant",
                        ),
                        "{{variant}}",
                    ),
                ),
                unit="percentunit",
                width=6,
                maximum=1,
            ),
        ),
    ),
    (
        "Jobs and drift",
        (
            Panel(
                "Jobs by state",
                "Asynchronous jobs in the job store per state (every job runner replica reports "
                "the same store, hence `max`).",
                (Query(f"max by (state) (ray_intent_jobs{{{APP}}})", "{{state}}"),),
                width=8,
            ),
            Panel(
                "Drift score by signal",
                "Drift of the live window against the reference profile (0 = same, "
                "1 = disjoint); 1 on the alarm series while a signal is above its threshold.",
                (
                    Query(f"max by (signal) (ray_intent_drift_score{{{APP}}})", "{{signal}}"),
                    Query(
                        f"max by (signal) (ray_intent_drift_alarm{{{APP}}})",
                        "alarm {{signal}}",
                    ),
                ),
                unit="none",
                width=8,
                maximum=1,
            ),
            Panel(
                "Drift monitor: window and records",
                "Texts in the monitor's sliding window, and sampled answers/s reaching the "
                "monitor per outcome (`logged`, `scored`, `dropped`).",
                (
                    Query(f"max(ray_intent_drift_window{{{APP}}})", "window"),
                    Query(
                        f"sum by (outcome) ({rate('ray_intent_monitor_records_total')})",
                        "{{outcome}}/s",
                    ),
                ),
                width=8,
            ),
        ),
    ),
    (
        "Rollouts",
        (
            Panel(
                "Rollout step and candidate traffic",
                "The running rollout's step (0-based) and the percent of requests its candidate "
                "answers; status 1 = promoted, -1 = rolled back, -2 = aborted.",
                (
                    Query(f"max by (app) (ray_intent_rollout_step{{{APP}}})", "step {{app}}"),
                    Query(
                        f"max by (app) (ray_intent_rollout_traffic{{{APP}}})",
                        "candidate % {{app}}",
                    ),
                    Query(f"max by (app) (ray_intent_rollout_status{{{APP}}})", "status {{app}}"),
                ),
                width=8,
            ),
            Panel(
                "Rollout gate verdicts",
                "Last verdict per gate: 1 pass, 0.5 not measured in this step, 0 waiting for "
                "evidence, -1 fail (a failing gate rolls the candidate back).",
                (
                    Query(
                        f"min by (gate) (ray_intent_rollout_gate{{{APP}}})",
                        "{{gate}}",
                    ),
                ),
                width=8,
            ),
            Panel(
                "Rollout decisions",
                "Decisions per action and decider over the dashboard's rate window (`auto` "
                "rollbacks are the ones the gates made).",
                (
                    Query(
                        "sum by (action, by) "
                        f"(increase(ray_intent_rollout_decisions_total{{{APP}}}{RATE}))",
                        "{{action}} by {{by}}",
                    ),
                ),
                width=8,
            ),
        ),
    ),
    (
        "Streams",
        (
            Panel(
                "Stream messages by outcome",
                "Messages/s per input stream: `scored` (results written: the throughput), "
                "`dead_letter`, `duplicate` (a redelivery not written twice), `retried`, "
                "`claimed` (taken over from a dead consumer).",
                (
                    Query(
                        f"sum by (stream, outcome) ({rate('ray_intent_stream_messages_total')})",
                        "{{stream}} {{outcome}}/s",
                    ),
                ),
                width=8,
            ),
            Panel(
                "Stream lag and pending",
                "Entries not yet delivered to the group (lag) and delivered but not acknowledged "
                "(pending); every consumer replica reads the same group, hence `max`.",
                (
                    Query(f"max by (stream) (ray_intent_stream_lag{{{APP}}})", "lag {{stream}}"),
                    Query(
                        f"max by (stream) (ray_intent_stream_pending{{{APP}}})",
                        "pending {{stream}}",
                    ),
                ),
                width=8,
            ),
            Panel(
                "Stream end-to-end latency",
                "From the message's stream id time (when Redis took it in) to its result's write.",
                quantiles("ray_intent_stream_latency_ms_bucket", "stream", "{{stream}}"),
                unit="ms",
                width=8,
            ),
        ),
    ),
)


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "min": 0,
        "custom": {"drawStyle": "line", "fillOpacity": 10, "lineWidth": 1, "spanNulls": True},
    }
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    # Means and autoscaler targets are context, not measurements of their own: draw them dashed.
    dashed = [
        {
            "matcher": {"id": "byRegexp", "options": "^(mean|target) .*"},
            "properties": [{"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}}],
        }
    ]
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": dashed},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": query.expr,
                "legendFormat": query.legend,
                "range": True,
                "refId": chr(ord("A") + index),
            }
            for index, query in enumerate(panel.queries)
        ],
    }


def _templating() -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            {
                "name": "application",
                "label": "Serve application",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": "label_values(ray_serve_deployment_replica_healthy, application)",
                "query": "label_values(ray_serve_deployment_replica_healthy, application)",
                "current": {},
                "includeAll": True,
                "allValue": ".*",
                "multi": True,
                "hide": 0,
                "refresh": 2,
                "regex": "",
                "sort": 1,
                "options": [],
            },
        ]
    }


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict (rows of panels on Grafana's 24-column grid)."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, len(panels) + 1, x, y))
            x += panel.width
        y += 8
    return {
        "title": "Intent serving",
        "uid": "intent-serving",
        "description": "Ray Serve traffic, latency, errors, batching and replicas beside the "
        "intent platform's own metrics (docs/metrics.md).",
        "tags": ["ray", "serve", "intent"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": _templating(),
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def refresh_docs_table(text: str) -> str:
    """``text`` (docs/metrics.md) with the table between its markers replaced by the catalogue's."""
    from servecore.monitoring.telemetry import markdown_table

    start = text.index("-->", text.index(TABLE_START)) + len("-->")
    end = text.index(TABLE_END, start)
    return f"{text[:start]}\n\n{markdown_table()}\n\n{text[end:]}"


def main() -> None:
    OUTPUT.write_text(render())
    DOCS.write_text(refresh_docs_table(DOCS.read_text()))


if __name__ == "__main__":
    main()
